#include "rl/rewards/reward_request.h"

#include <cmath>

#include "core/error.h"
#include "core/json_parse.h"

namespace lockstep::rl {

float parse_reward_answer(const std::string& answer, const std::string& where) {
  nlohmann::json j;
  try {
    j = parse_json(answer, where);
  } catch (const Error&) {
    j = nullptr;  // reported below with the answer's text
  }
  if (j.is_object() && j.contains("reward")) j = j["reward"];
  const std::string shown = answer.size() > 200 ? answer.substr(0, 200) + "..." : answer;
  LS_CHECK(j.is_number(), where, ": expected a number or {\"reward\": number}, got '", shown, "'");
  const double v = j.get<double>();
  LS_CHECK(std::isfinite(v), where, ": the reward is not finite ('", shown, "')");
  return float(v);
}

}  // namespace lockstep::rl
