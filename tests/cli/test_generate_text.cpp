// `lockstep generate` with text: {"prompt"} and {"messages"} through the model directory's
// tokenizer, "text" in the output, and stop strings.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "checkpoint/safetensors.h"
#include "model/weights.h"
#include "run_command.h"
#include "tokenizer/tokenizer.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;
using testing::run_lockstep;

// A tiny random Qwen3-MoE with the Qwen3 vocabulary and the real tokenizer beside it.
class GenerateText : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("lockstep_gen_text_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    nlohmann::json j = {{"model_type", "qwen3_moe"}, {"vocab_size", 151936}, {"hidden_size", 16},
                        {"num_hidden_layers", 1}, {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                        {"head_dim", 8}, {"num_experts", 4}, {"num_experts_per_tok", 2},
                        {"moe_intermediate_size", 8}, {"max_position_embeddings", 256}};
    std::ofstream(dir_ / "config.json") << j.dump();
    auto weights = ModelWeights::random(ModelConfig::from_json(j, "config.json"), 11, Precision::float32);
    std::map<std::string, Tensor> tensors;
    for (auto& [name, t] : weights.named()) tensors[name] = t->to_dtype(DType::bf16);
    write_safetensors((dir_ / "model.safetensors").string(), tensors);
    const std::string tok = std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer/";
    fs::copy_file(tok + "tokenizer.json", dir_ / "tokenizer.json");
    fs::copy_file(tok + "tokenizer_config.json", dir_ / "tokenizer_config.json");
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  static std::vector<nlohmann::json> generate(const std::string& lines, const std::string& flags,
                                              int expected_status = 0) {
    std::ofstream(dir_ / "in.jsonl") << lines;
    auto r = run_lockstep("generate --model " + dir_.string() + " --input " + (dir_ / "in.jsonl").string() +
                          " --output " + (dir_ / "out.jsonl").string() + " " + flags);
    EXPECT_EQ(r.status, expected_status) << r.output;
    std::vector<nlohmann::json> out;
    std::ifstream in(dir_ / "out.jsonl");
    for (std::string l; std::getline(in, l);) out.push_back(nlohmann::json::parse(l));
    return out;
  }

  static fs::path dir_;
};

fs::path GenerateText::dir_;

TEST_F(GenerateText, PromptAndMessagesEqualTheirTokenIds) {
  Tokenizer tok = Tokenizer::load(dir_.string());
  auto prompt_ids = tok.encode("Reverse the digits 12345.");
  auto chat_ids = tok.encode(tok.render_chat({{"user", "Hi there"}}, ChatOptions{}));
  nlohmann::json by_ids1 = {{"input_ids", prompt_ids}, {"seed", 3}};
  nlohmann::json by_ids2 = {{"input_ids", chat_ids}, {"seed", 4}};
  auto out = generate(R"({"prompt":"Reverse the digits 12345.","seed":3})"
                      "\n"
                      R"({"messages":[{"role":"user","content":"Hi there"}],"seed":4})"
                      "\n" +
                          by_ids1.dump() + "\n" + by_ids2.dump() + "\n",
                      "--max-new-tokens 8");
  ASSERT_EQ(out.size(), 4u);
  EXPECT_EQ(out[0]["output_ids"], out[2]["output_ids"]);
  EXPECT_EQ(out[0]["logprobs"], out[2]["logprobs"]);
  EXPECT_EQ(out[1]["output_ids"], out[3]["output_ids"]);
  EXPECT_EQ(out[1]["logprobs"], out[3]["logprobs"]);
  std::vector<int32_t> ids = out[0]["output_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(out[0]["text"].get<std::string>(), tok.decode(ids, true));
}

TEST_F(GenerateText, StopStringEndsTheRequest) {
  auto full = generate(R"({"prompt":"Hello","seed":1})"
                       "\n",
                       "--max-new-tokens 24 --temperature 0");
  ASSERT_EQ(full.size(), 1u);
  std::string text = full[0]["text"].get<std::string>();
  ASSERT_GE(text.size(), 4u) << "the random model produced too little text to cut";
  // A stop string taken from the middle of the full output.
  std::string stop = text.substr(text.size() / 2, 2);
  nlohmann::json req = {{"prompt", "Hello"}, {"seed", 1}, {"stop", {stop}}};
  auto cut = generate(req.dump() + "\n", "--max-new-tokens 24 --temperature 0");
  ASSERT_EQ(cut.size(), 1u);
  EXPECT_EQ(cut[0]["finish_reason"], "stop");
  EXPECT_LT(cut[0]["output_ids"].size(), full[0]["output_ids"].size());
  EXPECT_NE(cut[0]["text"].get<std::string>().find(stop), std::string::npos);
}

TEST(GenerateTextWithoutTokenizer, PromptIsAClearPerRequestError) {
  fs::path dir = fs::temp_directory_path() / ("lockstep_gen_notok_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "in.jsonl") << "{\"prompt\":\"hi\"}\n{\"input_ids\":[1,2,3]}\n";
  auto r = run_lockstep("generate --model " + std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe --input " +
                        (dir / "in.jsonl").string() + " --output " + (dir / "out.jsonl").string() +
                        " --max-new-tokens 2");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.output.find(":1: fields 'prompt' and 'messages' need a tokenizer.json"), std::string::npos) << r.output;
  std::ifstream in(dir / "out.jsonl");
  std::string l1, l2;
  std::getline(in, l1);
  std::getline(in, l2);
  EXPECT_NE(l1.find("\"error\""), std::string::npos);
  EXPECT_NE(l2.find("\"output_ids\""), std::string::npos);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lockstep
