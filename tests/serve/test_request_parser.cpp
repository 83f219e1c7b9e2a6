// The OpenAI request parser: what it accepts, the 400s it gives (naming the field), and a
// fuzz of mutated bodies that must only ever yield a valid request or an ApiError.
#include <gtest/gtest.h>

#include <limits>
#include <random>

#include "core/error.h"
#include "serve/openai_request.h"

namespace lockstep::serve {
namespace {

using Json = nlohmann::json;

class RequestParser : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tokenizer_ = new Tokenizer(Tokenizer::load(std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer"));
    config_ = new ModelConfig(ModelConfig::from_json({{"model_type", "qwen3_moe"},
                                                      {"vocab_size", 151936},
                                                      {"hidden_size", 16},
                                                      {"num_hidden_layers", 1},
                                                      {"num_attention_heads", 2},
                                                      {"num_key_value_heads", 1},
                                                      {"head_dim", 8},
                                                      {"num_experts", 4},
                                                      {"num_experts_per_tok", 2},
                                                      {"moe_intermediate_size", 8},
                                                      {"max_position_embeddings", 64},
                                                      {"eos_token_id", 151645}},
                                                     "config.json"));
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    delete config_;
  }
  ServedModel model(bool with_tokenizer = true) const {
    return {"tiny", config_, with_tokenizer ? tokenizer_ : nullptr};
  }
  // The ApiError a body gets (fails the test when it is accepted).
  ApiError refusal(const Json& body, Endpoint e = Endpoint::completions, bool with_tokenizer = true) const {
    return refusal_text(body.dump(), e, with_tokenizer);
  }
  ApiError refusal_text(const std::string& body, Endpoint e = Endpoint::completions, bool with_tokenizer = true) const {
    try {
      parse_api_request(body, e, model(with_tokenizer));
    } catch (const ApiError& err) {
      return err;
    }
    ADD_FAILURE() << "accepted: " << body;
    return ApiError(0, "");
  }
  static Tokenizer* tokenizer_;
  static ModelConfig* config_;
};

Tokenizer* RequestParser::tokenizer_ = nullptr;
ModelConfig* RequestParser::config_ = nullptr;

TEST_F(RequestParser, TextAndTokenPromptsAndSampling) {
  auto r = parse_api_request(R"({"model":"tiny","prompt":"Hello world","max_tokens":7,"temperature":0.5,
      "top_p":0.9,"top_k":20,"seed":42,"n":3,"stop":"\n\n","logprobs":0})",
                             Endpoint::completions, model());
  EXPECT_EQ(r.prompt, tokenizer_->encode("Hello world"));
  EXPECT_EQ(r.max_tokens, 7);
  EXPECT_EQ(r.n, 3);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.sampling.top_p, 0.9f);
  EXPECT_EQ(r.sampling.top_k, 20);
  EXPECT_TRUE(r.logprobs);
  EXPECT_EQ(r.stop, std::vector<std::string>{"\n\n"});
  EXPECT_EQ(r.choice(0).sampling.seed, 42u);
  EXPECT_EQ(r.choice(2).sampling.seed, 44u);
  // EOS ids: the config's and the tokenizer's, unless ignore_eos.
  EXPECT_NE(std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), 151645), r.stop_token_ids.end());
  auto ids = parse_api_request(R"({"prompt":[[5,6,7]],"ignore_eos":true,"stop_token_ids":[9]})", Endpoint::completions,
                               model(false));
  EXPECT_EQ(ids.prompt, (std::vector<int32_t>{5, 6, 7}));
  EXPECT_EQ(ids.stop_token_ids, std::vector<int32_t>{9});
  EXPECT_EQ(ids.max_tokens, 16);  // OpenAI's completions default
}

TEST_F(RequestParser, ChatUsesTheTemplateAndThinkingSwitch) {
  const std::vector<ChatMessage> messages = {{"user", "Hi"}};
  ChatOptions no_think;
  no_think.enable_thinking = false;
  auto r = parse_api_request(R"({"messages":[{"role":"user","content":"Hi"}],
      "chat_template_kwargs":{"enable_thinking":false},"max_completion_tokens":5,"logprobs":true})",
                             Endpoint::chat, model());
  EXPECT_EQ(r.prompt, tokenizer_->encode(tokenizer_->render_chat(messages, no_think)));
  EXPECT_EQ(r.max_tokens, 5);
  EXPECT_TRUE(r.logprobs);
  auto think = parse_api_request(R"({"messages":[{"role":"user","content":"Hi"}]})", Endpoint::chat, model());
  EXPECT_EQ(think.prompt, tokenizer_->encode(tokenizer_->render_chat(messages, ChatOptions{})));
  EXPECT_EQ(think.max_tokens, 64 - int64_t(think.prompt.size()));  // chat default: the rest of the context
}

