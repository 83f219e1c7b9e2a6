// The newcomer job's data: deterministic arithmetic word problems whose demonstrations the math
// verifier accepts, the files `lockstep arith-data` writes, and an SFT warm start on them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "../cli/run_command.h"
#include "model/config.h"
#include "rl/arith_problems.h"
#include "rl/prompt_source.h"
#include "rl/rewards/math_verifier.h"
#include "newcomer_util.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

namespace fs = std::filesystem;
using testing::read_bytes;
using testing::TempDir;

std::vector<std::string> lines_of(const fs::path& p) {
  std::vector<std::string> out;
  std::ifstream f(p);
  for (std::string l; std::getline(f, l);) out.push_back(l);
  return out;
}

TEST(ArithData, ProblemsAreDeterministicAndTheirDemonstrationsScoreOne) {
  int fractions = 0, integers = 0;
  std::set<std::string> prompts;
  for (uint64_t i = 0; i < 300; ++i) {
    const ArithProblem p = arith_problem(3, i);
    const ArithProblem again = arith_problem(3, i);
    EXPECT_EQ(p.prompt, again.prompt);
    EXPECT_EQ(p.label, again.label);
    EXPECT_EQ(p.response, again.response);
    EXPECT_EQ(math_reward(p.response, p.label), 1.0f) << p.prompt << " | " << p.response << " | " << p.label;
    EXPECT_NE(p.prompt.find("\\boxed{}"), std::string::npos);
    prompts.insert(p.prompt);
    if (p.label.find('/') != std::string::npos) {
      ++fractions;
      const int64_t num = std::stoll(p.label), den = std::stoll(p.label.substr(p.label.find('/') + 1));
      EXPECT_EQ(std::gcd(num, den), 1) << p.label;  // reduced
      EXPECT_GT(den, 1);
    } else {
      ++integers;
      EXPECT_EQ(math_reward(p.response, std::to_string(std::stoll(p.label) + 1)), 0.0f);
    }
  }
  EXPECT_GT(fractions, 30);
  EXPECT_GT(integers, 100);
  EXPECT_GT(prompts.size(), 280u);
  EXPECT_NE(arith_problem(3, 0).prompt + arith_problem(3, 1).prompt,
            arith_problem(4, 0).prompt + arith_problem(4, 1).prompt);
}

// Level 1 (`--level 1`): one-digit sums and differences, every number of the prompt and the
// answer one digit, both kinds present; the default stays level 2, whose first problem is pinned
// (the data files of earlier runs must not change under them).
TEST(ArithData, LevelOneIsOneDigitSumsAndDifferencesAndLevelTwoIsTheDefault) {
  int sums = 0, differences = 0;
  std::set<std::string> labels;
  for (uint64_t i = 0; i < 300; ++i) {
    const ArithProblem p = arith_problem(3, i, 1);
    EXPECT_EQ(p.prompt, arith_problem(3, i, 1).prompt);
    EXPECT_EQ(math_reward(p.response, p.label), 1.0f) << p.prompt << " | " << p.response;
    ASSERT_EQ(p.label.size(), 1u) << p.label;
    EXPECT_TRUE(p.label[0] >= '1' && p.label[0] <= '9') << p.label;
    labels.insert(p.label);
    for (size_t k = 0; k + 1 < p.prompt.size(); ++k)  // no two-digit number anywhere in the prompt
      EXPECT_FALSE(std::isdigit(static_cast<unsigned char>(p.prompt[k])) &&
                   std::isdigit(static_cast<unsigned char>(p.prompt[k + 1])))
          << p.prompt;
    sums += p.prompt.find(" more.") != std::string::npos;
    differences += p.prompt.find(" gives away ") != std::string::npos;
    EXPECT_NE(p.prompt.find("\\boxed{}"), std::string::npos);
  }
  EXPECT_EQ(sums + differences, 300);
  EXPECT_GT(sums, 100);
  EXPECT_GT(differences, 100);
  EXPECT_EQ(labels.size(), 9u);
  EXPECT_EQ(arith_problem(1, 0).prompt,
            "A ribbon 24 meters long is cut into 9 equal pieces. How long is each piece, in meters? Put the final "
            "answer in \\boxed{}.");
  EXPECT_EQ(arith_problem(1, 0).response,
            "Each piece is 24 / 9 = \\frac{8}{3} meters long.\n\nThe answer is \\boxed{\\frac{8}{3}}.");
  for (uint64_t i = 0; i < 20; ++i) EXPECT_EQ(arith_problem(5, i).prompt, arith_problem(5, i, 2).prompt);
  EXPECT_NE(arith_problem(5, 0, 1).prompt + arith_problem(5, 1, 1).prompt,
            arith_problem(5, 0, 2).prompt + arith_problem(5, 1, 2).prompt);
  EXPECT_THROW(arith_problem(5, 0, 3), Error);
  EXPECT_THROW(arith_problem(5, 0, 0), Error);
}

