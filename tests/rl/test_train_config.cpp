// lockstep train configuration: TOML keys, flags, and clear errors before any work.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/device_memory.h"
#include "core/error.h"
#include "rl/train_config.h"
#include "rl/trainer.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

using testing::error_of;
using testing::TempDir;

std::string write_file(const TempDir& dir, const std::string& name, const std::string& text) {
  std::string p = dir.sub(name);
  std::ofstream(p) << text;
  return p;
}

TEST(RlConfig, TomlKeysAndFlags) {
  TempDir dir("config");
  std::string p = write_file(dir, "a.toml",
                             "n-samples-per-prompt = 4\nrollout_batch_size = 8\nlr = 1\neps-clip = 0.1\n"
                             "task = \"sort\"\nuse-rollout-logprobs = true\n");
  TrainConfig c;
  apply_toml_file(c, p);
  EXPECT_EQ(c.n_samples_per_prompt, 4);
  EXPECT_EQ(c.rollout_batch_size, 8);
  EXPECT_EQ(c.lr, 1.0);  // an integer is accepted for a number
  EXPECT_EQ(c.eps_clip, 0.1);
  EXPECT_EQ(c.task, "sort");
  EXPECT_TRUE(c.use_rollout_logprobs);
  apply_flag(c, "eps-clip-high", "0.3");
  apply_flag(c, "use-rollout-logprobs", "false");
  EXPECT_EQ(c.eps_clip_high, 0.3);
  EXPECT_FALSE(c.use_rollout_logprobs);
}

TEST(RlConfig, UnknownKeysAndWrongTypesNameTheKey) {
  TempDir dir("config");
  TrainConfig c;
  std::string e = error_of([&] { apply_toml_file(c, write_file(dir, "u.toml", "n-samples = 4\n")); });
  EXPECT_NE(e.find("unknown key 'n-samples'"), std::string::npos) << e;
  e = error_of([&] { apply_toml_file(c, write_file(dir, "t.toml", "global-batch-size = \"big\"\n")); });
  EXPECT_NE(e.find("global-batch-size"), std::string::npos) << e;
  EXPECT_NE(e.find("expected an integer, found a string"), std::string::npos) << e;
  e = error_of([&] { apply_toml_file(c, write_file(dir, "f.toml", "global-batch-size = 2.5\n")); });
  EXPECT_NE(e.find("expected an integer"), std::string::npos) << e;
  e = error_of([&] { apply_toml_file(c, write_file(dir, "s.toml", "lr = = 1\n")); });
  EXPECT_NE(e.find("TOML syntax error"), std::string::npos) << e;
  e = error_of([&] { apply_flag(c, "num-rollout", "ten"); });
  EXPECT_NE(e.find("--num-rollout: expected an integer, got 'ten'"), std::string::npos) << e;
  EXPECT_THROW(apply_flag(c, "check-true-on-policy", "yes"), Error);
  EXPECT_THROW(apply_toml_file(c, dir.sub("missing.toml")), Error);
}

// --sft-global-batch-size: the SFT warm start's own batch (0: --global-batch-size). Its steps are
// the steps of a run whose global batch is that size, bit for bit, and not those of the RL batch.
TEST(RlConfig, SftGlobalBatchSizeSetsTheWarmStartBatch) {
  TempDir dir("config");
  TrainConfig c;
  apply_toml_file(c, write_file(dir, "b.toml", "sft-global-batch-size = 8\n"));
  EXPECT_EQ(c.sft_global_batch_size, 8);
  apply_flag(c, "sft-global-batch-size", "4");
  EXPECT_EQ(c.sft_global_batch_size, 4);
  EXPECT_NE(error_of([&] { apply_flag(c, "sft-global-batch-size", "eight"); }).find("--sft-global-batch-size"),
            std::string::npos);
  auto sft_records = [&](const std::string& name, int64_t global, int64_t sft) {
    TrainConfig r = testing::tiny_run(dir, name);
    r.num_rollout = 0;  // the warm start only
    r.sft_warmup_steps = 3;
    r.global_batch_size = global;  // 16 samples per rollout: 4 or 8 divide them
    r.sft_global_batch_size = sft;
    run_training(r);
    std::vector<std::pair<double, double>> out;  // (loss, grad_norm) by SFT step
    for (const auto& m : testing::read_metrics(r))
      if (m.contains("sft_step"))
        out.emplace_back(m["train/sft_loss"].get<double>(), m["train/grad_norm"].get<double>());
    return out;
  };
  const auto small = sft_records("sft4", 8, 4), plain = sft_records("global4", 4, 0),
             big = sft_records("global8", 8, 0);
  ASSERT_EQ(small.size(), 3u);
  EXPECT_EQ(small, plain);
  EXPECT_NE(small, big);
}

TEST(RlConfig, SftGlobalBatchSizeRefusesBadValues) {
  TempDir dir("config");
  TrainConfig c = testing::tiny_run(dir, "bad");
  c.sft_global_batch_size = -2;
  std::string e = error_of([&] { run_training(c); });
  EXPECT_NE(e.find("--sft-global-batch-size: expected >= 0"), std::string::npos) << e;
  c.sft_global_batch_size = 3;  // --num-microbatches 2
  e = error_of([&] { run_training(c); });
  EXPECT_NE(e.find("--sft-global-batch-size 3 is not a multiple of --num-microbatches 2"), std::string::npos) << e;
  EXPECT_FALSE(std::filesystem::exists(c.output_dir)) << "work started before the check";
}

