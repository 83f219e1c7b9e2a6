// Evaluation in a multi-turn run (--eval-prompt-data with --rollout-tool or --rollout-env-url):
// each eval sample is an episode of the run's environment, the same loop as the rollouts'. With
// the calculator and a scripted policy the tool's reply reaches the policy's next turn as exact
// ids and the final answers get the run's reward; against an environment server started here the
// server sees every eval turn with the eval prompt's label and its rewards make the eval metrics.
#include <gtest/gtest.h>

#include <fstream>

#include "env_test_server.h"
#include "rl/calculator_env.h"
#include "rl/chat_observation.h"
#include "rl/environment.h"
#include "rl/eval.h"
#include "rl/rewards/local_reward.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

using nlohmann::json;
using testing::TempDir;

// Calls the calculator on its first turn and answers "42" once it has seen a tool response;
// records every prompt it is given.
struct CalculatorPolicy {
  const Tokenizer& tok;
  std::vector<int32_t> call, answer;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<rollout::RequestOutcome> operator()(const std::vector<std::optional<rollout::GenerationRequest>>& r) {
    std::vector<rollout::RequestOutcome> out(r.size());
    for (size_t i = 0; i < r.size(); ++i) {
      prompts.push_back(r[i]->prompt);
      const bool replied = tok.decode(r[i]->prompt).find("<tool_response>") != std::string::npos;
      out[i].result.output_ids = replied ? answer : call;
      out[i].result.logprobs.assign(out[i].result.output_ids.size(), -0.5f);
      out[i].result.weight_versions.assign(out[i].result.output_ids.size(), 0);
      out[i].result.finish_reason = rollout::FinishReason::stop;
    }
    return out;
  }
};

