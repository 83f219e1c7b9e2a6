// `lockstep init`: a random-init model directory from a config.json, the weights train starts
// from, and refusals that name the flag at fault.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/thread_pool.h"
#include "model/weights.h"
#include "run_command.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;

const std::string kConfig = std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe/config.json";
const std::string kTokenizer = std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer";

struct InitDir {
  fs::path path = fs::temp_directory_path() / ("lockstep_cli_init_" + std::to_string(::getpid()));
  InitDir() { fs::create_directories(path); }
  ~InitDir() { fs::remove_all(path); }
  std::string file(const std::string& n) const { return (path / n).string(); }
};

nlohmann::json read_json(const std::string& path) { return nlohmann::json::parse(std::ifstream(path)); }

// `lockstep init` on 4 threads (so the larger tensors are split between them).
testing::CommandResult run_init(const std::string& args) {
  return testing::run_shell("LOCKSTEP_NUM_THREADS=4 " + std::string(LOCKSTEP_BINARY) + " init " + args);
}

// The directory holds ModelWeights::random's bits (train's initial weights for that seed),
// computed here on one thread: the init does not depend on the thread count.
void expect_random_init(const std::string& dir, const std::string& config, uint64_t seed, Precision p) {
  const ModelWeights got = ModelWeights::load(dir, p);
  set_num_threads(1);
  const ModelWeights want = ModelWeights::random(ModelConfig::load(config), seed, p);
  const auto got_named = got.named(), want_named = want.named();
  ASSERT_EQ(got_named.size(), want_named.size());
  for (const auto& [name, w] : want_named) {
    const Tensor* g = got_named.at(name);
    ASSERT_EQ(g->shape(), w->shape()) << name;
    EXPECT_EQ(std::memcmp(g->data<float>(), w->data<float>(), size_t(w->numel()) * 4), 0) << dir << " " << name;
  }
}

TEST(InitCli, WritesTrainsRandomInit) {
  InitDir tmp;
  for (std::string dtype : {"float32", "bfloat16"}) {
    const std::string out = tmp.file("model_" + dtype);
    auto r = run_init("--config " + kConfig + " --output " + out + " --model-seed 3 --dtype " + dtype);
    ASSERT_EQ(r.status, 0) << r.output;
    EXPECT_NE(r.output.find("lockstep init: wrote " + out), std::string::npos) << r.output;
    EXPECT_EQ(read_json(out + "/config.json")["torch_dtype"], dtype);
    EXPECT_FALSE(fs::exists(out + "/tokenizer.json"));
    expect_random_init(out, kConfig, 3, precision_from_name(dtype));
  }
  // Another seed, other weights.
  auto r = run_init("--config " + kConfig + " --output " + tmp.file("seed4") + " --model-seed 4");
  ASSERT_EQ(r.status, 0) << r.output;
  const auto a = ModelWeights::load(tmp.file("model_float32"), Precision::float32);
  const auto b = ModelWeights::load(tmp.file("seed4"), Precision::float32);
  EXPECT_NE(std::memcmp(a.embed.data<float>(), b.embed.data<float>(), size_t(a.embed.numel()) * 4), 0);
}

// A config with Qwen3's vocabulary takes the Qwen3 tokenizer, whose files are copied in; its
// 151936 x 64 embedding is split between the threads.
TEST(InitCli, CopiesTheTokenizerWhenItFitsTheVocabulary) {
  InitDir tmp;
  nlohmann::json config = read_json(kConfig);
  config["vocab_size"] = 151936;
  config["num_hidden_layers"] = 1;
  std::ofstream(tmp.file("config.json")) << config.dump(2);
  const std::string out = tmp.file("model");
  auto r = run_init("--config " + tmp.file("config.json") + " --output " + out + " --tokenizer " + kTokenizer +
                    " --dtype bfloat16");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(fs::is_regular_file(out + "/tokenizer.json"));
  EXPECT_TRUE(fs::is_regular_file(out + "/tokenizer_config.json"));
  EXPECT_EQ(read_json(out + "/config.json")["vocab_size"], 151936);
  EXPECT_EQ(read_json(out + "/config.json")["num_hidden_layers"], 1);
  expect_random_init(out, tmp.file("config.json"), 7, Precision::bfloat16);  // train's default seed
  r = testing::run_shell("echo '{\"text\":\"hello\"}' | " + std::string(LOCKSTEP_BINARY) + " tokenize --model " + out);
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("\"input_ids\":[14990]"), std::string::npos) << r.output;
}

TEST(InitCli, BadInputIsRefusedNamingTheFlag) {
  InitDir tmp;
  // The tiny config's 512 ids cannot hold the Qwen3 tokenizer's.
  auto r = run_init("--config " + kConfig + " --output " + tmp.file("a") + " --tokenizer " + kTokenizer);
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("do not fit the config's vocab_size 512"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(tmp.file("a")));
  r = run_init("--config " + kConfig + " --output " + tmp.file("b") + " --tokenizer " + tmp.file("none"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--tokenizer " + tmp.file("none") + ": no tokenizer.json there"), std::string::npos)
      << r.output;
  r = run_init("--config " + tmp.file("missing.json") + " --output " + tmp.file("c"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("missing.json"), std::string::npos) << r.output;
  // An existing directory is never replaced.
  fs::create_directories(tmp.file("exists"));
  std::ofstream(tmp.file("exists/keep.txt")) << "x";
  r = run_init("--config " + kConfig + " --output " + tmp.file("exists"));
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("--output " + tmp.file("exists") + ": already exists"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(tmp.file("exists/keep.txt")));
  r = run_init("--config " + kConfig + " --output " + tmp.file("d") + " --dtype float16");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find("float16"), std::string::npos) << r.output;
  r = run_init("--output " + tmp.file("e"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--config"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace lockstep
