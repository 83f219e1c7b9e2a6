// `lockstep tokenize` end to end: runs the built binary on temporary JSONL files.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace lockstep {
namespace {

namespace fs = std::filesystem;

struct CliRun {
  int status;
  std::string out, err;
};

class TokenizeCli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("lockstep_tok_cli_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  CliRun run(const std::string& input, const std::string& flags) {
    const fs::path in = dir_ / "in.jsonl", out = dir_ / "out.jsonl", err = dir_ / "err.txt";
    std::ofstream(in, std::ios::binary) << input;
    fs::remove(out);
    const std::string cmd = std::string("'") + LOCKSTEP_BINARY + "' tokenize --model '" + test::fixture_dir() +
                            "' --input '" + in.string() + "' --output '" + out.string() + "' " + flags + " 2> '" +
                            err.string() + "'";
    const int status = std::system(cmd.c_str());
    return {WEXITSTATUS(status), test::read_text(out.string()), test::read_text(err.string())};
  }

  fs::path dir_;
};

std::vector<nlohmann::json> lines(const std::string& text) {
  std::vector<nlohmann::json> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

TEST_F(TokenizeCli, EncodesTextAndMessagesInOrder) {
  const CliRun r = run(
      "{\"text\": \"Hello world\"}\n"
      "\n"
      "{\"messages\": [{\"role\": \"user\", \"content\": \"Compute 17*23. Put the answer in \\\\boxed{}.\"}], "
      "\"enable_thinking\": false}\n"
      "{\"text\": \"\"}\n",
      "");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto out = lines(r.out);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].dump(), R"({"input_ids":[9707,1879]})");
  EXPECT_EQ(out[1]["text"], "<|im_start|>user\nCompute 17*23. Put the answer in \\boxed{}.<|im_end|>\n"
                            "<|im_start|>assistant\n<think>\n\n</think>\n\n");
  EXPECT_EQ(out[1]["input_ids"].size(), 27u);
  EXPECT_EQ(out[1]["input_ids"].back(), 271);
  EXPECT_EQ(out[2].dump(), R"({"input_ids":[]})");
}

TEST_F(TokenizeCli, Decodes) {
  const CliRun r = run("{\"input_ids\": [9707, 1879, 151645]}\n{\"input_ids\": []}\n", "--decode");
  ASSERT_EQ(r.status, 0) << r.err;
  const auto out = lines(r.out);
  ASSERT_EQ(out.size(), 2u);
  EXPECT_EQ(out[0]["text"], "Hello world<|im_end|>");
  EXPECT_EQ(out[1]["text"], "");
  const CliRun skip = run("{\"input_ids\": [9707, 151645]}\n", "--decode --skip-special");
  EXPECT_EQ(lines(skip.out)[0]["text"], "Hello");
}

TEST_F(TokenizeCli, ErrorsNameLineAndField) {
  struct Case {
    std::string input, flags, expect;
  };
  const std::vector<Case> cases = {
      {"{\"text\": \"ok\"}\n{\"text\": 5}\n", "", ":2: text: expected a string"},
      {"{\"text\": \"ok\"}\n\n{not json\n", "", ":3: not valid JSON"},
      {"[1]\n", "", ":1: expected a JSON object"},
      {"{\"txt\": \"x\"}\n", "", ":1: expected exactly one of the fields"},
      {"{\"messages\": [{\"role\": \"user\"}], \"enable_thinking\": \"no\"}\n", "", ":1: enable_thinking"},
      {"{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n", "", ":1: messages[0].role"},
      {"{\"input_ids\": [1, -2]}\n", "--decode", ":1: input_ids[1]"},
      {"{\"input_ids\": [999999999]}\n", "--decode", ":1: input_ids[0]"},
      {"{\"text\": \"x\"}\n", "--decode", ":1: input_ids: missing"},
  };
  for (const Case& c : cases) {
    const CliRun r = run(c.input, c.flags);
    EXPECT_NE(r.status, 0) << c.input;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << "stderr: " << r.err << "\nexpected: " << c.expect;
  }
}

TEST_F(TokenizeCli, MissingModelDirectory) {
  const std::string cmd = std::string("'") + LOCKSTEP_BINARY + "' tokenize --model /nonexistent </dev/null 2>/dev/null";
  EXPECT_NE(WEXITSTATUS(std::system(cmd.c_str())), 0);
}

// Tool-call arguments nested to the JSON depth limit render; deeper lines get an error
// naming the line, not a stack overflow (either way the other lines are unaffected).
TEST_F(TokenizeCli, DeepToolArgumentsRenderOrAreRefusedByLine) {
  auto request = [](int depth) {
    return "{\"messages\": [{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": [{\"function\": "
           "{\"name\": \"f\", \"arguments\": " +
           std::string(depth, '[') + std::string(depth, ']') + "}}]}]}\n";
  };
  CliRun ok = run(request(500), "");
  ASSERT_EQ(ok.status, 0) << ok.err;
  EXPECT_EQ(lines(ok.out).size(), 1u);
  for (int depth : {600, 200000}) {
    CliRun r = run("{\"text\": \"a\"}\n" + request(depth), "");
    EXPECT_EQ(r.status, 1) << depth;
    EXPECT_NE(r.err.find("in.jsonl:2: JSON nests deeper than 512 levels"), std::string::npos) << r.err;
  }
}

}  // namespace
}  // namespace lockstep
