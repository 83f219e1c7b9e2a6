// Evaluation during `lockstep train` (--eval-prompt-data NAME F [NAME F ...]): before the first RL
// step, every --eval-interval steps and after the last, each prompt of each eval set is answered
// --n-samples-per-eval-prompt times with the eval sampling options (--eval-temperature,
// --eval-top-p, --eval-max-response-len) as an episode of the run's environment: one turn scored
// by the run's reward, or the episodes of --rollout-tool / --rollout-env-url (the same turn limits
// as the rollouts, --eval-max-response-len the episode's budget, the environment's reward). One
// metrics record per evaluation: {"step": k, "eval/NAME": mean reward, "eval/NAME/pass@1",
// "eval/NAME/pass@N", "eval/NAME/response_lengths", "eval/NAME/truncated"} (and with an
// environment "eval/NAME/turns", policy turns per episode); a sample passes when its reward is > 0.
// Sampling is keyed by (seed, step, sample), so an evaluation is the same whenever it runs.
#pragma once
#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "rl/prompt_dataset.h"
#include "rl/rewards/reward_request.h"
#include "rl/train_config.h"
#include "rollout/replica_split.h"

namespace lockstep::dist {
class Communicator;
}

namespace lockstep::rl {

// "NAME F [NAME F ...]" (any whitespace between) as (name, file) pairs; errors name the flag.
std::vector<std::pair<std::string, std::string>> parse_eval_prompt_data(const std::string& value);

// pass@k of one prompt from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (unbiased).
double pass_at_k(int64_t n, int64_t c, int64_t k);

using GenerateFn =
    std::function<std::vector<rollout::RequestOutcome>(const std::vector<std::optional<rollout::GenerationRequest>>&)>;
using ScoreFn = std::function<std::vector<float>(const std::vector<RewardRequest>&)>;
using StopsFn = std::function<void(rollout::GenerationRequest&)>;

class Evaluator {
 public:
  // Reads every eval set with the run's keys and chat template (errors name file, line, key).
  Evaluator(const TrainConfig& config, const PromptDataOptions& options, const Tokenizer& tokenizer);
  bool enabled() const { return !sets_.empty(); }
  // Evaluates at step 0, every --eval-interval steps and at --num-rollout.
  bool due(int64_t step) const;
  // The longest eval prompt plus the eval response length (sizes the engine).
  int64_t max_sequence_len() const;
  int64_t max_prompt_len() const;
  // `world`: the run's ranks, for an environment server (asked on rank 0 only).
  nlohmann::json run(int64_t step, uint64_t seed, const StopsFn& set_stops, const GenerateFn& generate,
                     const ScoreFn& score, dist::Communicator* world) const;

 private:
  struct EvalSet {
    std::string name;
    PromptDataset data;
  };
  const TrainConfig& cfg_;
  const Tokenizer& tokenizer_;
  std::vector<EvalSet> sets_;
};

}  // namespace lockstep::rl
