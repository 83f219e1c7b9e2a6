// `lockstep score` end to end: output format, round-trip of fp32 values, and bad input.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/safetensors.h"
#include "model/qwen3_moe.h"
#include "run_command.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;
using testing::run_lockstep;

const std::string kModel = std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe";

struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name)
      : path(fs::temp_directory_path() / ("lockstep_cli_" + name + "_" + std::to_string(::getpid()))) {
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  std::string file(const std::string& n) const { return (path / n).string(); }
};

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

TEST(ScoreCli, PrintsLogprobsThatRoundTripToTheLibraryBits) {
  TempDir tmp("score");
  write_text(tmp.file("in.jsonl"), "{\"input_ids\":[1,2,3,4,5,6]}\n{\"input_ids\":[7]}\n{\"input_ids\":[9,8,7,6]}\n");
  for (std::string dtype : {"float32", "bfloat16"}) {
    auto r = run_lockstep("score --model " + kModel + " --input " + tmp.file("in.jsonl") + " --output " +
                          tmp.file("out.jsonl") + " --dtype " + dtype);
    ASSERT_EQ(r.status, 0) << r.output;
    auto lines = read_lines(tmp.file("out.jsonl"));
    ASSERT_EQ(lines.size(), 3u);
    Precision p = precision_from_name(dtype);
    Qwen3Moe model(ModelWeights::load(kModel, p), p);
    auto expected = score_sequences(model, {{1, 2, 3, 4, 5, 6}, {7}, {9, 8, 7, 6}});
    for (size_t i = 0; i < 3; ++i) {
      auto j = nlohmann::json::parse(lines[i]);
      std::vector<float> got;
      for (const auto& v : j["logprobs"]) got.push_back(v.get<float>());
      ASSERT_EQ(got.size(), expected[i].size());
      EXPECT_EQ(std::memcmp(got.data(), expected[i].data(), got.size() * 4), 0) << dtype << " line " << i;
    }
  }
}

TEST(ScoreCli, TokenIdOutOfRangeIsRefusedWithLineAndField) {
  TempDir tmp("range");
  write_text(tmp.file("in.jsonl"), "{\"input_ids\":[1,2]}\n{\"input_ids\":[1,512]}\n");
  auto r = run_lockstep("score --model " + kModel + " --input " + tmp.file("in.jsonl") + " --output -");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find(":2: input_ids[1] = 512 is out of range"), std::string::npos) << r.output;
}

TEST(ScoreCli, BadJsonAndMissingFieldAreRefused) {
  TempDir tmp("json");
  write_text(tmp.file("a.jsonl"), "{\"input_ids\":[1,2]\n");
  auto r = run_lockstep("score --model " + kModel + " --input " + tmp.file("a.jsonl"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("not valid JSON"), std::string::npos) << r.output;
  write_text(tmp.file("b.jsonl"), "{\"ids\":[1,2]}\n");
  r = run_lockstep("score --model " + kModel + " --input " + tmp.file("b.jsonl"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("missing field 'input_ids'"), std::string::npos) << r.output;
}

// A model directory with one thing broken at a time: each is a clear error, never a crash.
TEST(ScoreCli, DamagedModelDirectoriesAreRefused) {
  TempDir tmp("model");
  write_text(tmp.file("in.jsonl"), "{\"input_ids\":[1,2,3]}\n");
  auto make_model = [&](const std::string& name) {
    fs::path dir = tmp.path / name;
    fs::create_directories(dir);
    fs::copy_file(kModel + "/config.json", dir / "config.json");
    fs::copy_file(kModel + "/model.safetensors", dir / "model.safetensors");
    return dir;
  };
  auto score = [&](const fs::path& dir) {
    return run_lockstep("score --model " + dir.string() + " --input " + tmp.file("in.jsonl"));
  };
  // Truncated weights file.
  fs::path trunc = make_model("trunc");
  fs::resize_file(trunc / "model.safetensors", 1000);
  auto r = score(trunc);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("past the end"), std::string::npos) << r.output;
  // Config missing a field.
  fs::path cfg = make_model("cfg");
  auto j = nlohmann::json::parse(std::ifstream(cfg / "config.json"));
  j.erase("num_hidden_layers");
  std::ofstream(cfg / "config.json") << j.dump();
  r = score(cfg);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("missing required field 'num_hidden_layers'"), std::string::npos) << r.output;
  // Missing tensor, and a tensor of the wrong shape / dtype.
  auto rewrite = [&](const std::string& name, auto edit) {
    fs::path dir = make_model(name);
    auto reader = SafetensorsReader::open((fs::path(kModel) / "model.safetensors").string());
    std::map<std::string, Tensor> tensors;
    for (const auto& n : reader.names()) tensors[n] = reader.get(n).clone();
    edit(tensors);
    write_safetensors((dir / "model.safetensors").string(), tensors);
    return dir;
  };
  r = score(rewrite("missing", [](auto& t) { t.erase("model.layers.1.mlp.experts.3.up_proj.weight"); }));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"), std::string::npos)
      << r.output;
  r = score(rewrite("shape", [](auto& t) { t["model.norm.weight"] = Tensor::zeros({63}, DType::bf16); }));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("'model.norm.weight' has shape [63], expected [64]"), std::string::npos) << r.output;
  r = score(rewrite("dtype", [](auto& t) { t["model.norm.weight"] = Tensor::zeros({64}, DType::i32); }));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("'model.norm.weight' has dtype I32"), std::string::npos) << r.output;
  // Not a directory at all.
  r = score(tmp.path / "nope");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("config.json: cannot open the model config"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace lockstep
