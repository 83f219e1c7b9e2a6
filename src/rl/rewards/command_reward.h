// `--custom-rm-cmd CMD`: a user's reward program. Once per rollout, CMD runs under /bin/sh with
// one JSON sample a line on stdin ({"prompt", "response", "label", "metadata"}) and writes one
// reward a line on stdout (a number or {"reward": x}), in order. Its stderr passes through.
#pragma once
#include <string>
#include <vector>

#include "rl/rewards/reward_request.h"

namespace lockstep::rl {

// Errors name the command: a non-zero exit, a wrong number of lines, a line that is not a reward.
std::vector<float> command_rewards(const std::vector<RewardRequest>& samples, const std::string& command);

}  // namespace lockstep::rl
