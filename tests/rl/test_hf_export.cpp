// --save-hf: Hugging Face model directories (sharded with an index past the shard size, with the
// tokenizer files) that load back bit for bit and score like the run's own checkpoint.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <set>

#include "checkpoint/hf_export.h"
#include "model/weights.h"
#include "rl/tiny_model.h"
#include "rl/train_checkpoint.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::TempDir;

std::map<std::string, Tensor> tensors_of(const ModelWeights& w) {
  std::map<std::string, Tensor> out;
  for (const auto& [name, t] : w.named()) out[name] = *t;
  return out;
}

void expect_same_weights(const ModelWeights& a, const ModelWeights& b) {
  auto ta = tensors_of(a), tb = tensors_of(b);
  ASSERT_EQ(ta.size(), tb.size());
  for (const auto& [name, t] : ta) {
    ASSERT_TRUE(tb.count(name)) << name;
    ASSERT_EQ(t.nbytes(), tb.at(name).nbytes()) << name;
    EXPECT_EQ(std::memcmp(t.data<float>(), tb.at(name).data<float>(), t.nbytes()), 0) << name;
  }
}

TEST(HfExport, ShardsPastTheLimitWithAnIndexAndLoadsBack) {
  TempDir dir("hf_export");
  const ModelWeights w = ModelWeights::random(tiny_task_model_config(), 3, Precision::float32);
  const auto tensors = tensors_of(w);
  int64_t total = 0, largest = 0;
  for (const auto& [name, t] : tensors) total += int64_t(t.nbytes()), largest = std::max(largest, int64_t(t.nbytes()));
  const std::string sharded = dir.sub("sharded");
  write_hf_model(sharded, tensors, w.config.to_json().dump(), testing::fixture_tokenizer_dir(), largest * 2);
  EXPECT_FALSE(fs::exists(sharded + ".tmp"));
  EXPECT_FALSE(fs::exists(fs::path(sharded) / "model.safetensors"));
  const auto index = nlohmann::json::parse(read_bytes(fs::path(sharded) / "model.safetensors.index.json"));
  EXPECT_EQ(index["metadata"]["total_size"], total);
  EXPECT_EQ(index["weight_map"].size(), tensors.size());
  std::set<std::string> files;
  for (const auto& [name, file] : index["weight_map"].items()) files.insert(file.get<std::string>());
  EXPECT_GE(files.size(), 3u);
  for (const auto& f : files) {
    EXPECT_TRUE(fs::exists(fs::path(sharded) / f)) << f;
    EXPECT_LE(int64_t(fs::file_size(fs::path(sharded) / f)), largest * 2 + 16384) << f;  // + header
  }
  EXPECT_TRUE(files.count("model-00001-of-" + std::string(5 - std::to_string(files.size()).size(), '0') +
                          std::to_string(files.size()) + ".safetensors"));
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    EXPECT_EQ(read_bytes(fs::path(sharded) / f), read_bytes(fs::path(testing::fixture_tokenizer_dir()) / f)) << f;
  expect_same_weights(ModelWeights::load(sharded, Precision::float32), w);

  const std::string single = dir.sub("single");
  write_hf_model(single, tensors, w.config.to_json().dump());
  EXPECT_TRUE(fs::exists(fs::path(single) / "model.safetensors"));
  EXPECT_FALSE(fs::exists(fs::path(single) / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(fs::path(single) / "tokenizer.json"));
  expect_same_weights(ModelWeights::load(single, Precision::float32), w);
}

std::string score(const std::string& model, const std::string& input, const std::string& output) {
  const std::string cmd = std::string(LOCKSTEP_BINARY) + " score --dtype bfloat16 --model " + model + " --input " +
                          input + " --output " + output;
  EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd;
  return read_bytes(output);
}

TEST(HfExport, TrainingWritesSnapshotsThatScoreLikeItsCheckpoint) {
  TempDir dir("hf_train");
  TrainConfig c = testing::tiny_run(dir, "hf");
  c.dtype = "bfloat16";
  c.save = dir.sub("save");
  c.save_hf = dir.sub("hf");
  c.save_hf_interval = 2;
  run_training(c);  // 3 steps: snapshots at 2 and at the end
  EXPECT_TRUE(fs::exists(checkpoint_dir(c.save_hf, 2)));
  EXPECT_FALSE(fs::exists(checkpoint_dir(c.save_hf, 1)));
  const std::string last = checkpoint_dir(c.save_hf, 3);
  const auto config = nlohmann::json::parse(read_bytes(fs::path(last) / "config.json"));
  EXPECT_EQ(config["torch_dtype"], "bfloat16");
  EXPECT_EQ(config["model_type"], "qwen3_moe");
  std::ofstream(dir.sub("in.jsonl")) << "{\"input_ids\":[1,15,4,5,6,3,6,5,4,2]}\n";
  const std::string from_hf = score(last, dir.sub("in.jsonl"), dir.sub("hf.jsonl"));
  EXPECT_EQ(from_hf, score(checkpoint_dir(c.save, 3), dir.sub("in.jsonl"), dir.sub("ckpt.jsonl")));
  EXPECT_NE(from_hf, score(checkpoint_dir(c.save_hf, 2), dir.sub("in.jsonl"), dir.sub("hf2.jsonl")));
  EXPECT_EQ(nlohmann::json::parse(from_hf)["logprobs"].size(), 9u);
}

}  // namespace
}  // namespace lockstep::rl
