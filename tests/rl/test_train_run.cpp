// The RL loop end to end on tiny runs: true on-policy (abs_diff exactly 0) in both recipes,
// run-to-run determinism, bit-exact resume, NaN handling and loadable checkpoints.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "rl/train_checkpoint.h"
#include "rl/trainer.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::read_metrics;
using testing::TempDir;
using testing::tiny_run;
using testing::without_perf;

std::vector<nlohmann::json> rl_steps(const std::vector<nlohmann::json>& records) {
  std::vector<nlohmann::json> out;
  for (const auto& r : records)
    if (r.contains("step")) out.push_back(r);
  return out;
}

// Every file of a checkpoint directory, by name.
std::map<std::string, std::string> files_of(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_bytes(e.path());
  return out;
}

class RlRecipes : public ::testing::TestWithParam<std::string> {};

TEST_P(RlRecipes, TrainerLogprobsEqualRolloutLogprobsOnEveryStep) {
  TempDir dir("onpolicy");
  for (bool use_rollout : {false, true}) {
    TrainConfig c = tiny_run(dir, "run" + std::to_string(use_rollout));
    c.dtype = GetParam();
    c.use_rollout_logprobs = use_rollout;
    c.entropy_coef = 0.01;  // a non-zero gradient even when every reward is 0: the weights move
    TrainSummary s = run_training(c);
    EXPECT_EQ(s.steps_run, 3);
    auto steps = rl_steps(read_metrics(c));
    ASSERT_EQ(steps.size(), 3u);
    for (const auto& m : steps) {
      EXPECT_EQ(m["train/train_rollout_logprob_abs_diff"].get<double>(), 0.0) << m;
      EXPECT_EQ(m["train/train_rollout_kl"].get<double>(), 0.0) << m;
      for (const char* key : {"train/loss", "train/pg_loss", "train/pg_clipfrac", "train/ppo_kl", "train/entropy_loss",
                              "train/kl_loss", "train/grad_norm", "rollout/rewards", "rollout/response_lengths",
                              "rollout/truncated", "rollout/weight_version/mixed_version_ratio", "perf/rollout_time",
                              "perf/log_probs_time", "perf/actor_train_time", "perf/update_weights_time",
                              "perf/step_time", "perf/tokens_per_gpu_per_sec"})
        EXPECT_TRUE(m.contains(key) && std::isfinite(m[key].get<double>())) << key;
      EXPECT_GT(m["train/grad_norm"].get<double>(), 0.0);
      EXPECT_EQ(m["rollout/weight_version/mixed_version_ratio"].get<double>(), 0.0);
    }
    // Versions: 1 after the SFT warmup, then one bump per RL step.
    EXPECT_EQ(steps[0]["rollout/weight_version"].get<int64_t>(), 2);
    EXPECT_TRUE(fs::exists(fs::path(c.output_dir) / "train.png"));
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, RlRecipes, ::testing::Values("float32", "bfloat16"));

TEST(RlRun, LossVariantsStayOnPolicy) {
  TempDir dir("variants");
  struct Variant {
    std::string estimator, agg, kl;
    double kl_coef, entropy_coef, clip_c;
  };
  for (const Variant& v : {Variant{"gspo", "seq_mean_token_mean", "k3", 0.05, 0.01, 0.0},
                           Variant{"dr_grpo", "seq_mean_token_sum", "low_var_kl", 0.1, 0.0, 3.0},
                           Variant{"reinforce_plus_plus", "token_mean", "k2", 0.0, 0.02, 0.0}}) {
    TrainConfig c = tiny_run(dir, v.estimator);
    c.num_rollout = 2;
    c.advantage_estimator = v.estimator;
    c.loss_agg = v.agg;
    c.kl_loss_type = v.kl;
    c.kl_loss_coef = v.kl_coef;
    c.entropy_coef = v.entropy_coef;
    c.eps_clip_c = v.clip_c;
    run_training(c);
    for (const auto& m : rl_steps(read_metrics(c))) {
      EXPECT_EQ(m["train/train_rollout_logprob_abs_diff"].get<double>(), 0.0) << v.estimator;
      EXPECT_TRUE(std::isfinite(m["train/loss"].get<double>())) << v.estimator;
      if (v.kl_coef != 0 && m["step"] == 1) {
        EXPECT_EQ(m["train/kl_loss"].get<double>(), 0.0);  // policy == reference
      }
    }
  }
}

TEST(RlRun, SameConfigTwiceGivesIdenticalMetricsAndCheckpoints) {
  TempDir dir("determinism");
  TrainConfig a = tiny_run(dir, "a"), b = tiny_run(dir, "b");
  a.dtype = b.dtype = "bfloat16";
  a.kl_loss_coef = b.kl_loss_coef = 0.05;
  a.save = dir.sub("save_a");
  b.save = dir.sub("save_b");
  a.save_interval = b.save_interval = 1;
  run_training(a);
  run_training(b);
  EXPECT_EQ(without_perf(read_metrics(a)), without_perf(read_metrics(b)));
  for (int step = 1; step <= 3; ++step) {
    auto fa = files_of(checkpoint_dir(a.save, step)), fb = files_of(checkpoint_dir(b.save, step));
    ASSERT_EQ(fa.size(), 6u);  // model, config, optimizer, reference, state, run config
    EXPECT_TRUE(fa == fb) << "step " << step;
  }
}

TEST(RlRun, StopAndResumeIsBitIdenticalToAnUninterruptedRun) {
  TempDir dir("resume");
  TrainConfig full = tiny_run(dir, "full"), part = tiny_run(dir, "part");
  full.num_rollout = part.num_rollout = 4;
  full.kl_loss_coef = part.kl_loss_coef = 0.05;
  full.lr_decay_style = part.lr_decay_style = "cosine";
  full.lr_decay_iters = part.lr_decay_iters = 8;
  full.save = dir.sub("save_full");
  part.save = dir.sub("save_part");
  full.save_interval = part.save_interval = 2;
  run_training(full);
  part.debug_stop_after = 2;  // as if the process were killed after step 2's checkpoint
  EXPECT_EQ(run_training(part).steps_run, 2);
  EXPECT_FALSE(fs::exists(checkpoint_dir(part.save, 4)));
  part.debug_stop_after = -1;
  part.resume = true;
  EXPECT_EQ(run_training(part).steps_run, 2);
  EXPECT_EQ(without_perf(read_metrics(full)), without_perf(read_metrics(part)));
  EXPECT_TRUE(files_of(checkpoint_dir(full.save, 4)) == files_of(checkpoint_dir(part.save, 4)));
}

TEST(RlRun, NanGradientStopsTheStepWithoutACheckpoint) {
  TempDir dir("nan");
  TrainConfig c = tiny_run(dir, "nan");
  c.save = dir.sub("save");
  c.save_interval = 1;
  c.debug_inject_nan_step = 2;
  try {
    run_training(c);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("step 2"), std::string::npos) << msg;
    EXPECT_NE(msg.find("non-finite gradient in tensor "), std::string::npos) << msg;
    EXPECT_NE(msg.find("lm_head.weight"), std::string::npos) << msg;  // the first tensor by name
  }
  EXPECT_TRUE(fs::exists(checkpoint_dir(c.save, 1)));
  EXPECT_FALSE(fs::exists(checkpoint_dir(c.save, 2)));
  EXPECT_FALSE(fs::exists(checkpoint_dir(c.save, 2) + ".tmp"));
  EXPECT_EQ(latest_train_checkpoint(c.save), checkpoint_dir(c.save, 1));
  EXPECT_EQ(rl_steps(read_metrics(c)).size(), 1u);
}

TEST(RlRun, CheckpointLoadsWithLockstepScore) {
  TempDir dir("score");
  TrainConfig c = tiny_run(dir, "score");
  c.num_rollout = 1;
  c.save = dir.sub("save");
  run_training(c);
  std::string ckpt = checkpoint_dir(c.save, 1);
  std::ofstream(dir.sub("in.jsonl")) << "{\"input_ids\":[1,15,4,5,6,3,6,5,4,2]}\n";
  std::string cmd = std::string(LOCKSTEP_BINARY) + " score --model " + ckpt + " --input " + dir.sub("in.jsonl") +
                    " --output " + dir.sub("out.jsonl");
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  auto out = nlohmann::json::parse(read_bytes(dir.sub("out.jsonl")));
  EXPECT_EQ(out["logprobs"].size(), 9u);
}

}  // namespace
}  // namespace lockstep::rl