TEST_F(RequestParser, BadInputNamesTheField) {
  EXPECT_EQ(refusal_text("{\"prompt\": [1,2").param, "");
  EXPECT_NE(std::string(refusal_text("{\"prompt\": [1,2").what()).find("not valid JSON"), std::string::npos);
  EXPECT_EQ(refusal_text("[1,2,3]").status, 400);
  EXPECT_EQ(refusal({{"prompt", "x"}, {"model", "other"}}).code, "model_not_found");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"max_tokens", 0}}).param, "max_tokens");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"max_tokens", -3}}).param, "max_tokens");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"max_tokens", "5"}}).param, "max_tokens");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"n", 0}}).param, "n");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"temperature", -1}}).param, "temperature");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"top_p", 0}}).param, "top_p");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"seed", 1.5}}).param, "seed");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"stream", "yes"}}).param, "stream");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"stop", 3}}).param, "stop");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"logprobs", 21}}).param, "logprobs");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"frequency_penalty", 0.5}}).param, "frequency_penalty");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"logit_bias", {{"5", 100}}}}).param, "logit_bias");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"best_of", 3}}).param, "best_of");
  EXPECT_EQ(refusal({{"prompt", "x"}, {"echo", true}}).param, "echo");
  EXPECT_EQ(refusal({{"prompt", Json::array()}}).param, "prompt");
  EXPECT_EQ(refusal({{"prompt", {1, -1}}}).param, "prompt[1]");
  EXPECT_EQ(refusal({{"prompt", {1, 151936}}}).param, "prompt[1]");
  EXPECT_EQ(refusal({{"prompt", {"a", "b"}}}).param, "prompt");
  EXPECT_EQ(refusal({{"prompt", std::vector<int>(64, 1)}}).code, "context_length_exceeded");
  EXPECT_EQ(refusal({{"messages", Json::array()}}, Endpoint::chat).param, "messages");
  EXPECT_EQ(refusal({{"messages", {{{"role", "robot"}, {"content", "x"}}}}}, Endpoint::chat).param, "messages");
  const Json chat = {{"messages", {{{"role", "user"}, {"content", "x"}}}}, {"logprobs", true}};
  for (const Json& bad : {Json{{"top_logprobs", 21}}, Json{{"top_logprobs", -1}}, Json{{"top_logprobs", 1.5}}}) {
    Json body = chat;
    body.update(bad);
    EXPECT_EQ(refusal(body, Endpoint::chat).param, "top_logprobs") << bad;
  }
  Json no_logprobs = chat;
  no_logprobs["logprobs"] = false;
  no_logprobs["top_logprobs"] = 2;
  EXPECT_EQ(std::string(refusal(no_logprobs, Endpoint::chat).what()),
            "top_logprobs: needs \"logprobs\": true, got top_logprobs 2");
  // Without a tokenizer: token ids only, and the message says so.
  ApiError text = refusal({{"prompt", "hello"}}, Endpoint::completions, false);
  EXPECT_EQ(text.param, "prompt");
  EXPECT_NE(std::string(text.what()).find("token ids"), std::string::npos);
  EXPECT_EQ(refusal({{"messages", {{{"role", "user"}, {"content", "x"}}}}}, Endpoint::chat, false).param, "messages");
  EXPECT_EQ(refusal({{"prompt", {1}}, {"stop", "x"}}, Endpoint::completions, false).param, "stop");
  // Invalid UTF-8 inside a JSON string, and nesting bombs.
  EXPECT_EQ(refusal_text("{\"prompt\":\"\xff\xfe\"}").status, 400);
  EXPECT_EQ(refusal_text(std::string(100000, '[') + std::string(100000, ']')).status, 400);
  // The error object has OpenAI's shape.
  Json body = error_body(refusal({{"prompt", "x"}, {"max_tokens", 0}}));
  EXPECT_EQ(body["error"]["param"], "max_tokens");
  EXPECT_EQ(body["error"]["type"], "invalid_request_error");
  EXPECT_TRUE(body["error"]["code"].is_null());
  EXPECT_TRUE(body["error"]["message"].is_string());
}

