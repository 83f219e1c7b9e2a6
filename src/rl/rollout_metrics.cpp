#include "rl/rollout_metrics.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

namespace lockstep::rl {

std::string python_float_text(float value) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", double(value));
  std::string s = buf;
  if (s.find_first_of(".eE") == std::string::npos && s.find_first_of("ni") == std::string::npos) s += ".0";
  return s;
}

void add_rollout_metrics(nlohmann::json& m, const std::vector<float>& rewards, const std::vector<int64_t>& lengths,
                         const std::vector<bool>& truncated, int64_t group_size) {
  const size_t n = rewards.size();
  if (n == 0) return;
  double reward_sum = 0;
  for (float r : rewards) reward_sum += r;
  m["rollout/raw_reward"] = reward_sum / double(n);
  std::map<std::string, int64_t> zero_std;
  int64_t groups = 0, flat = 0;
  for (size_t g = 0; g + size_t(group_size) <= n; g += size_t(group_size), ++groups) {
    const bool all_equal = std::all_of(rewards.begin() + long(g), rewards.begin() + long(g + size_t(group_size)),
                                       [&](float r) { return r == rewards[g]; });
    if (all_equal) ++zero_std[python_float_text(rewards[g])], ++flat;
  }
  for (const auto& [reward, count] : zero_std) m["rollout/zero_std/count_" + reward] = count;
  m["rollout/zero_std_ratio"] = groups ? double(flat) / double(groups) : 0.0;
  std::vector<int64_t> sorted = lengths;
  std::sort(sorted.begin(), sorted.end());
  double sum = 0, sq = 0;
  for (int64_t l : sorted) sum += double(l);
  const double mean = sum / double(n);
  for (int64_t l : sorted) sq += (double(l) - mean) * (double(l) - mean);
  const size_t mid = n / 2;
  m["rollout/response_len/mean"] = mean;
  m["rollout/response_len/median"] = n % 2 ? double(sorted[mid]) : 0.5 * double(sorted[mid - 1] + sorted[mid]);
  m["rollout/response_len/min"] = sorted.front();
  m["rollout/response_len/max"] = sorted.back();
  m["rollout/response_len/std"] = std::sqrt(sq / double(n));
  int64_t cut = 0;
  for (bool t : truncated) cut += t;
  m["rollout/truncated_ratio"] = double(cut) / double(n);
}

}  // namespace lockstep::rl
