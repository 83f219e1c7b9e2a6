// The built-in calculator tool (--rollout-tool calculator): its arithmetic, its answers to tool
// calls in the Qwen3 template's format (bad calls get error answers, never a crash), the tool
// reply's text as the template renders it, and a two-turn episode driven by a scripted policy:
// the policy's tokens are kept as sampled, the tool's reply is in the sequence with loss mask 0
// and the final answer gets the run's reward.
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "rl/calculator.h"
#include "rl/calculator_env.h"
#include "rl/chat_observation.h"
#include "rl/environment.h"
#include "rl/prompt_source.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

using testing::error_of;
using testing::TempDir;

TEST(Calculator, ExactArithmeticAndClearErrors) {
  EXPECT_EQ(calculate("6 * 7"), "42");
  EXPECT_EQ(calculate("(12 + 3) * 4 / 5"), "12");
  EXPECT_EQ(calculate("-7 / 2"), "-7/2");
  EXPECT_EQ(calculate("1/3 + 1/6"), "1/2");
  EXPECT_EQ(calculate("2 - -3"), "5");
  EXPECT_EQ(error_of([] { calculate("1 / (2 - 2)"); }), "division by zero at offset 3");
  EXPECT_EQ(error_of([] { calculate("2 +"); }), "expected a number at the end");
  EXPECT_EQ(error_of([] { calculate("2 x 3"); }), "unexpected 'x' at offset 2");
  EXPECT_EQ(error_of([] { calculate("(1 + 2"); }), "expected ')' at offset 6");
  EXPECT_EQ(error_of([] { calculate("9223372036854775807 + 1"); }), "the result does not fit 64-bit integers");
  EXPECT_EQ(error_of([] { calculate(std::string(100, '(') + "1" + std::string(100, ')')); }),
            "more than 64 nested operations");
}

TEST(CalculatorTool, AnswersEveryCallAndBadCallsWithErrors) {
  EXPECT_TRUE(answer_calculator_calls("The answer is 42.").empty());
  EXPECT_EQ(answer_calculator_calls("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": "
                                    "\"6*7\"}}\n</tool_call>\n<tool_call>{\"name\": \"calculator\", \"arguments\": "
                                    "{\"expression\": \"1/0\"}}</tool_call>"),
            (std::vector<std::string>{"42", "error: calculator: division by zero at offset 2"}));
  EXPECT_EQ(
      answer_calculator_calls("<tool_call>{\"name\": \"calc\"</tool_call>"),
      (std::vector<std::string>{"error: a tool call must be a JSON object {\"name\": ..., \"arguments\": {...}}"}));
  EXPECT_EQ(answer_calculator_calls("<tool_call>{\"name\": \"search\", \"arguments\": {}}</tool_call>"),
            (std::vector<std::string>{"error: unknown tool \"search\" (the only tool is calculator)"}));
  EXPECT_EQ(answer_calculator_calls("<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expr\": 1}}</tool_call>"),
            (std::vector<std::string>{"error: calculator: \"arguments\" must be {\"expression\": \"...\"}"}));
  EXPECT_EQ(answer_calculator_calls("<tool_call>{\"name\": \"calculator\""),
            (std::vector<std::string>{"error: a tool call must end with </tool_call>"}));
}