// A temperature so small that logits / T overflow is refused (0 stays greedy), by the
// request parser and by the engine's validator that every front end goes through.
TEST_F(RequestParser, TemperatureTooSmallToDivideByIsRefused) {
  for (double t : {1e-30, 1e-7}) EXPECT_EQ(refusal({{"prompt", "x"}, {"temperature", t}}).param, "temperature");
  for (double t : {0.0, 1e-300 /* 0 in f32: greedy */, 1e-6, 0.7, 100.0})
    EXPECT_NO_THROW(
        parse_api_request(Json{{"prompt", "x"}, {"temperature", t}}.dump(), Endpoint::completions, model()));
  rollout::GenerationRequest r;
  r.prompt = {1, 2};
  for (float t :
       {1e-30f, 1e-7f, -1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    r.sampling.temperature = t;
    EXPECT_THROW(rollout::validate_request(r, *config_), lockstep::Error) << t;
  }
  r.sampling.temperature = 0.0f;
  EXPECT_NO_THROW(rollout::validate_request(r, *config_));
}

// Nesting past the JSON depth limit is a 400 at any depth, never a crash.
TEST_F(RequestParser, DeepNestingIsA400) {
  for (int depth : {600, 1000000}) {
    const std::string body = "{\"prompt\": \"x\", \"user\": " + std::string(depth, '[') + std::string(depth, ']') + "}";
    const ApiError e = refusal_text(body);
    EXPECT_EQ(e.status, 400);
    EXPECT_EQ(e.code, "invalid_json");
    EXPECT_NE(std::string(e.what()).find("nests deeper than 512 levels"), std::string::npos) << e.what();
  }
}

// Mutated bodies: every outcome is a request that passes the engine's checks, or an ApiError
// with status 400; nothing else is thrown and nothing crashes.
TEST_F(RequestParser, FuzzedBodiesNeverEscape) {
  const std::vector<std::string> seeds = {
      R"({"model":"tiny","prompt":"Hello","max_tokens":4,"n":2,"seed":1,"stop":["a","bc"],"logprobs":0})",
      R"({"prompt":[1,2,3],"temperature":0.7,"top_p":0.5,"top_k":3,"stream":true,)"
      R"("stream_options":{"include_usage":true}})",
      R"({"messages":[{"role":"system","content":"s"},{"role":"user","content":"Hi"}],)"
      R"("chat_template_kwargs":{"enable_thinking":false},"logprobs":true,"top_logprobs":0})",
  };
  // clang-format off
  const std::vector<std::string> fragments = {"{", "}", "[", "]", "\"", ":", ",", "null", "-1", "1e999", "0",
                                              "18446744073709551616", "\"\xc3\x28\"", "true", "[[[[", "\\u0000",
                                              "\"prompt\"", "\"n\"", "\"max_tokens\"", "\"messages\"", "1.5"};
  // clang-format on
  std::mt19937_64 rng(20);
  int accepted = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::string body = seeds[rng() % seeds.size()];
    const int edits = 1 + int(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = body.empty() ? 0 : rng() % body.size();
      switch (rng() % 4) {
        case 0: body.insert(at, fragments[rng() % fragments.size()]); break;
        case 1: body.erase(at, 1 + rng() % 6); break;
        case 2:
          if (!body.empty()) body[at] = char(rng() % 256);
          break;
        default: body.insert(at, body.substr(at, rng() % 12)); break;
      }
    }
    const Endpoint endpoint = body.find("messages") != std::string::npos ? Endpoint::chat : Endpoint::completions;
    try {
      ApiRequest r = parse_api_request(body, endpoint, model(iter % 2 == 0));
      for (int64_t i = 0; i < r.n; ++i) rollout::validate_request(r.choice(i), *config_);
      ASSERT_GE(r.max_tokens, 1) << body;
      ASSERT_TRUE(r.n >= 1 && r.n <= kMaxChoices) << body;
      ++accepted;
    } catch (const ApiError& e) {
      ASSERT_EQ(e.status, 400) << body;
      ASSERT_FALSE(std::string(e.what()).empty()) << body;
    } catch (const std::exception& e) {
      FAIL() << "escaped " << typeid(e).name() << ": " << e.what() << "\nbody: " << body;
    }
  }
  EXPECT_GT(accepted, 100);  // the fuzz also reaches the accepting paths
}

TEST_F(RequestParser, TopLogprobsReachTheEngineRequest) {
  const std::string chat = R"({"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":20})";
  EXPECT_EQ(parse_api_request(chat, Endpoint::chat, model()).choice(0).top_logprobs, 20);
  const ApiRequest completion = parse_api_request(R"({"prompt":"x","logprobs":3})", Endpoint::completions, model());
  EXPECT_TRUE(completion.logprobs);
  EXPECT_EQ(completion.choice(1).top_logprobs, 3);
  EXPECT_EQ(parse_api_request(R"({"prompt":"x","logprobs":true})", Endpoint::completions, model()).top_logprobs, 0);
  EXPECT_EQ(parse_api_request(R"({"prompt":"x","logprobs":0})", Endpoint::completions, model()).top_logprobs, 0);
}

}  // namespace
}  // namespace lockstep::serve
