// --rollout-env-url: multi-turn rollouts against an environment server this test starts on
// 127.0.0.1. The episodes are token in, token out (each turn continues the exact ids of the turns
// and observations before it), the observations are the template's rendering with loss mask 0,
// the policy's log-probs equal the trainer's scoring bit for bit, a whole training run is on
// policy on every trained token, and a server's malformed answer stops the run with its reason.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "core/error.h"
#include "dist/thread_communicator.h"
#include "env_test_server.h"
#include "model/qwen3_moe.h"
#include "model/runner.h"
#include "rl/chat_observation.h"
#include "rl/environment.h"
#include "rl/http_env.h"
#include "rl/step_rollout.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"
#include "rollout/replica_split.h"

namespace lockstep::rl {
namespace {

using nlohmann::json;
using testing::error_of;
using testing::read_metrics;
using testing::TempDir;

// The observation after policy turn k (k = 1, 2); the episode is done after turn 3, rewarded by
// the parity of its last token.
std::string observation(int64_t turn) { return "Turn " + std::to_string(turn) + ": go on."; }
std::string role(int64_t turn) { return turn == 1 ? "user" : "tool"; }

// Observations after turns 1 and 2, then done, rewarded by the parity of the last token.
json parity_answer(const json& body) {
  const int64_t turn = body.at("turn");
  return turn < 3 ? json{{"observation", observation(turn)}, {"role", role(turn)}, {"done", false}}
                  : json{{"reward", body.at("response_ids").back().get<int>() % 2}, {"done", true}};
}

TrainConfig env_config(const TempDir& dir, const std::string& url) {
  TrainConfig c;
  c.prompt_data = dir.sub("data.jsonl");
  if (!std::filesystem::exists(c.prompt_data))
    std::ofstream(c.prompt_data) << R"({"prompt": "What is 2 + 2?", "label": "4"})"
                                 << "\n"
                                 << R"({"prompt": "Say hi.", "label": "hi"})"
                                 << "\n";
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.apply_chat_template = true;
  c.rollout_env_url = url;
  c.rollout_max_turns = 3;
  c.rollout_max_turn_len = 4;
  c.rollout_max_response_len = 80;
  c.sft_warmup_steps = 0;
  c.check_true_on_policy = true;
  c.progress = false;
  testing::small_batches(c);
  c.num_rollout = 2;
  c.output_dir = dir.sub("out");
  return c;
}

TEST(EnvServer, EpisodesAreTokenInTokenOutWithTheTrainersBits) {
  TempDir dir("env_episodes");
  testing::EnvTestServer server(parity_answer);
  const TrainConfig c = env_config(dir, server.url("/env"));
  validate(c);
  auto source = make_prompt_source(c);
  auto env = make_environment(c, *source, nullptr);
  const Tokenizer tok = Tokenizer::load(c.load);
  ModelWeights weights = ModelWeights::load(c.load, Precision::float32);
  rollout::Engine engine(make_cpu_runner(weights.clone(), Precision::float32), rollout::EngineOptions{});
  auto generate = [&](const std::vector<std::optional<rollout::GenerationRequest>>& r) {
    return rollout::run_on_replicas(engine, r, 1, 0, {});
  };
  const StepRollout drawn = sample_step(c, *source, *env, 3, 99, 0, 1, generate);
  ASSERT_EQ(drawn.samples.size(), 4u);

  const Qwen3Moe model(std::move(weights), Precision::float32);
  for (const Episode& e : drawn.samples) {
    ASSERT_EQ(e.policy_turns, 3);
    ASSERT_EQ(e.spans.size(), 5u);  // turn, observation, turn, observation, turn
    EXPECT_EQ(e.reward, float(e.response.back() % 2));
    std::vector<int32_t> expected;
    for (size_t k = 0; k < e.spans.size(); ++k) {
      const EpisodeSpan& s = e.spans[k];
      const std::vector<int32_t> part(e.response.begin() + s.begin, e.response.begin() + s.end);
      if (s.policy) {
        EXPECT_EQ(part.size(), 4u);  // --rollout-max-turn-len: the random policy never ends a turn itself
      } else {
        const int64_t turn = int64_t(k + 1) / 2;
        EXPECT_EQ(s.role, role(turn));
        // The turn was cut without <|im_end|>: the template's rendering closes it first.
        EXPECT_EQ(part, tok.encode(chat_observation_text(tok, {ChatMessage(role(turn), observation(turn))},
                                                         /*enable_thinking=*/true, false)));
      }
      expected.insert(expected.end(), part.begin(), part.end());
      for (int64_t t = s.begin; t < s.end; ++t) EXPECT_EQ(e.loss_mask[size_t(t)], s.policy ? 1 : 0);
    }
    EXPECT_EQ(e.response, expected);
    // The rollout's log-probs are the trainer's scoring of the whole sequence, bit for bit.
    std::vector<int32_t> seq = e.example.prompt;
    seq.insert(seq.end(), e.response.begin(), e.response.end());
    const std::vector<float> scored = score_sequences(model, {seq})[0];
    for (size_t t = 0; t < e.response.size(); ++t) {
      const float want = e.loss_mask[t] ? scored[e.example.prompt.size() - 1 + t] : 0.0f;
      EXPECT_EQ(std::memcmp(&want, &e.logprobs[t], sizeof(float)), 0) << "token " << t;
    }
  }
  // Every request showed the server the conversation so far: the exact ids the policy goes on
  // from, and the turns as messages.
  const std::vector<json> bodies = server.bodies();
  ASSERT_EQ(bodies.size(), 12u);  // 4 episodes x 3 turns
  for (const json& b : bodies) {
    const int64_t turn = b.at("turn");
    const auto ids = b.at("response_ids").get<std::vector<int32_t>>();
    const auto prompt_ids = b.at("prompt_ids").get<std::vector<int32_t>>();
    bool continued = false;
    for (const Episode& e : drawn.samples)
      continued |= e.example.prompt == prompt_ids && ids.size() == size_t(e.spans[2 * (turn - 1)].end) &&
                   std::equal(ids.begin(), ids.end(), e.response.begin());
    EXPECT_TRUE(continued) << b.dump();
    ASSERT_EQ(b.at("messages").size(), size_t(2 * turn - 1));
    EXPECT_EQ(b["messages"][0]["role"], "assistant");
    if (turn > 1) {
      EXPECT_EQ(b["messages"][1], (json{{"role", "user"}, {"content", observation(1)}}));
    }
    const bool first_prompt = b.at("prompt").get<std::string>().find("What is 2 + 2?") != std::string::npos;
    EXPECT_EQ(b.at("label"), first_prompt ? "4" : "hi");
  }
}

TEST(EnvServer, TrainingRunIsOnPolicyOnEveryTrainedToken) {
  TempDir dir("env_run");
  testing::EnvTestServer server(parity_answer);
  const TrainConfig c = env_config(dir, server.url("/env"));
  const TrainSummary s = run_training(c);  // --check-true-on-policy: any bit difference is an error
  EXPECT_EQ(s.steps_run, 2);
  EXPECT_EQ(s.max_abs_diff, 0.0);
  for (const auto& m : read_metrics(c)) {
    EXPECT_EQ(m["train/train_rollout_logprob_abs_diff"], 0.0);
    EXPECT_GT(m["rollout/response_lengths"].get<double>(), 12.0);  // three turns and two observations
  }
  EXPECT_EQ(server.bodies().size(), 2u * 4u * 3u);  // steps x episodes x turns
}

TEST(EnvServer, UnderRanksOnlyRankZeroAsksTheServer) {
  TempDir dir("env_ranks");
  testing::EnvTestServer server(parity_answer);
  TrainConfig c = env_config(dir, server.url("/env"));
  c.num_rollout = 1;
  c.num_threads = 1;  // the thread ranks share one process: no kernel thread pool between them
  dist::run_threads(2, [&](dist::Communicator& comm) { run_training(c, &comm); });
  EXPECT_EQ(server.bodies().size(), 4u * 3u);  // episodes x turns, once
  EXPECT_EQ(read_metrics(c).at(0)["train/train_rollout_logprob_abs_diff"], 0.0);
  c.rollout_env_url = server.url("/no_done");
  c.rollout_env_retries = 0;
  c.output_dir = dir.sub("out_failing");
  EXPECT_NE(error_of([&] {
              dist::run_threads(2, [&](dist::Communicator& comm) { run_training(c, &comm); });
            }).find("\"done\": expected true or false"),
            std::string::npos);
}

TEST(EnvServer, MalformedAnswersStopTheRunWithTheirReason) {
  TempDir dir("env_bad");
  testing::EnvTestServer server(parity_answer);
  TrainConfig c = env_config(dir, server.url("/garbage"));
  c.rollout_env_retries = 0;
  EXPECT_EQ(error_of([&] { run_training(c); }),
            "--rollout-env-url " + c.rollout_env_url +
                ": episode 0 failed after 1 attempts: expected a JSON object {\"observation\": text, \"reward\": "
                "number, \"done\": bool}, got '{\"observation\": '");
  c.rollout_env_url = server.url("/no_done");
  EXPECT_EQ(error_of([&] { run_training(c); }), "--rollout-env-url " + c.rollout_env_url +
                                                    ": episode 0 failed after 1 attempts: \"done\": expected true or "
                                                    "false, got '{\"observation\": \"x\"}'");
  EXPECT_EQ(error_of([] { parse_env_answer(R"({"done": false, "reward": 1})"); }),
            "\"observation\": expected text when \"done\" is false, got '{\"done\": false, \"reward\": 1}'");
  EXPECT_EQ(error_of([] { parse_env_answer(R"({"done": false, "observation": "x", "role": "system"})"); }),
            "\"role\": expected \"user\" or \"tool\", got '{\"done\": false, \"observation\": \"x\", \"role\": "
            "\"system\"}'");
  EXPECT_EQ(error_of([] { parse_env_answer(R"({"done": true, "reward": "1"})"); }),
            "\"reward\": expected a number, got '{\"done\": true, \"reward\": \"1\"}'");
  const EnvReply r = parse_env_answer(R"({"done": true, "reward": 0.5})");
  EXPECT_TRUE(r.done);
  EXPECT_EQ(r.reward, 0.5f);
}

TEST(EnvServer, FlagsAreCheckedBeforeAnyWork) {
  TrainConfig c;
  c.rollout_env_url = "http://127.0.0.1:9/env";
  EXPECT_EQ(error_of([&] { validate(c); }),
            "--rollout-env-url needs --prompt-data (an environment speaks text; the built-in tasks have none)");
  TempDir dir("env_flags");
  c = env_config(dir, "https://env:1/x");
  EXPECT_EQ(error_of([&] { validate(c); }), "--rollout-env-url: expected http://HOST:PORT/PATH, got 'https://env:1/x'");
  c.rollout_env_url = "http://127.0.0.1:9/env";
  c.rollout_tool = "calculator";
  EXPECT_EQ(error_of([&] { validate(c); }), "--rollout-tool and --rollout-env-url: give one environment, not both");
}

}  // namespace
}  // namespace lockstep::rl
