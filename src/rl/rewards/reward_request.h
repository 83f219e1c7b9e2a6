// One sample sent to an outside reward (an HTTP reward model or a custom command), and the
// answer such a reward gives: a bare number or {"reward": x}.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace lockstep::rl {

struct RewardRequest {
  std::string prompt, response, label;
  nlohmann::json metadata;  // null when the data has none
  nlohmann::json to_json() const {
    return {{"prompt", prompt}, {"response", response}, {"label", label}, {"metadata", metadata}};
  }
};

// The reward in `answer` (a JSON number, or an object with a numeric "reward"); throws
// lockstep::Error naming `where` and showing the answer otherwise.
float parse_reward_answer(const std::string& answer, const std::string& where);

}  // namespace lockstep::rl
