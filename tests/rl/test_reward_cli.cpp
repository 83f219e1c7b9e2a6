// `lockstep reward`: JSONL of responses and labels in, rewards out in input order; bad lines
// are errors naming the file, line and key.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../cli/run_command.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

using lockstep::testing::run_lockstep;
using testing::TempDir;

std::vector<double> read_rewards(const std::string& path) {
  std::vector<double> out;
  std::ifstream f(path);
  std::string line;
  while (std::getline(f, line)) out.push_back(nlohmann::json::parse(line).at("reward").get<double>());
  return out;
}

TEST(RewardCli, ScoresEachLineInOrder) {
  TempDir dir("reward_cli");
  const std::string in = dir.sub("in.jsonl"), out = dir.sub("out.jsonl");
  std::ofstream(in) << R"({"response": "so \\boxed{\\frac{3}{4}}", "label": "0.75"})"
                       "\n"
                    << R"({"response": "I think \\boxed{5}", "label": 6})"
                       "\n"
                    << "\n"
                    << R"({"response": "no box: 12", "label": "12", "extra": [1]})"
                       "\n"
                    << R"({"response": "\\boxed{1,000}", "label": 1000})"
                       "\n";
  auto r = run_lockstep("reward --rm-type math --input " + in + " --output " + out);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_rewards(out), (std::vector<double>{1, 0, 0, 1}));
  r = run_lockstep("reward --rm-type dapo --input " + in + " --output " + out);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_rewards(out), (std::vector<double>{1, -1, -1, 1}));
  r = run_lockstep("reward --rm-type exact --input " + in + " --output " + out);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_rewards(out), (std::vector<double>{0, 0, 0, 0}));
  // An outside program: here each sample's label, read back from the JSON it is given.
  const std::string program = dir.sub("label_reward.sh");
  std::ofstream(program) << R"sh(sed -n 's/^{"label":"\([0-9.]*\)".*/\1/p')sh" << "\n";
  r = run_lockstep("reward --custom-rm-cmd 'sh " + program + "' --input " + in + " --output " + out);
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(read_rewards(out), (std::vector<double>{0.75, 6, 12, 1000}));
}

TEST(RewardCli, BadInputNamesFileLineAndKey) {
  TempDir dir("reward_cli_bad");
  const std::string in = dir.sub("in.jsonl"), out = dir.sub("out.jsonl");
  auto expect_error = [&](const std::string& second_line, const std::string& message) {
    std::ofstream(in) << R"({"response": "\\boxed{1}", "label": "1"})"
                         "\n"
                      << second_line << "\n";
    std::remove(out.c_str());
    auto r = run_lockstep("reward --rm-type math --input " + in + " --output " + out);
    EXPECT_NE(r.status, 0);
    EXPECT_NE(r.output.find(in + ":2: " + message), std::string::npos) << r.output;
    EXPECT_FALSE(std::ifstream(out).good()) << "nothing is written when a line is bad";
  };
  expect_error(R"({"label": "1"})", "missing key 'response'");
  expect_error(R"({"response": 3, "label": "1"})", "key 'response': expected a string, found number");
  expect_error(R"({"response": "x"})", "missing key 'label'");
  expect_error(R"({"response": "x", "label": null})", "key 'label': expected a string or a number, found null");
  expect_error(R"({"response": "x", "label": )", "not valid JSON");
  auto r = run_lockstep("reward --rm-type nope --input " + in);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--rm-type: expected math | dapo | exact, got 'nope'"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace lockstep::rl