TEST(ChatObservation, IsWhatTheTemplateAppendsAfterTheAssistantTurn) {
  const Tokenizer tok = Tokenizer::load(testing::fixture_tokenizer_dir());
  for (bool thinking : {true, false}) {
    ChatMessage call("assistant", "");
    call.tool_calls = {{"calculator", "{\"expression\": \"6*7\"}"}};
    ChatOptions o;
    o.enable_thinking = thinking;
    o.tools = {calculator_tool_definition()};
    const std::string whole = tok.render_chat(
        {ChatMessage("user", "What is 6*7?"), call, ChatMessage("tool", "42"), ChatMessage("tool", "1")}, o);
    const std::string reply =
        chat_observation_text(tok, {ChatMessage("tool", "42"), ChatMessage("tool", "1")}, thinking, true);
    EXPECT_EQ(reply.substr(0, 35), "\n<|im_start|>user\n<tool_response>\n4");
    ASSERT_GT(whole.size(), reply.size());
    EXPECT_EQ(whole.substr(whole.size() - reply.size() - 10), "<|im_end|>" + reply);
    // A turn that did not end with <|im_end|> is closed first.
    EXPECT_EQ(chat_observation_text(tok, {ChatMessage("user", "go on")}, thinking, false).substr(0, 28),
              "<|im_end|>\n<|im_start|>user\n");
  }
  EXPECT_EQ(error_of([&] { chat_observation_text(tok, {ChatMessage("system", "x")}, true, true); }),
            "an environment's message role must be \"user\" or \"tool\", got \"system\"");
}

// Each call answers the next scripted turn for every request, and records the prompts it saw.
struct ScriptedPolicy {
  std::vector<std::vector<int32_t>> turns;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<rollout::RequestOutcome> operator()(const std::vector<std::optional<rollout::GenerationRequest>>& r) {
    std::vector<rollout::RequestOutcome> out(r.size());
    for (size_t i = 0; i < r.size(); ++i) {
      prompts.push_back(r[i]->prompt);
      out[i].result.output_ids = turns.at(prompts.size() - 1);
      for (size_t t = 0; t < out[i].result.output_ids.size(); ++t)
        out[i].result.logprobs.push_back(-0.25f * float(t + 1));
      out[i].result.weight_versions.assign(out[i].result.output_ids.size(), 3);
      out[i].result.finish_reason = rollout::FinishReason::stop;
    }
    return out;
  }
};

// One prompt with the calculator in its tools block.
TrainConfig calculator_config(const TempDir& dir) {
  TrainConfig c;
  c.prompt_data = dir.sub("data.jsonl");
  std::ofstream(c.prompt_data) << R"({"prompt": "What is 6 * 7?", "label": "42"})"
                               << "\n";
  c.tokenizer = testing::fixture_tokenizer_dir();
  c.apply_chat_template = true;
  c.rollout_tool = "calculator";
  c.sft_warmup_steps = 0;
  return c;
}

