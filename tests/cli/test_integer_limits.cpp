// Integers at their limits, from every source: config.json fields, JSONL request fields and
// the engine's flags. Each gets a clear error naming it (or a bounded run), never a hang,
// a signal or a wrapped value.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../error_of.h"
#include "core/json_int.h"
#include "model/config.h"
#include "run_command.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;
using testing::error_of;

const std::string kModel = std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe";
const char* const kHuge[] = {"-1",
                             "4294967297",
                             "4611686018427387904",
                             "9223372036854775807",
                             "18446744073709551615",
                             "99999999999999999999999"};

nlohmann::json fixture_config() {
  std::ifstream in(kModel + "/config.json");
  return nlohmann::json::parse(in);
}

TEST(IntegerLimits, JsonIntRefusesWhatItCannotHold) {
  const auto j = nlohmann::json::parse(R"([-1, 0, 5, 9223372036854775807, 18446744073709551615, 1.5, "7"])");
  EXPECT_EQ(json_int_in(j[1], 0, 5), 0);
  EXPECT_EQ(json_int_in(j[2], 0, 5), 5);
  EXPECT_EQ(json_int_in(j[3], 0, INT64_MAX), INT64_MAX);
  for (int i : {0, 3, 4, 5, 6}) EXPECT_FALSE(json_int_in(j[i], 0, 5)) << j[i];
  EXPECT_FALSE(json_int_in(j[4], INT64_MIN, INT64_MAX));  // above int64: never wrapped to -1
  EXPECT_EQ(error_of([&] { json_int(j[4], 0, 9, "field 'x'"); }),
            "field 'x' must be an integer in [0, 9], got 18446744073709551615");
}

TEST(IntegerLimits, EveryConfigIntegerAtItsLimitsIsNamed) {
  for (const char* field :
       {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "num_experts", "moe_intermediate_size", "num_experts_per_tok", "decoder_sparse_step",
        "max_position_embeddings"}) {
    for (const char* value : kHuge) {
      auto j = fixture_config();
      j[field] = nlohmann::json::parse(value);
      if (j[field].is_number_float()) continue;  // beyond 2^64: JSON gives a double, a type error below
      const std::string err = error_of([&] { ModelConfig::from_json(j, "config.json"); });
      EXPECT_NE(err.find("config.json: "), std::string::npos) << field << " = " << value;
      EXPECT_FALSE(err.empty()) << field << " = " << value << " was accepted";
    }
  }
  auto deep = fixture_config();
  deep["num_hidden_layers"] = int64_t(1) << 62;  // looped over layer by layer before
  EXPECT_EQ(error_of([&] { ModelConfig::from_json(deep, "config.json"); }),
            "config.json: field 'num_hidden_layers' = 4611686018427387904 is absurdly large (at most 4096)");
}

// Each engine flag and request field at huge and negative values: exit 1 with the name,
// or a normal run. A hang ends at the timeout (124), a crash in a signal: both fail.
TEST(IntegerLimits, GenerateFlagsAndFieldsAtTheirLimits) {
  const fs::path dir = fs::temp_directory_path() / ("lockstep_int_limits_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string input = (dir / "in.jsonl").string();
  std::ofstream(input) << "{\"input_ids\": [1, 2, 3]}\n";
  const std::string base = "generate --model " + kModel + " --input " + input;
  for (const char* flag : {"--page-size", "--max-batch-tokens", "--prefill-chunk", "--kv-pages", "--top-k"}) {
    for (const char* value : kHuge) {
      const auto r = testing::run_shell("timeout 20 " + std::string(LOCKSTEP_BINARY) + " " + base +
                                        " --max-new-tokens 2 " + flag + " " + value);
      EXPECT_TRUE(r.status >= 1 && r.status < 124) << flag << " " << value << ": " << r.output;
      EXPECT_NE(r.output.find(flag), std::string::npos) << flag << " " << value << ": " << r.output;
    }
  }
  // max_new_tokens up to INT64_MAX runs to the end of the context.
  auto r = testing::run_lockstep(base + " --max-new-tokens 9223372036854775807");
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("\"finish_reason\":\"length\""), std::string::npos) << r.output;
  std::ofstream(input) << "{\"input_ids\": [1], \"max_new_tokens\": 9223372036854775807}\n"
                       << "{\"input_ids\": [1], \"top_k\": 4294967297}\n"
                       << "{\"input_ids\": [1], \"stop_token_ids\": [4294967297]}\n"
                       << "{\"input_ids\": [1], \"max_new_tokens\": 18446744073709551615}\n"
                       << "{\"input_ids\": [1], \"seed\": -1}\n";
  r = testing::run_shell("timeout 20 " + std::string(LOCKSTEP_BINARY) + " " + base + " --max-new-tokens 2");
  EXPECT_EQ(r.status, 1) << r.output;
  for (const char* named : {":2: field 'top_k' must be an integer in [0, 2147483647]", ":3: stop_token_ids",
                            ":4: field 'max_new_tokens' must be an integer", ":5: field 'seed'"})
    EXPECT_NE(r.output.find(named), std::string::npos) << named << "\n" << r.output;
  EXPECT_NE(r.output.find("4 of 5 requests failed"), std::string::npos) << r.output;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lockstep
