// Helpers for the RL loop tests: tiny, fast configs in a fresh temporary directory.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "../error_of.h"
#include "core/error.h"
#include "rl/train_config.h"

namespace lockstep::rl::testing {

// A fresh directory under the system temp dir, removed when the object goes away.
class TempDir {
 public:
  explicit TempDir(const std::string& tag) {
    static int counter = 0;
    path_ = std::filesystem::temp_directory_path() /
            ("lockstep_rl_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string sub(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// A few seconds at most: 4 prompts x 4 samples, 2 micro-batches, 2 SFT steps.
inline TrainConfig tiny_run(const TempDir& dir, const std::string& name) {
  TrainConfig c;
  c.num_rollout = 3;
  c.rollout_batch_size = 4;
  c.n_samples_per_prompt = 4;
  c.global_batch_size = 16;
  c.num_microbatches = 2;
  c.sft_warmup_steps = 2;
  c.check_true_on_policy = true;
  c.progress = false;
  c.output_dir = dir.sub(name + "_out");
  return c;
}

inline std::vector<nlohmann::json> read_metrics(const TrainConfig& c) {
  std::vector<nlohmann::json> out;
  std::ifstream f(std::filesystem::path(c.output_dir) / "metrics.jsonl");
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

// The mean rollout reward of each RL step, in step order.
inline std::vector<double> step_rewards(const std::vector<nlohmann::json>& records) {
  std::vector<double> out;
  for (const auto& r : records)
    if (r.contains("step")) out.push_back(r["rollout/raw_reward"].get<double>());
  return out;
}

// The mean of values[first, last).
inline double mean_of(const std::vector<double>& values, size_t first, size_t last) {
  double sum = 0;
  for (size_t i = first; i < last; ++i) sum += values[i];
  return sum / double(last - first);
}

// The metrics without perf/* timings (which are wall-clock and differ run to run).
inline std::vector<nlohmann::json> without_perf(std::vector<nlohmann::json> records) {
  for (auto& r : records)
    for (auto it = r.begin(); it != r.end();) it = it.key().rfind("perf/", 0) == 0 ? r.erase(it) : std::next(it);
  return records;
}

// The batch shape of the short data runs: 2 prompts x 2 samples, one optimizer step of 2
// micro-batches.
inline void small_batches(TrainConfig& c) {
  c.rollout_batch_size = 2;
  c.n_samples_per_prompt = 2;
  c.global_batch_size = 4;
  c.num_microbatches = 2;
}

using lockstep::testing::error_of;  // ../error_of.h

inline std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream os;
  os << f.rdbuf();
  return os.str();
}

}  // namespace lockstep::rl::testing
