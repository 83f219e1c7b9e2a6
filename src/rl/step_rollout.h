// One RL step's rollout: `--rollout-batch-size` prompt groups of `--n-samples-per-prompt` answers,
// scored. With DAPO dynamic sampling (--dynamic-sampling-filter) a group whose rewards are all
// equal gives GRPO no signal and is dropped; rounds of --over-sampling-batch-size prompts (default:
// the batch size) are drawn from the next data positions until the batch is full, and the groups
// kept are the first ones in data order. Without the filter and over-sampling this is exactly one
// round of the batch, with the sampling seeds of (seed, step, sample) as before.
#pragma once
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "rl/episode.h"
#include "rl/eval.h"
#include "rl/prompt_source.h"
#include "rl/train_config.h"

namespace lockstep::rl {

struct StepRollout {
  std::vector<Episode> samples;  // the kept groups, in data order
  int64_t prompts_drawn = 0;     // data positions consumed (kept or dropped)
  int64_t rounds = 0;
  std::map<std::string, int64_t> dropped;  // dropped groups by their common reward ("0.0", "1.0")
  // The dynamic-sampling metrics (rollout/dynamic_filter/...); none when the filter is off.
  void add_metrics(nlohmann::json& metrics, const TrainConfig& config) const;
};

// The most rounds of one step before dynamic sampling gives up with an error.
constexpr int64_t kMaxDynamicSamplingRounds = 64;

// `sampling_seed` is the step's (the seed of sample i of round r is a function of it, i and r).
// Each sample is an episode of `env` (one turn, with the run's reward, unless the run has a
// multi-turn environment).
StepRollout sample_step(const TrainConfig& config, PromptSource& source, Environment& env, uint64_t data_seed,
                        uint64_t sampling_seed, int64_t data_position, int64_t step, const GenerateFn& generate);

}  // namespace lockstep::rl
