// Rollout metrics under the names miles and slime log, so dashboards carry over:
//   rollout/raw_reward               mean reward before any advantage shaping
//   rollout/zero_std/count_<r>       prompt groups whose samples all got reward r ("0.0", "1.0", ...)
//   rollout/zero_std_ratio           the share of such groups (they give GRPO no signal)
//   rollout/response_len/{mean,median,min,max,std}
//   rollout/truncated_ratio          the share of responses cut at --rollout-max-response-len
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace lockstep::rl {

// `rewards`, `lengths` and `truncated` are per sample, groups of `group_size` consecutive samples.
void add_rollout_metrics(nlohmann::json& metrics, const std::vector<float>& rewards,
                         const std::vector<int64_t>& lengths, const std::vector<bool>& truncated, int64_t group_size);

// A reward as Python prints a float ("0.0", "1.0", "-1.0", "0.25"): the miles metric suffix.
std::string python_float_text(float value);

}  // namespace lockstep::rl