// Level 1's point for a tiny model: with the real Qwen3 tokenizer, each number of a prompt of a
// kind (sum or difference) sits the same number of tokens before the prompt's end, so it can be
// copied by position.
TEST(ArithData, LevelOneNumbersSitAtFixedTokenDistancesFromThePromptEnd) {
  const Tokenizer tok = Tokenizer::load(testing::fixture_tokenizer_dir());
  std::set<int32_t> digits;
  for (char d = '1'; d <= '9'; ++d) digits.insert(tok.encode(std::string(1, d)).at(0));
  std::map<bool, std::set<std::vector<size_t>>> distances;  // by kind: the digits' distances from the end
  for (uint64_t i = 0; i < 200; ++i) {
    const std::vector<int32_t> ids = tok.encode(arith_problem(7, i, 1).prompt);
    std::vector<size_t> d;
    for (size_t k = 0; k < ids.size(); ++k)
      if (digits.count(ids[k])) d.push_back(ids.size() - k);
    ASSERT_EQ(d.size(), 2u) << arith_problem(7, i, 1).prompt;
    distances[arith_problem(7, i, 1).prompt.find(" more.") != std::string::npos].insert(d);
  }
  ASSERT_EQ(distances.size(), 2u);
  EXPECT_EQ(distances[true].size(), 1u);   // sums
  EXPECT_EQ(distances[false].size(), 1u);  // differences
}

// The eval set holds none of the training prompts and repeats none, at both levels (their draws
// do repeat: 2000 of them hold ~1680 distinct level-2 and 916 level-1 prompts); asking for more
// than level 1's 1280 problems allow is an error naming --eval.
TEST(ArithData, EvalProblemsAreNeverTrainingProblems) {
  TempDir dir("arith_heldout");
  for (int level : {1, 2}) {
    const std::string d = dir.sub("level" + std::to_string(level));
    write_arith_data(d, 1, 2000, 60, level);
    std::set<std::string> train, eval;
    for (const auto& l : lines_of(fs::path(d) / "train.jsonl"))
      train.insert(nlohmann::json::parse(l)["prompt"].get<std::string>());
    const auto eval_lines = lines_of(fs::path(d) / "eval.jsonl");
    ASSERT_EQ(eval_lines.size(), 60u);
    for (const auto& l : eval_lines) {
      const std::string prompt = nlohmann::json::parse(l)["prompt"].get<std::string>();
      EXPECT_EQ(train.count(prompt), 0u) << prompt;
      EXPECT_TRUE(eval.insert(prompt).second) << prompt;
    }
    EXPECT_LT(train.size(), 1900u) << level;  // the draws repeat: the checks above are not vacuous
    EXPECT_EQ(lines_of(fs::path(d) / "train.jsonl").size(), 2000u);
  }
  const std::string e = testing::error_of([&] { write_arith_data(dir.sub("b"), 1, 100, 1300, 1); });
  EXPECT_NE(e.find("--eval 1300"), std::string::npos) << e;
}

