// `lockstep train --device cuda`: the rollout engine and the trainer on one GPU sharing the
// runner's weights. The trainer's log-probs equal the rollout's on every step (abs_diff
// exactly 0), the trainer learns (the SFT loss falls: each step writes the runner's weights;
// the default job reaches the CPU run's reward), and a run repeated gives the same metrics and
// checkpoint.
#include <cmath>
#include <vector>

#include "../rl/rl_test_util.h"
#include "cuda_test_util.h"
#include "rl/trainer.h"

namespace lockstep::rl {
namespace {

using testing::read_bytes;
using testing::read_metrics;
using testing::TempDir;
using testing::tiny_run;
using testing::without_perf;

TrainConfig gpu_run(const TempDir& dir, const std::string& name) {
  TrainConfig c = tiny_run(dir, name);
  c.device = "cuda";
  c.dtype = "bfloat16";
  c.entropy_coef = 0.01;  // a gradient even when every reward is 0: the weights move
  c.save = dir.sub(name + "_save");
  c.save_interval = 3;
  c.sft_warmup_steps = 6;
  return c;
}

TEST(CudaTrain, TrulyOnPolicyOnEveryStepAndRepeatable) {
  LS_SKIP_WITHOUT_GPU();
  TempDir dir("cuda_train");
  TrainConfig a = gpu_run(dir, "a"), b = gpu_run(dir, "b");
  TrainSummary s = run_training(a);
  EXPECT_EQ(s.steps_run, 3);
  EXPECT_EQ(s.max_abs_diff, 0.0);
  const auto metrics = read_metrics(a);
  std::vector<double> sft_loss;
  for (const auto& m : metrics)
    if (m.contains("train/sft_loss")) sft_loss.push_back(m["train/sft_loss"].get<double>());
  ASSERT_EQ(sft_loss.size(), 6u);
  EXPECT_LT(sft_loss.back(), sft_loss.front() - 0.3) << "the SFT steps did not move the trainer's weights";
  int rl_steps = 0;
  for (const auto& m : metrics) {
    if (!m.contains("step")) continue;
    ++rl_steps;
    EXPECT_EQ(m["train/train_rollout_logprob_abs_diff"].get<double>(), 0.0) << m;
    EXPECT_GT(m["train/grad_norm"].get<double>(), 0.0) << m;
    EXPECT_TRUE(std::isfinite(m["train/loss"].get<double>())) << m;
    // The fixture fits batch by batch with every layer's activations kept.
    EXPECT_EQ(m["perf/layer_major_microbatches"].get<int>(), 0) << m;
    EXPECT_EQ(m["perf/recomputed_layers"].get<int>(), 0) << m;
  }
  EXPECT_EQ(rl_steps, 3);
  run_training(b);
  EXPECT_EQ(without_perf(read_metrics(b)), without_perf(metrics));
  const auto last = [](const TrainConfig& c) { return std::filesystem::path(c.save) / "iter_0000003"; };
  for (const char* f : {"model.safetensors", "optimizer.safetensors"})
    EXPECT_EQ(read_bytes(last(a) / f), read_bytes(last(b) / f)) << f;
}

TEST(CudaTrain, StopAndResumeIsBitIdenticalAndANanGradientStopsTheStep) {
  LS_SKIP_WITHOUT_GPU();
  TempDir dir("cuda_resume");
  TrainConfig full = gpu_run(dir, "full"), part = gpu_run(dir, "part");
  full.num_rollout = part.num_rollout = 4;
  full.save_interval = part.save_interval = 2;
  run_training(full);
  part.debug_stop_after = 2;  // as if the process were killed after step 2's checkpoint
  EXPECT_EQ(run_training(part).steps_run, 2);
  part.debug_stop_after = -1;
  part.resume = true;
  EXPECT_EQ(run_training(part).steps_run, 2);
  EXPECT_EQ(without_perf(read_metrics(full)), without_perf(read_metrics(part)));
  const auto last = [](const TrainConfig& c) { return std::filesystem::path(c.save) / "iter_0000004"; };
  for (const char* f : {"model.safetensors", "optimizer.safetensors"})
    EXPECT_EQ(read_bytes(last(full) / f), read_bytes(last(part) / f)) << f;

  TrainConfig nan = gpu_run(dir, "nan");
  nan.debug_inject_nan_step = 2;
  const std::string e = testing::error_of([&] { run_training(nan); });
  EXPECT_NE(e.find("step 2"), std::string::npos) << e;
  EXPECT_NE(e.find("non-finite gradient in tensor "), std::string::npos) << e;
}

// The default job (`lockstep train --device cuda --dtype bfloat16`) reaches the reward the CPU's
// bfloat16 run of the same job reaches. The two backends' bits differ (docs/numerics.md), so
// their trajectories do; over the last 50 of the 200 RL steps the means are compared, each
// run on-policy bit for bit on every step.
TEST(CudaTrain, TheDefaultJobReachesTheRewardOfTheCpuRun) {
  LS_SKIP_WITHOUT_GPU();
  TempDir dir("cuda_default_job");
  double last[2] = {0, 0};
  for (const bool gpu : {false, true}) {
    TrainConfig c;  // the embedded default
    c.dtype = "bfloat16";
    c.device = gpu ? "cuda" : "cpu";
    c.output_dir = dir.sub(c.device);
    c.progress = false;
    const TrainSummary summary = run_training(c);
    EXPECT_EQ(summary.steps_run, 200) << c.device;
    EXPECT_EQ(summary.max_abs_diff, 0.0) << c.device;
    const std::vector<double> reward = testing::step_rewards(read_metrics(c));
    ASSERT_EQ(reward.size(), 200u) << c.device;
    last[gpu] = testing::mean_of(reward, 150, 200);
  }
  EXPECT_GE(last[0], 0.9) << "the CPU run, mean reward of RL steps 151-200";
  EXPECT_GE(last[1], last[0] - 0.05) << "the GPU run against the CPU run's " << last[0];
}

}  // namespace
}  // namespace lockstep::rl
