#include "rl/rewards/remote_reward.h"

namespace lockstep::rl {

std::vector<float> remote_rewards(const std::vector<RewardRequest>& samples, const RemoteRewardOptions& o) {
  HttpPostOptions post;
  post.url = o.url;
  post.concurrency = o.concurrency;
  post.timeout_s = o.timeout_s;
  post.retries = o.retries;
  post.backoff_s = o.backoff_s;
  std::vector<std::string> bodies;
  for (const auto& s : samples) bodies.push_back(s.to_json().dump());
  std::vector<float> rewards(samples.size(), 0.0f);
  post_json_all(bodies, post,
                [&](size_t i, const std::string& answer) { rewards[i] = parse_reward_answer(answer, "the answer"); });
  return rewards;
}

}  // namespace lockstep::rl
