// Rewards computed in-process from a response and its label (`--rm-type`):
//   math   1 when the last \boxed{} answer matches the label (rewards/math_verifier.h), else 0
//   dapo   the same check as +1 / -1 (the DAPO recipe's reward)
//   exact  1 when the response equals the label, both trimmed of surrounding whitespace, else 0
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace lockstep::rl {

enum class RewardType { math, dapo, exact };

// Errors name the flag and the accepted names.
RewardType reward_type_from_name(const std::string& name);
const char* reward_type_names();  // "math | dapo | exact"

float local_reward(RewardType type, std::string_view response, std::string_view label);

// A label as text: a JSON string as is, an integer in its digits, another number as JSON
// writes it. Anything else is an error naming `where` (e.g. "data.jsonl:7: key 'label'").
std::string label_text(const nlohmann::json& value, const std::string& where);

}  // namespace lockstep::rl