TEST(RlConfig, RecomputeNumLayersIsRefusedOutOfRangeOrOnTheCpu) {
  TempDir dir("config");
  TrainConfig c = testing::tiny_run(dir, "bad");
  c.recompute_num_layers = -2;
  std::string e = error_of([&] { run_training(c); });
  EXPECT_NE(e.find("--recompute-num-layers: expected -1 (as few as the memory allows) or a count >= 0, got -2"),
            std::string::npos)
      << e;
  c.recompute_num_layers = 1;  // device cpu
  e = error_of([&] { run_training(c); });
  EXPECT_NE(e.find("--recompute-num-layers: the CPU trainer recomputes every layer"), std::string::npos) << e;
  EXPECT_FALSE(std::filesystem::exists(c.output_dir)) << "work started before the check";
}

TEST(RlConfig, InconsistentValuesFailBeforeAnyWork) {
  TempDir dir("config");
  TrainConfig c = testing::tiny_run(dir, "bad");
  c.global_batch_size = 5;  // 16 samples per rollout
  std::string e = error_of([&] { run_training(c); });
  EXPECT_NE(e.find("batch does not divide"), std::string::npos) << e;
  EXPECT_FALSE(std::filesystem::exists(c.output_dir)) << "work started before the check";
  c = testing::tiny_run(dir, "bad");
  c.num_microbatches = 3;
  EXPECT_NE(error_of([&] { run_training(c); }).find("power of two"), std::string::npos);
  c = testing::tiny_run(dir, "bad");
  c.kl_loss_coef = 0.1;
  c.ref_load = dir.sub("no_such_model");
  e = error_of([&] { run_training(c); });
  EXPECT_NE(e.find("--ref-load"), std::string::npos) << e;
  EXPECT_NE(e.find("reference model not found"), std::string::npos) << e;
  c = testing::tiny_run(dir, "bad");
  c.rollout_temperature = 0.7;  // rollout log-probs would be of softmax(logits / T)
  EXPECT_NE(error_of([&] { run_training(c); }).find("--check-true-on-policy"), std::string::npos);
  c = testing::tiny_run(dir, "bad");
  c.advantage_estimator = "ppo";
  EXPECT_NE(error_of([&] { run_training(c); }).find("--advantage-estimator"), std::string::npos);
  c = testing::tiny_run(dir, "bad");
  c.resume = true;
  c.save = dir.sub("empty_save");
  EXPECT_NE(error_of([&] { run_training(c); }).find("no checkpoint"), std::string::npos);
  EXPECT_FALSE(std::filesystem::exists(c.output_dir));
  // The GPU trainer: the bfloat16 recipe on one GPU, or a clear refusal.
  c = testing::tiny_run(dir, "bad");
  c.device = "cuda";
  EXPECT_NE(error_of([&] { run_training(c); }).find("bfloat16 recipe only"), std::string::npos);
  c.device = "tpu";
  EXPECT_NE(error_of([&] { run_training(c); }).find("--device: expected 'cpu' or 'cuda'"), std::string::npos);
  if (!cuda_available()) {
    c.device = "cuda";
    c.dtype = "bfloat16";
    EXPECT_NE(error_of([&] { run_training(c); }).find("no CUDA device"), std::string::npos);
  }
  EXPECT_FALSE(std::filesystem::exists(c.output_dir));
}

TEST(RlConfig, ConfigRoundTripsThroughToml) {
  TempDir dir("config");
  TrainConfig c;
  c.task = "add";
  c.lr = 0.125;
  c.check_true_on_policy = false;
  std::string p = write_file(dir, "rt.toml", to_toml(c));
  TrainConfig d;
  apply_toml_file(d, p);
  EXPECT_EQ(to_toml(d), to_toml(c));
}

TEST(RlConfig, CommandLineReportsBadConfigAndExitsNonZero) {
  TempDir dir("config");
  std::string p = write_file(dir, "bad.toml", "not-a-key = 1\n");
  std::string cmd = std::string(LOCKSTEP_BINARY) + " train --config " + p + " 2>" + dir.sub("err.txt");
  int rc = std::system(cmd.c_str());
  EXPECT_NE(rc, 0);
  std::string err = testing::read_bytes(dir.sub("err.txt"));
  EXPECT_NE(err.find("unknown key 'not-a-key'"), std::string::npos) << err;
}

// Every integer option at an absurd size and every real option at NaN or infinity is
// refused by name before any option-specific check could misuse it.
TEST(RlConfig, EveryNumberOptionIsRangeChecked) {
  for (const auto& o : train_options()) {
    for (double bad : {std::nan(""), HUGE_VAL, -HUGE_VAL}) {
      TrainConfig c;
      if (auto* member = std::get_if<int64_t TrainConfig::*>(&o.field)) {
        if (o.name == "seed" || o.name == "model-seed") continue;
        c.** member = bad > 0 ? int64_t(1) << 62 : std::numeric_limits<int64_t>::min();
        EXPECT_EQ(testing::error_of([&] { validate(c); }).rfind("--" + o.name + ": ", 0), 0u) << o.name;
        EXPECT_NE(testing::error_of([&] { validate(c); }).find("absurdly large"), std::string::npos) << o.name;
      } else if (auto* real = std::get_if<double TrainConfig::*>(&o.field)) {
        c.** real = bad;
        EXPECT_EQ(testing::error_of([&] { validate(c); }),
                  "--" + o.name + ": expected a finite number, got " + (std::ostringstream() << bad).str())
            << o.name;
      }
    }
  }
}

}  // namespace
}  // namespace lockstep::rl
