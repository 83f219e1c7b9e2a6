// Evaluation during training: --eval-prompt-data parsing, pass@k, and eval records of a run whose
// eval reward is known exactly (a reward program that returns each sample's label).
#include <gtest/gtest.h>

#include <fstream>

#include "../cli/run_command.h"
#include "core/error.h"
#include "rl/eval.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

namespace fs = std::filesystem;
using testing::error_of;
using testing::TempDir;


TEST(Eval, PromptDataIsNamePairs) {
  auto sets = parse_eval_prompt_data("aime a.jsonl\nmath  m.jsonl.gz");
  ASSERT_EQ(sets.size(), 2u);
  EXPECT_EQ(sets[0], (std::pair<std::string, std::string>{"aime", "a.jsonl"}));
  EXPECT_EQ(sets[1], (std::pair<std::string, std::string>{"math", "m.jsonl.gz"}));
  EXPECT_TRUE(parse_eval_prompt_data("").empty());
  EXPECT_EQ(error_of([] { parse_eval_prompt_data("aime"); }),
            "--eval-prompt-data: expected pairs NAME FILE, got 1 words in 'aime'");
  EXPECT_EQ(error_of([] { parse_eval_prompt_data("a x b y a z"); }), "--eval-prompt-data: the name 'a' is given twice");
  EXPECT_EQ(error_of([] { parse_eval_prompt_data("a/b x"); }),
            "--eval-prompt-data: the name 'a/b' must not contain '/' (it becomes the metric eval/NAME)");
}

TEST(Eval, PassAtKIsTheUnbiasedEstimate) {
  EXPECT_DOUBLE_EQ(pass_at_k(4, 1, 1), 0.25);
  EXPECT_DOUBLE_EQ(pass_at_k(4, 1, 4), 1.0);
  EXPECT_DOUBLE_EQ(pass_at_k(4, 0, 4), 0.0);
  EXPECT_NEAR(pass_at_k(5, 2, 2), 1.0 - 3.0 / 10.0, 1e-12);  // 1 - C(3,2)/C(5,2)
  EXPECT_DOUBLE_EQ(pass_at_k(3, 3, 1), 1.0);
}

TEST(Eval, RunWritesEvalRecordsBeforeEveryIntervalAndAtTheEnd) {
  TempDir dir("eval_run");
  TrainConfig c;
  c.prompt_data = dir.sub("train.jsonl");
  std::ofstream(c.prompt_data) << R"({"prompt": "Say 1.", "label": "1"})"
                                  "\n"
                               << R"({"prompt": "Say 0.", "label": "0"})"
                                  "\n";
  const std::string small = dir.sub("small.jsonl"), big = dir.sub("big.jsonl");
  std::ofstream(small) << R"({"prompt": "a", "label": "1"})"
                          "\n"
                       << R"({"prompt": "b", "label": "0"})"
                          "\n"
                       << R"({"prompt": "c", "label": "1"})"
                          "\n";
  std::ofstream(big) << R"({"prompt": "d", "label": "0.5"})"
                        "\n";
  c.eval_prompt_data = "small " + small + " big " + big;
  c.eval_interval = 2;
  c.n_samples_per_eval_prompt = 3;
  c.eval_max_response_len = 2;
  // The reward is the sample's label, so every eval number is known in advance.
  const std::string program = dir.sub("label_reward.sh");
  std::ofstream(program) << R"sh(sed -n 's/^{"label":"\([0-9.]*\)".*/\1/p')sh"
                         << "\n";
  c.custom_rm_cmd = "sh " + program;
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.sft_warmup_steps = 0;
  c.num_rollout = 3;
  testing::small_batches(c);
  c.rollout_max_response_len = 3;
  c.progress = false;
  c.output_dir = dir.sub("out");
  run_training(c);
  std::vector<nlohmann::json> evals;
  int rl_steps = 0;
  for (const auto& m : testing::read_metrics(c)) {
    if (m.contains("eval/small")) evals.push_back(m);
    if (m.contains("rollout/rewards")) {
      ++rl_steps;
      EXPECT_DOUBLE_EQ(m["rollout/rewards"].get<double>(), 0.5);  // labels 1 and 0, two samples each
    }
  }
  EXPECT_EQ(rl_steps, 3);
  ASSERT_EQ(evals.size(), 3u);
  for (size_t i = 0; i < evals.size(); ++i) {
    const auto& e = evals[i];
    EXPECT_EQ(e["step"], (std::vector<int>{0, 2, 3}[i]));
    EXPECT_NEAR(e["eval/small"].get<double>(), 2.0 / 3.0, 1e-12);
    EXPECT_NEAR(e["eval/small/pass@1"].get<double>(), 2.0 / 3.0, 1e-12);
    EXPECT_NEAR(e["eval/small/pass@3"].get<double>(), 2.0 / 3.0, 1e-12);
    EXPECT_DOUBLE_EQ(e["eval/big"].get<double>(), 0.5);
    EXPECT_DOUBLE_EQ(e["eval/big/pass@3"].get<double>(), 1.0);
    EXPECT_LE(e["eval/small/response_lengths"].get<double>(), 2.0);
    EXPECT_GE(e["eval/small/truncated"].get<double>(), 0.0);
  }
  EXPECT_TRUE(fs::exists(fs::path(c.output_dir) / "train.png"));
}

TEST(Eval, CommandLineTakesNameFilePairs) {
  TempDir dir("eval_cli");
  auto r = lockstep::testing::run_lockstep("train --eval-prompt-data aime " + dir.sub("aime.jsonl") + " math " +
                                           dir.sub("math.jsonl") + " --num-rollout 1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("--eval-prompt-data aime " + dir.sub("aime.jsonl") + ": file not found"), std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace lockstep::rl