TEST(EvalEpisodes, CalculatorToolRepliesReachThePolicyAndTheAnswersAreScored) {
  TempDir dir("eval_calculator");
  const std::string data = dir.sub("calc.jsonl");
  std::ofstream(data) << R"({"prompt": "What is 6 * 7?", "label": "42"})"
                      << "\n"
                      << R"({"prompt": "What is 6 * 7 - 1?", "label": "41"})"
                      << "\n";
  TrainConfig c;
  c.eval_prompt_data = "calc " + data;
  c.rollout_tool = "calculator";
  c.apply_chat_template = true;
  c.enable_thinking = false;
  c.rollout_max_turns = 4;
  c.eval_max_response_len = 200;
  c.n_samples_per_eval_prompt = 2;
  const Tokenizer tok = Tokenizer::load(testing::fixture_tokenizer_dir());
  PromptDataOptions o;
  o.apply_chat_template = true;
  o.enable_thinking = false;
  o.tools = rollout_tool_definitions(c.rollout_tool);
  const Evaluator eval(c, o, tok);

  const int32_t im_end = *tok.token_id("<|im_end|>");
  CalculatorPolicy policy{tok,
                          tok.encode("<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": "
                                     "\"6 * 7\"}}\n</tool_call>"),
                          tok.encode("42"),
                          {}};
  policy.call.push_back(im_end);
  policy.answer.push_back(im_end);
  const RewardType exact = reward_type_from_name("exact");
  int64_t scored = 0;
  auto score = [&](const std::vector<RewardRequest>& r) {
    std::vector<float> out;
    for (const auto& x : r) out.push_back(local_reward(exact, x.response, x.label));
    scored += int64_t(r.size());
    return out;
  };
  const json m = eval.run(
      5, 7, [](rollout::GenerationRequest&) {}, std::ref(policy), score, nullptr);

  // Two turns per episode: the call, then (after the tool's reply) the answer, scored against
  // each prompt's label: 42 passes, 41 does not.
  EXPECT_EQ(m["step"], 5);
  EXPECT_DOUBLE_EQ(m["eval/calc"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(m["eval/calc/pass@1"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(m["eval/calc/pass@2"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(m["eval/calc/turns"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(m["eval/calc/truncated"].get<double>(), 0.0);
  EXPECT_EQ(scored, 4);  // only final answers are scored
  const std::vector<int32_t> reply =
      tok.encode(chat_observation_text(tok, {ChatMessage("tool", "42")}, /*enable_thinking=*/false, true));
  EXPECT_DOUBLE_EQ(m["eval/calc/response_lengths"].get<double>(),
                   double(policy.call.size() + reply.size() + policy.answer.size()));
  // Token in, token out: each second turn goes on from the prompt, the call and the tool's reply.
  ASSERT_EQ(policy.prompts.size(), 8u);
  for (size_t k = 4; k < 8; ++k) {
    const std::vector<int32_t>& first = policy.prompts[k - 4];
    std::vector<int32_t> want = first;
    want.insert(want.end(), policy.call.begin(), policy.call.end());
    want.insert(want.end(), reply.begin(), reply.end());
    EXPECT_EQ(policy.prompts[k], want) << "episode " << k - 4;
    EXPECT_NE(tok.decode(first).find("<tools>"), std::string::npos);  // the eval prompts show the tool
  }
}

// Rewards by label (1 for "6" and "4", else 0) after three turns, so the eval numbers are known
// whatever the random policy says.
json label_answer(const json& body) {
  const int64_t turn = body.at("turn");
  const std::string label = body.at("label");
  return turn < 3 ? json{{"observation", "Turn " + std::to_string(turn)}, {"done", false}}
                  : json{{"reward", label == "6" || label == "4" ? 1 : 0}, {"done", true}};
}

TEST(EvalEpisodes, EnvironmentServerRunsTheEvalEpisodesAndGivesTheirRewards) {
  TempDir dir("eval_env");
  testing::EnvTestServer server(label_answer);
  TrainConfig c;
  c.prompt_data = dir.sub("train.jsonl");
  std::ofstream(c.prompt_data) << R"({"prompt": "What is 2 + 2?", "label": "4"})"
                               << "\n"
                               << R"({"prompt": "Say hi.", "label": "hi"})"
                               << "\n";
  const std::string eval_data = dir.sub("eval.jsonl");
  std::ofstream(eval_data) << R"({"prompt": "What is 3 + 3?", "label": "6"})"
                           << "\n"
                           << R"({"prompt": "Say bye.", "label": "bye"})"
                           << "\n";
  c.eval_prompt_data = "env " + eval_data;
  c.n_samples_per_eval_prompt = 2;
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.apply_chat_template = true;
  c.rollout_env_url = server.url("/env");
  c.rollout_max_turns = 3;
  c.rollout_max_turn_len = 4;
  c.rollout_max_response_len = 80;
  c.eval_max_response_len = 60;
  c.sft_warmup_steps = 0;
  c.progress = false;
  testing::small_batches(c);
  c.num_rollout = 1;
  c.output_dir = dir.sub("out");
  run_training(c);

  std::vector<json> evals;
  for (const auto& m : testing::read_metrics(c))
    if (m.contains("eval/env")) evals.push_back(m);
  ASSERT_EQ(evals.size(), 2u);  // before the first step and after the last
  for (const json& e : evals) {
    EXPECT_DOUBLE_EQ(e["eval/env"].get<double>(), 0.5);
    EXPECT_DOUBLE_EQ(e["eval/env/pass@1"].get<double>(), 0.5);
    EXPECT_DOUBLE_EQ(e["eval/env/pass@2"].get<double>(), 0.5);
    EXPECT_DOUBLE_EQ(e["eval/env/turns"].get<double>(), 3.0);
    EXPECT_GT(e["eval/env/response_lengths"].get<double>(), 12.0);  // three turns and two observations
  }
  // 2 evaluations x 2 prompts x 2 samples x 3 turns, each with the conversation so far.
  std::vector<json> bodies;
  for (const json& b : server.bodies())
    if (b.at("label") == "6" || b.at("label") == "bye") bodies.push_back(b);
  ASSERT_EQ(bodies.size(), 24u);
  for (const json& b : bodies) {
    const int64_t turn = b.at("turn");
    EXPECT_EQ(b.at("messages").size(), size_t(2 * turn - 1)) << b.dump();
    if (turn > 1) {
      EXPECT_EQ(b["messages"][1], (json{{"role", "user"}, {"content", "Turn 1"}}));
    }
    const bool first = b.at("prompt").get<std::string>().find("What is 3 + 3?") != std::string::npos;
    EXPECT_EQ(b.at("label"), first ? "6" : "bye");
  }
}

}  // namespace
}  // namespace lockstep::rl