// --rl-every N splits the training problems between the phases: every Nth distinct one (in draw
// order) is an RL prompt only, the others SFT demonstrations only; the draws and the eval set are
// those of the unsplit data.
TEST(ArithData, RlEverySplitsTheTrainingProblemsBetweenSftAndRl) {
  TempDir dir("arith_split");
  write_arith_data(dir.sub("all"), 1, 2000, 60, 1);
  write_arith_data(dir.sub("split"), 1, 2000, 60, 1, 3);
  auto prompts = [](const fs::path& f) {
    std::vector<std::string> out;
    for (const auto& l : lines_of(f)) out.push_back(nlohmann::json::parse(l)["prompt"].get<std::string>());
    return out;
  };
  const auto all = prompts(fs::path(dir.sub("all")) / "train.jsonl");
  const auto rl = prompts(fs::path(dir.sub("split")) / "train.jsonl");
  const auto sft = prompts(fs::path(dir.sub("split")) / "sft.jsonl");
  std::vector<std::string> distinct;
  for (const auto& p : all)
    if (std::find(distinct.begin(), distinct.end(), p) == distinct.end()) distinct.push_back(p);
  std::set<std::string> want_rl;
  for (size_t k = 2; k < distinct.size(); k += 3) want_rl.insert(distinct[k]);
  std::vector<std::string> want_rl_lines, want_sft_lines;
  for (const auto& p : all) (want_rl.count(p) ? want_rl_lines : want_sft_lines).push_back(p);
  EXPECT_EQ(rl, want_rl_lines);
  EXPECT_EQ(sft, want_sft_lines);
  EXPECT_EQ(want_rl.size(), distinct.size() / 3);
  EXPECT_GT(want_rl.size(), 200u);  // level 1: 916 distinct problems in 2000 draws
  EXPECT_EQ(read_bytes(fs::path(dir.sub("all")) / "eval.jsonl"), read_bytes(fs::path(dir.sub("split")) / "eval.jsonl"));
  const std::string e = testing::error_of([&] { write_arith_data(dir.sub("bad"), 1, 10, 2, 1, -1); });
  EXPECT_NE(e.find("--rl-every"), std::string::npos) << e;
}

TEST(ArithData, CommandWritesLevelOneAndRefusesAnUnknownLevel) {
  TempDir dir("arith_level");
  auto r = lockstep::testing::run_lockstep("arith-data --output-dir " + dir.sub("a") + " --train 6 --eval 2 --level 1");
  ASSERT_EQ(r.status, 0) << r.output;
  write_arith_data(dir.sub("b"), 1, 6, 2, 1);
  for (const char* f : {"train.jsonl", "eval.jsonl", "sft.jsonl"})
    EXPECT_EQ(read_bytes(fs::path(dir.sub("a")) / f), read_bytes(fs::path(dir.sub("b")) / f)) << f;
  EXPECT_EQ(nlohmann::json::parse(lines_of(fs::path(dir.sub("a")) / "train.jsonl")[0])["prompt"],
            arith_problem(1, 0, 1).prompt);
  for (const char* bad : {"3", "0", "easy"}) {
    auto e = lockstep::testing::run_lockstep("arith-data --output-dir " + dir.sub("c") + " --level " + bad);
    EXPECT_NE(e.status, 0) << bad;
    EXPECT_NE(e.output.find("--level"), std::string::npos) << e.output;
  }
}

TEST(ArithData, CommandWritesTrainEvalAndDemonstrations) {
  TempDir dir("arith_cli");
  auto r = lockstep::testing::run_lockstep("arith-data --output-dir " + dir.sub("a") + " --train 20 --eval 5 --seed 9");
  ASSERT_EQ(r.status, 0) << r.output;
  write_arith_data(dir.sub("b"), 9, 20, 5);
  for (const char* f : {"train.jsonl", "eval.jsonl", "sft.jsonl"})
    EXPECT_EQ(read_bytes(fs::path(dir.sub("a")) / f), read_bytes(fs::path(dir.sub("b")) / f)) << f;
  const auto train = lines_of(fs::path(dir.sub("a")) / "train.jsonl"),
             eval = lines_of(fs::path(dir.sub("a")) / "eval.jsonl"),
             sft = lines_of(fs::path(dir.sub("a")) / "sft.jsonl");
  ASSERT_EQ(train.size(), 20u);
  ASSERT_EQ(eval.size(), 5u);
  ASSERT_EQ(sft.size(), 20u);
  for (size_t i = 0; i < train.size(); ++i) {
    const auto t = nlohmann::json::parse(train[i]), s = nlohmann::json::parse(sft[i]);
    EXPECT_EQ(t["prompt"], s["prompt"]);
    EXPECT_EQ(math_reward(s["response"].get<std::string>(), t["label"].get<std::string>()), 1.0f);
  }
  EXPECT_EQ(nlohmann::json::parse(eval[0])["prompt"], arith_problem(9, 20).prompt);  // eval follows train
}

