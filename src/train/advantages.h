// Advantage estimators (--advantage-estimator). Samples are ordered group by group: the
// n_samples_per_prompt answers of prompt 0, then of prompt 1, ... Every estimator returns
// one advantage per response token of every sample.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lockstep {

enum class AdvantageEstimator { grpo, dr_grpo, reinforce_plus_plus, gspo };
AdvantageEstimator advantage_estimator_from_name(const std::string& name);
const char* advantage_estimator_name(AdvantageEstimator e);

// grpo / gspo: (r - group mean) / (group std + 1e-6), std with Bessel's correction (0 for a
//   group of one); gspo differs from grpo only in the loss (a sequence-level ratio).
// dr_grpo: r - group mean (no std division).
// reinforce_plus_plus: every token's return is its sample's reward (gamma = 1), then
//   normalised over all response tokens of the batch: (x - mean) / (std + 1e-6).
// Sums run in sample order in double, so the result is a fixed function of the batch.
std::vector<std::vector<float>> compute_advantages(AdvantageEstimator e, const std::vector<float>& rewards,
                                                   const std::vector<int64_t>& response_lengths,
                                                   int64_t group_size);

}  // namespace lockstep
