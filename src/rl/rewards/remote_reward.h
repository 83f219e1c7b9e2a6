// `--rm-url http://HOST:PORT/PATH`: a reward model behind HTTP. Each sample is one JSON POST
// ({"prompt", "response", "label", "metadata"}); the answer is a number or {"reward": x}. Requests
// run `concurrency` at a time; a failed one (no connection, timeout, a non-2xx status, an answer
// that is not a reward) is retried with doubling backoff, and after the last retry the whole
// call fails with an error naming the URL, the sample and the last failure.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "rl/rewards/http_post.h"
#include "rl/rewards/reward_request.h"

namespace lockstep::rl {

struct RemoteRewardOptions {
  std::string url;
  int64_t concurrency = 16;
  double timeout_s = 30;   // connect, read and write, per attempt
  int64_t retries = 3;     // attempts after the first
  double backoff_s = 0.5;  // before the first retry; doubles each time
};

std::vector<float> remote_rewards(const std::vector<RewardRequest>& samples, const RemoteRewardOptions& options);

}  // namespace lockstep::rl
