// The rollout engine's topology keys (rollout-*) and the weight sync's bucket size: TOML
// keys and flags, refused before any work when out of range, and not run-defining (a
// checkpoint's config is the same whatever they are).
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "core/error.h"
#include "rl/train_config.h"
#include "rl/trainer.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

using testing::TempDir;

std::string error_of(const TrainConfig& c) {
  try {
    validate(c);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(RolloutTopologyConfig, TomlKeysAndFlags) {
  TempDir dir("rollout_keys");
  const std::string p = dir.sub("a.toml");
  std::ofstream(p) << "rollout-tensor-model-parallel-size = 2\nrollout_sequence_parallel = true\n"
                      "rollout-pipeline-model-parallel-size = 2\nrollout-expert-model-parallel-size = 4\n"
                      "rollout-expert-tensor-parallel-size = 2\nweight-sync-bucket-mb = 0.5\n";
  TrainConfig c;
  apply_toml_file(c, p);
  EXPECT_EQ(c.rollout_tensor_model_parallel_size, 2);
  EXPECT_TRUE(c.rollout_sequence_parallel);
  EXPECT_EQ(c.rollout_pipeline_model_parallel_size, 2);
  EXPECT_EQ(c.rollout_expert_model_parallel_size, 4);
  EXPECT_EQ(c.rollout_expert_tensor_parallel_size, 2);
  EXPECT_EQ(c.weight_sync_bucket_mb, 0.5);
  apply_flag(c, "rollout-expert-model-parallel-size", "8");
  apply_flag(c, "weight-sync-bucket-mb", "64");
  EXPECT_EQ(c.rollout_expert_model_parallel_size, 8);
  EXPECT_EQ(c.weight_sync_bucket_mb, 64.0);
  const TrainConfig defaults;
  EXPECT_EQ(defaults.rollout_tensor_model_parallel_size, 1);  // default: a single-rank engine
  EXPECT_EQ(defaults.rollout_expert_model_parallel_size, 1);
}

TEST(RolloutTopologyConfig, OutOfRangeValuesNameTheKey) {
  TrainConfig c;
  c.rollout_pipeline_model_parallel_size = 0;
  EXPECT_NE(error_of(c).find("--rollout-pipeline-model-parallel-size"), std::string::npos) << error_of(c);
  c = TrainConfig{};
  c.rollout_expert_tensor_parallel_size = -1;
  EXPECT_NE(error_of(c).find("--rollout-expert-tensor-parallel-size"), std::string::npos) << error_of(c);
  for (double mb : {0.0, -1.0}) {
    c = TrainConfig{};
    c.weight_sync_bucket_mb = mb;
    EXPECT_NE(error_of(c).find("--weight-sync-bucket-mb"), std::string::npos) << error_of(c);
  }
}

// The bucket size changes no number: the checkpoint's config and weights are the same bytes.
TEST(RolloutTopologyConfig, BucketSizeIsNotRunDefining) {
  TempDir dir("bucket_not_run_defining");
  std::vector<std::string> configs, models;
  for (double mb : {64.0, 0.001}) {
    const std::string tag = mb > 1 ? "big" : "small";
    TrainConfig c = testing::tiny_run(dir, tag);
    c.num_rollout = 1;
    c.weight_sync_bucket_mb = mb;
    c.save = dir.sub(tag + "_ck");
    run_training(c);
    configs.push_back(read_text(c.save + "/iter_0000001/train_config.toml"));
    models.push_back(read_text(c.save + "/iter_0000001/model.safetensors"));
  }
  EXPECT_FALSE(configs[0].empty());
  EXPECT_EQ(configs[0], configs[1]);
  EXPECT_FALSE(models[0].empty());
  EXPECT_TRUE(models[0] == models[1]);
}

}  // namespace
}  // namespace lockstep::rl
