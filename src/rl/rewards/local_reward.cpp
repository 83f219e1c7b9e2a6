#include "rl/rewards/local_reward.h"

#include "core/error.h"
#include "rl/rewards/math_verifier.h"

namespace lockstep::rl {

namespace {
std::string_view trim(std::string_view s) {
  const char* space = " \t\r\n";
  const size_t b = s.find_first_not_of(space);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(space) + 1 - b);
}
}  // namespace

const char* reward_type_names() { return "math | dapo | exact"; }

RewardType reward_type_from_name(const std::string& name) {
  if (name == "math") return RewardType::math;
  if (name == "dapo") return RewardType::dapo;
  if (name == "exact") return RewardType::exact;
  fail("--rm-type: expected ", reward_type_names(), ", got '", name, "'");
}

float local_reward(RewardType type, std::string_view response, std::string_view label) {
  switch (type) {
    case RewardType::math: return math_reward(response, label);
    case RewardType::dapo: return math_reward(response, label) > 0 ? 1.0f : -1.0f;
    case RewardType::exact: return trim(response) == trim(label) ? 1.0f : 0.0f;
  }
  return 0.0f;
}

std::string label_text(const nlohmann::json& value, const std::string& where) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_number_integer()) return value.dump();
  if (value.is_number_float()) return value.dump();
  fail(where, ": expected a string or a number, found ", value.type_name());
}

}  // namespace lockstep::rl