TEST(CalculatorTool, EpisodeKeepsThePolicysTokensAndMasksTheToolReply) {
  TempDir dir("calculator");
  TrainConfig c = calculator_config(dir);
  c.enable_thinking = false;
  c.rm_type = "exact";
  validate(c);
  auto source = make_prompt_source(c);
  const Tokenizer tok = Tokenizer::load(c.tokenizer);
  auto env = make_environment(c, *source, nullptr);
  const TaskExample ex = source->prompt(1, 0);
  EXPECT_NE(tok.decode(ex.prompt).find("<tools>\n" + calculator_tool_definition() + "\n</tools>"), std::string::npos);

  const int32_t im_end = *tok.token_id("<|im_end|>");
  std::vector<int32_t> call =
      tok.encode("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"6 * 7\"}}\n</tool_call>");
  call.push_back(im_end);
  std::vector<int32_t> answer = tok.encode("42");
  answer.push_back(im_end);
  ScriptedPolicy policy{{call, answer}, {}};
  std::vector<Episode> episodes(1);
  episodes[0].example = ex;
  rollout::GenerationRequest first;
  first.prompt = ex.prompt;
  EpisodeLimits limits;
  limits.max_turns = 4;
  limits.max_response_len = 200;
  run_episodes(episodes, {first}, *env, std::ref(policy), limits, 1);

  const Episode& e = episodes[0];
  const std::vector<int32_t> reply =
      tok.encode(chat_observation_text(tok, {ChatMessage("tool", "42")}, /*enable_thinking=*/false, true));
  std::vector<int32_t> expected = call;
  expected.insert(expected.end(), reply.begin(), reply.end());
  expected.insert(expected.end(), answer.begin(), answer.end());
  EXPECT_EQ(e.response, expected);
  std::vector<uint8_t> mask(call.size(), 1);
  mask.insert(mask.end(), reply.size(), 0);
  mask.insert(mask.end(), answer.size(), 1);
  EXPECT_EQ(e.loss_mask, mask);
  EXPECT_EQ(e.policy_turns, 2);
  EXPECT_EQ(e.reward, 1.0f);
  EXPECT_FALSE(e.truncated);
  EXPECT_EQ(e.logprobs[call.size()], 0.0f);  // the tool's tokens have no log-prob
  EXPECT_EQ(e.policy_logprobs().size(), call.size() + answer.size());
  EXPECT_EQ(e.versions.size(), call.size() + answer.size());
  // Token in, token out: the second turn continues the exact ids of the first and the reply.
  ASSERT_EQ(policy.prompts.size(), 2u);
  std::vector<int32_t> second = ex.prompt;
  second.insert(second.end(), call.begin(), call.end());
  second.insert(second.end(), reply.begin(), reply.end());
  EXPECT_EQ(policy.prompts[1], second);
  EXPECT_EQ(tok.decode(reply),
            "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

TEST(CalculatorTool, TurnLimitAndBudgetEndEpisodes) {
  TempDir dir("calculator_limits");
  const TrainConfig c = calculator_config(dir);
  auto source = make_prompt_source(c);
  const Tokenizer tok = Tokenizer::load(c.tokenizer);
  auto env = make_environment(c, *source, nullptr);
  const std::vector<int32_t> call =
      tok.encode("<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"1+1\"}}</tool_call>");
  rollout::GenerationRequest first;
  first.prompt = source->prompt(1, 0).prompt;
  for (int64_t budget : {int64_t(1000), int64_t(int64_t(call.size()) + 5)}) {
    ScriptedPolicy policy{{call, call, call}, {}};
    std::vector<Episode> episodes(1);
    episodes[0].example.prompt = first.prompt;
    EpisodeLimits limits;
    limits.max_turns = 2;
    limits.max_response_len = budget;
    run_episodes(episodes, {first}, *env, std::ref(policy), limits, 1);
    // Two turns at most; with the small budget the tool's reply does not fit after the first.
    EXPECT_EQ(episodes[0].policy_turns, budget == 1000 ? 2 : 1);
    EXPECT_EQ(episodes[0].truncated, budget != 1000);
    EXPECT_EQ(episodes[0].reward, 0.0f);  // no final answer
  }
}

// The random policy makes no tool call, so each episode is its one final answer: the run with the
// tool is on policy and scores the answers with the run's reward.
TEST(CalculatorTool, TrainingRunWithTheToolIsOnPolicy) {
  TempDir dir("calculator_run");
  TrainConfig c = calculator_config(dir);
  c.tokenizer = "";
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.rollout_max_response_len = 8;
  c.check_true_on_policy = true;
  c.progress = false;
  testing::small_batches(c);
  c.num_rollout = 1;
  c.output_dir = dir.sub("out");
  EXPECT_EQ(run_training(c).max_abs_diff, 0.0);
  EXPECT_EQ(testing::read_metrics(c).at(0)["train/train_rollout_logprob_abs_diff"], 0.0);
}

TEST(CalculatorTool, FlagsAreCheckedBeforeAnyWork) {
  TrainConfig c;
  c.rollout_tool = "search";
  EXPECT_EQ(error_of([&] { validate(c); }), "--rollout-tool: expected calculator, got 'search'");
  c.rollout_tool = "calculator";
  EXPECT_EQ(error_of([&] { validate(c); }),
            "--rollout-tool needs --prompt-data (an environment speaks text; the built-in tasks have none)");
  c.rollout_max_turns = 0;
  EXPECT_EQ(error_of([&] { validate(c); }), "--rollout-max-turns: expected >= 1, got 0");
}

}  // namespace
}  // namespace lockstep::rl
