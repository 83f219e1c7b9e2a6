#include "rl/step_rollout.h"

#include <algorithm>

#include "core/error.h"
#include "core/philox.h"
#include "rl/rollout_metrics.h"

namespace lockstep::rl {

void StepRollout::add_metrics(nlohmann::json& m, const TrainConfig& c) const {
  if (!c.dynamic_sampling_filter && c.over_sampling_batch_size == 0) return;
  int64_t dropped_groups = 0;
  for (const auto& [reward, count] : dropped) {
    m["rollout/dynamic_filter/drop_zero_std_" + reward] = count;
    dropped_groups += count;
  }
  m["rollout/dynamic_filter/dropped_groups"] = dropped_groups;
  m["rollout/dynamic_filter/sampled_prompts"] = prompts_drawn;
  m["rollout/dynamic_filter/rounds"] = rounds;
}

StepRollout sample_step(const TrainConfig& c, PromptSource& source, Environment& env, uint64_t data_seed,
                        uint64_t sampling_seed, int64_t data_position, int64_t step, const GenerateFn& generate) {
  const int64_t n = c.n_samples_per_prompt, wanted = c.rollout_batch_size;
  const int64_t per_round = c.over_sampling_batch_size > 0 ? c.over_sampling_batch_size : wanted;
  EpisodeLimits limits;
  limits.max_turns = c.rollout_max_turns;
  limits.max_response_len = c.rollout_max_response_len;
  limits.max_turn_len = c.rollout_max_turn_len;
  StepRollout out;
  int64_t kept = 0;
  while (kept < wanted) {
    LS_CHECK(out.rounds < kMaxDynamicSamplingRounds, "rollout step ", step, ": --dynamic-sampling-filter kept ", kept,
             " of ", wanted, " prompt groups after ", out.rounds, " rounds (", out.prompts_drawn,
             " prompts): every other group's samples got equal rewards, so there is no signal to train on");
    const int64_t first = data_position + out.prompts_drawn;
    std::vector<Episode> episodes;
    std::vector<rollout::GenerationRequest> requests;
    for (int64_t p = 0; p < per_round; ++p) {
      TaskExample ex = source.prompt(data_seed, first + p);
      for (int64_t k = 0; k < n; ++k) {
        const int64_t i = p * n + k;
        rollout::GenerationRequest req;
        req.prompt = ex.prompt;
        req.max_new_tokens = c.rollout_max_response_len;
        source.set_stops(req);
        req.sampling.temperature = float(c.rollout_temperature);
        req.sampling.top_k = int32_t(c.rollout_top_k);
        req.sampling.top_p = float(c.rollout_top_p);
        // Round 0 keeps the seeds of a run without dynamic sampling.
        req.sampling.seed = mix_seed(sampling_seed, uint64_t(i) + (uint64_t(out.rounds) << 32));
        requests.push_back(std::move(req));
        Episode e;
        e.position = first + p;
        e.example = ex;
        episodes.push_back(std::move(e));
      }
    }
    // Every rank runs every episode; independent engine replicas each generate their share.
    run_episodes(episodes, requests, env, generate, limits, step);
    for (int64_t p = 0; p < per_round && kept < wanted; ++p) {
      const auto begin = episodes.begin() + p * n, end = begin + n;
      if (c.dynamic_sampling_filter &&
          std::all_of(begin, end, [&](const Episode& e) { return e.reward == begin->reward; })) {
        ++out.dropped[python_float_text(begin->reward)];
        continue;
      }
      for (auto e = begin; e != end; ++e) out.samples.push_back(std::move(*e));
      ++kept;
    }
    out.prompts_drawn += per_round;
    ++out.rounds;
  }
  return out;
}

}  // namespace lockstep::rl
