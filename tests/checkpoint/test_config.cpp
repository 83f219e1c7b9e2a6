// config.json parsing: both Hugging Face styles, dense layers, and clear errors.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/config.h"

namespace lockstep {
namespace {

nlohmann::json fixture_config() {
  std::ifstream in(std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe/config.json");
  return nlohmann::json::parse(in);
}

TEST(ModelConfig, HubStyle) {
  auto c = ModelConfig::from_json(fixture_config(), "config.json");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.is_moe_layer(0));
}

TEST(ModelConfig, TransformersFiveStyle) {
  auto j = fixture_config();
  j.erase("num_experts");
  j["num_local_experts"] = 16;
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_theta", 1e6}, {"rope_type", "default"}};
  auto c = ModelConfig::from_json(j, "config.json");
  EXPECT_EQ(c.num_experts, 16);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
}

TEST(ModelConfig, DenseLayersFromMlpOnlyAndSparseStep) {
  auto j = fixture_config();
  j["num_hidden_layers"] = 4;
  j["mlp_only_layers"] = {0};
  j["decoder_sparse_step"] = 2;
  auto c = ModelConfig::from_json(j, "config.json");
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_TRUE(c.is_moe_layer(3));
}

TEST(ModelConfig, MissingAndWrongFieldsAreNamed) {
  auto j = fixture_config();
  j.erase("hidden_size");
  try {
    ModelConfig::from_json(j, "cfg.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cfg.json: missing required field 'hidden_size'"), std::string::npos);
  }
  j = fixture_config();
  j["num_attention_heads"] = "four";
  try {
    ModelConfig::from_json(j, "cfg.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'num_attention_heads' must be an integer"), std::string::npos);
  }
  j = fixture_config();
  j["num_experts_per_tok"] = 9;
  EXPECT_THROW(ModelConfig::from_json(j, "cfg.json"), Error);
  j = fixture_config();
  j["num_key_value_heads"] = 3;
  EXPECT_THROW(ModelConfig::from_json(j, "cfg.json"), Error);
}

// A config.json whose field nests past the JSON depth limit is an error naming the file
// and line (it used to overflow the stack when the error printed the field).
TEST(ModelConfig, DeeplyNestedFieldIsAnErrorNotACrash) {
  const std::string path = ::testing::TempDir() + "deep_config.json";
  for (int depth : {513, 100000}) {
    std::ofstream(path) << "{\n  \"vocab_size\": " << std::string(depth, '[') << std::string(depth, ']') << "\n}";
    try {
      ModelConfig::load(path);
      ADD_FAILURE() << "accepted depth " << depth;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind(path + ": JSON nests deeper than 512 levels (line 2", 0), 0u) << e.what();
    }
  }
}

}  // namespace
}  // namespace lockstep