TEST(ArithData, SftWarmStartTrainsOnTheDemonstrationsInChatFormat) {
  TempDir dir("arith_sft");
  write_arith_data(dir.sub("data"), 2, 8, 2);
  TrainConfig c;
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.prompt_data = dir.sub("data") + "/train.jsonl";
  c.sft_data = dir.sub("data") + "/sft.jsonl";
  c.apply_chat_template = true;
  c.enable_thinking = false;
  c.sft_warmup_steps = 2;
  c.num_rollout = 1;
  testing::small_batches(c);
  c.rollout_max_response_len = 4;
  c.progress = false;
  c.output_dir = dir.sub("out");
  auto source = make_prompt_source(c);
  const Tokenizer tok = Tokenizer::load(c.load);
  const TaskExample demo = source->demonstration(5, 0);
  const ArithProblem first = arith_problem(2, 0);
  ChatOptions chat;
  chat.enable_thinking = false;
  EXPECT_EQ(demo.prompt, tok.encode(tok.render_chat({ChatMessage("user", first.prompt)}, chat)));
  std::vector<int32_t> answer = tok.encode(first.response);
  answer.push_back(*tok.token_id("<|im_end|>"));
  EXPECT_EQ(demo.answer, answer);
  run_training(c);
  int sft_steps = 0;
  for (const auto& m : testing::read_metrics(c))
    if (m.contains("sft_step")) {
      ++sft_steps;
      EXPECT_GT(m["train/sft_loss"].get<double>(), 0.0);
    }
  EXPECT_EQ(sft_steps, 2);
}

}  // namespace
}  // namespace lockstep::rl

namespace lockstep::rl {
namespace {

// The newcomer config `toml` at a tiny size (data from arith-data, one SFT step, one RL step,
// both evaluations) on the CPU; `model` (a config.json under the source tree) replaces its
// init-config where the config's own model is too large for a test.
void run_newcomer_config_tiny(const std::string& toml, const std::string& model = "") {
  TempDir dir("arith_job");
  TrainConfig c = testing::newcomer_config(toml, dir);
  c.device = "cpu";
  if (!model.empty()) c.init_config = std::string(LOCKSTEP_SOURCE_DIR) + "/" + model;
  c.sft_warmup_steps = 1;
  c.num_rollout = 1;
  c.rollout_max_response_len = 2;
  c.eval_max_response_len = 2;
  c.n_samples_per_eval_prompt = 1;
  run_training(c);
  const testing::RecordCounts n = testing::count_records(c);
  EXPECT_EQ(n.sft, 1);
  EXPECT_EQ(n.steps, 1);
  EXPECT_EQ(n.evals, 2);  // before the first step and after the last
}

// configs/arith_grpo.toml is a valid job: its keys load, and at a tiny size (its own model) it
// runs the SFT warm start, an RL step and both evaluations.
TEST(ArithData, NewcomerConfigRunsAtATinySize) {
  TrainConfig c;
  apply_toml_file(c, std::string(LOCKSTEP_SOURCE_DIR) + "/configs/arith_grpo.toml");
  EXPECT_EQ(c.rm_type, "math");
  EXPECT_TRUE(c.apply_chat_template);
  run_newcomer_config_tiny("configs/arith_grpo.toml");
}

// configs/arith_grpo_cuda.toml: the GPU job (device cuda, bfloat16) with the real vocabulary and
// a model of CUDA-runner shapes; its other keys run the same job on the CPU at a tiny size (its
// own 0.23B-parameter model is the GPU test's, tests/cuda/test_cuda_newcomer_config.cpp).
TEST(ArithData, CudaNewcomerConfigLoadsAndRunsAtATinySizeOnTheCpu) {
  TrainConfig c;
  apply_toml_file(c, std::string(LOCKSTEP_SOURCE_DIR) + "/configs/arith_grpo_cuda.toml");
  EXPECT_EQ(c.device, "cuda");
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.rm_type, "math");
  EXPECT_GT(c.sft_warmup_steps, 0);
  EXPECT_FALSE(c.eval_prompt_data.empty());
  const ModelConfig m = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/" + c.init_config);
  EXPECT_EQ(m.vocab_size, 151936);  // the real Qwen3 tokenizer's padded vocabulary
  EXPECT_TRUE(m.tie_word_embeddings);
  EXPECT_EQ(m.head_dim, 128);
  run_newcomer_config_tiny("configs/arith_grpo_cuda.toml", "configs/arith_model.json");
}

}  // namespace
}  // namespace lockstep::rl
