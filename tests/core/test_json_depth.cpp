// Every JSON reader goes through one depth-checked parse: deep nesting at several depths is
// refused with the file and line, never a crash; valid JSON up to the limit still parses.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>

#include "../error_of.h"
#include "core/error.h"
#include "core/json_parse.h"
#include "core/jsonl.h"
#include "core/philox.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;

// `depth` levels of arrays and objects, mixed by `seed`, around a string holding brackets.
std::string nested(int depth, uint64_t seed) {
  std::string open, close;
  for (int i = 0; i < depth; ++i) {
    if (philox_uniform(seed, 0, uint64_t(i)) < 0.5f) {
      open += "{\"k\\\"[\": ";
      close += '}';
    } else {
      open += "[";
      close += ']';
    }
  }
  return open + "\"[[{{ \\\" ]]\"" + std::string(close.rbegin(), close.rend());
}

using testing::error_of;

TEST(JsonDepth, ParsesUpToTheLimitAndRefusesBeyondAtAnyDepth) {
  for (int depth : {0, 1, 2, 100, kMaxJsonDepth - 1, kMaxJsonDepth}) {
    for (uint64_t seed = 0; seed < 4; ++seed) {
      const std::string text = nested(depth, seed);
      EXPECT_NO_THROW(parse_json(text, "x.json")) << depth;
      EXPECT_NO_THROW(parse_ordered_json(text, "x.json")) << depth;
    }
  }
  for (int depth : {kMaxJsonDepth + 1, 1000, 100000, 2000000}) {
    for (uint64_t seed = 0; seed < 2; ++seed) {
      const std::string err = error_of([&] { parse_json(nested(depth, seed), "x.json"); });
      EXPECT_EQ(err.rfind("x.json: JSON nests deeper than 512 levels (line 1, column ", 0), 0u) << depth << ": " << err;
      EXPECT_FALSE(error_of([&] { parse_ordered_json(nested(depth, seed), "x.json"); }).empty());
    }
  }
}

TEST(JsonDepth, BracketsInStringsDoNotCountAndTheLineIsNamed) {
  EXPECT_NO_THROW(parse_json("\"" + std::string(100000, '[') + "\"", "s"));
  EXPECT_NO_THROW(parse_json("[\"\\\\\", \"" + std::string(100000, '{') + "\"]", "s"));
  const std::string text = "{\n\"a\": 1,\n  \"b\": " + std::string(600, '[') + std::string(600, ']') + "}";
  EXPECT_EQ(error_of([&] { parse_json(text, "cfg.json"); }),
            "cfg.json: JSON nests deeper than 512 levels (line 3, column 519)");
  EXPECT_NE(error_of([&] { parse_json("{\"a\": [1, 2}", "bad.json"); }).find("bad.json: not valid JSON"),
            std::string::npos);
}

TEST(JsonDepth, FileAndJsonlReadersNameTheFileAndLine) {
  const fs::path dir = fs::temp_directory_path() / ("lockstep_json_depth_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string jsonl = (dir / "in.jsonl").string(), file = (dir / "config.json").string();
  std::ofstream(jsonl) << "{\"a\": 1}\n\n"
                       << "{\"x\": " << nested(100000, 1) << "}\n";
  std::ofstream(file) << nested(kMaxJsonDepth + 1, 2);
  EXPECT_EQ(error_of([&] { read_jsonl(jsonl); }).rfind(jsonl + ":3: JSON nests deeper than 512 levels", 0), 0u);
  EXPECT_EQ(error_of([&] { read_json_file(file); }).rfind(file + ": JSON nests deeper than 512 levels", 0), 0u);
  std::ofstream(file) << nested(kMaxJsonDepth, 2);
  EXPECT_NO_THROW(read_json_file(file));
  fs::remove_all(dir);
}

// The mechanism holds only if no reader parses around it: every JSON parse in the sources
// is the checked one (the tokenizer's SAX fast path runs after its own check_json_depth).
TEST(JsonDepth, NoReaderParsesAroundTheCheck) {
  const std::regex raw_parse(R"((json|Json)::(parse|sax_parse)\()");
  for (const char* root : {"src", "apps"}) {
    for (const auto& e : fs::recursive_directory_iterator(fs::path(LOCKSTEP_SOURCE_DIR) / root)) {
      const std::string name = e.path().filename().string();
      if (!e.is_regular_file() || name == "json_parse.cpp" || name == "tokenizer_loader.cpp") continue;
      std::ifstream in(e.path());
      std::string line;
      for (int n = 1; std::getline(in, line); ++n)
        EXPECT_FALSE(std::regex_search(line, raw_parse)) << e.path().string() << ":" << n << ": " << line;
    }
  }
}

}  // namespace
}  // namespace lockstep
