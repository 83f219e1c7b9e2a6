// Rollout metrics under the miles names: raw reward, zero-std groups by reward, response length
// statistics and truncation.
#include <gtest/gtest.h>

#include "rl/rollout_metrics.h"
#include "rl/trainer.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

TEST(RolloutMetrics, GroupsLengthsAndTruncation) {
  nlohmann::json m;
  // Three groups of 2: all 1, mixed, all 0.
  add_rollout_metrics(m, {1, 1, 1, 0, 0, 0}, {4, 2, 9, 1, 3, 5}, {false, false, true, false, false, true}, 2);
  EXPECT_DOUBLE_EQ(m["rollout/raw_reward"].get<double>(), 0.5);
  EXPECT_EQ(m["rollout/zero_std/count_1.0"], 1);
  EXPECT_EQ(m["rollout/zero_std/count_0.0"], 1);
  EXPECT_FALSE(m.contains("rollout/zero_std/count_0.5"));
  EXPECT_DOUBLE_EQ(m["rollout/zero_std_ratio"].get<double>(), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(m["rollout/response_len/mean"].get<double>(), 4.0);
  EXPECT_DOUBLE_EQ(m["rollout/response_len/median"].get<double>(), 3.5);
  EXPECT_EQ(m["rollout/response_len/min"], 1);
  EXPECT_EQ(m["rollout/response_len/max"], 9);
  EXPECT_NEAR(m["rollout/response_len/std"].get<double>(), std::sqrt((0 + 4 + 25 + 9 + 1 + 1) / 6.0), 1e-12);
  EXPECT_DOUBLE_EQ(m["rollout/truncated_ratio"].get<double>(), 1.0 / 3.0);
  EXPECT_EQ(python_float_text(-1.0f), "-1.0");
  EXPECT_EQ(python_float_text(0.25f), "0.25");
}

TEST(RolloutMetrics, EveryRlStepLogsThemConsistently) {
  testing::TempDir dir("rollout_metrics");
  TrainConfig c = testing::tiny_run(dir, "m");
  run_training(c);
  int steps = 0;
  for (const auto& m : testing::read_metrics(c)) {
    if (!m.contains("step")) continue;
    ++steps;
    EXPECT_EQ(m["rollout/raw_reward"], m["rollout/rewards"]);
    EXPECT_EQ(m["rollout/truncated_ratio"], m["rollout/truncated"]);
    EXPECT_DOUBLE_EQ(m["rollout/response_len/mean"].get<double>(), m["rollout/response_lengths"].get<double>());
    int64_t flat = 0;
    for (const auto& [key, value] : m.items())
      if (key.rfind("rollout/zero_std/count_", 0) == 0) flat += value.get<int64_t>();
    EXPECT_DOUBLE_EQ(m["rollout/zero_std_ratio"].get<double>(), double(flat) / double(c.rollout_batch_size));
  }
  EXPECT_EQ(steps, 3);
}

}  // namespace
}  // namespace lockstep::rl
