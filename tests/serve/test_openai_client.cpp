// `lockstep serve` against the official `openai` npm client: completions (text and token
// ids), chat, streaming, logprobs, n > 1, seed, and an error. The client's answers must be
// the server's own (the same request over plain HTTP). Skipped, saying why, when npm, node or
// the package registry is unavailable.
#include <gtest/gtest.h>

#include "../cli/run_command.h"
#include "serve_process.h"
#include "tokenizer/tokenizer.h"

namespace lockstep {
namespace {

using Json = nlohmann::json;
using testing::post_json;

TEST(OpenAiClient, CompletionsChatStreamingLogprobsSeeds) {
  const std::string source = LOCKSTEP_SOURCE_DIR;
  auto install = testing::run_shell("timeout 600 " + source + "/scripts/install_openai_client.sh");
  if (install.status != 0) GTEST_SKIP() << "the openai npm package is not available: " << install.output;

  auto dir = testing::make_text_model("openai-tiny");
  testing::ServeProcess server("--model " + dir.string());
  auto node = testing::run_shell("timeout 120 node " + source + "/tests/serve/openai_client.cjs " + server.url() +
                                 "/v1 openai-tiny " + source + "/third_party/npm 2>/dev/null");
  ASSERT_EQ(node.status, 0) << node.output;
  const Json got = Json::parse(node.output);
  const Tokenizer tokenizer = Tokenizer::load(dir.string());
  auto c = server.client();

  EXPECT_EQ(got["models"], Json::array({"openai-tiny"}));

  // Completions, n = 2 with a seed and logprobs: the same bytes as a plain HTTP request.
  const Json& completion = got["completion"];
  Json direct = post_json(*c, "/v1/completions",
                          {{"model", "openai-tiny"},
                           {"prompt", "Once upon a time"},
                           {"max_tokens", 8},
                           {"seed", 7},
                           {"n", 2},
                           {"logprobs", 0},
                           {"ignore_eos", true}});
  ASSERT_EQ(completion["choices"].size(), 2u);
  EXPECT_EQ(completion["prompt_ids"].get<std::vector<int32_t>>(), tokenizer.encode("Once upon a time"));
  for (int i = 0; i < 2; ++i) {
    const Json& choice = completion["choices"][i];
    EXPECT_EQ(choice["output_ids"], direct["choices"][i]["output_ids"]);
    EXPECT_EQ(choice["output_logprobs"], direct["choices"][i]["output_logprobs"]);
    EXPECT_EQ(choice["logprobs"]["token_logprobs"], choice["output_logprobs"]);
    EXPECT_EQ(choice["text"], tokenizer.decode(choice["output_ids"].get<std::vector<int32_t>>(), true));
    EXPECT_EQ(choice["weight_version"], 0);
  }
  EXPECT_NE(completion["choices"][0]["output_ids"], completion["choices"][1]["output_ids"]);
  EXPECT_EQ(completion["usage"]["completion_tokens"], 16);

  // Token-id prompt.
  EXPECT_EQ(got["completion_ids"]["prompt_ids"], Json::array({1, 2, 3}));
  EXPECT_EQ(got["completion_ids"]["choices"][0]["output_ids"],
            post_json(*c, "/v1/completions",
                      {{"prompt", {1, 2, 3}}, {"max_tokens", 5}, {"seed", 3}})["choices"][0]["output_ids"]);

  // Chat with logprobs, then the same request streamed: the same tokens and text.
  const Json& chat = got["chat"]["choices"][0];
  const auto chat_ids = chat["output_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(chat_ids.size(), 8u);
  EXPECT_EQ(chat["message"]["content"], tokenizer.decode(chat_ids, true));
  ASSERT_EQ(chat["logprobs"]["content"].size(), 8u);
  for (size_t t = 0; t < 8; ++t) EXPECT_EQ(chat["logprobs"]["content"][t]["logprob"], chat["output_logprobs"][t]);
  const Json& streamed = got["chat_stream"];
  EXPECT_GT(streamed["chunks"], 2);
  EXPECT_EQ(streamed["output_ids"], chat["output_ids"]);
  EXPECT_EQ(streamed["output_logprobs"], chat["output_logprobs"]);
  EXPECT_EQ(streamed["text"], chat["message"]["content"]);
  EXPECT_EQ(streamed["finish_reason"], "length");
  EXPECT_EQ(streamed["usage"]["completion_tokens"], 8);

  // Top log-probs: the greedy token is the top-1 with its own log-prob, then by log-prob.
  const Json& top = got["chat_top"]["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(top.size(), 8u);
  for (const Json& t : top) {
    ASSERT_EQ(t["top_logprobs"].size(), 3u);
    EXPECT_EQ(t["top_logprobs"][0]["token"], t["token"]);
    EXPECT_EQ(t["top_logprobs"][0]["logprob"], t["logprob"]);
    EXPECT_EQ(t["top_logprobs"][0]["bytes"], t["bytes"]);
    EXPECT_GE(t["top_logprobs"][1]["logprob"].get<double>(), t["top_logprobs"][2]["logprob"].get<double>());
    EXPECT_GE(t["logprob"].get<double>(), t["top_logprobs"][1]["logprob"].get<double>());
  }
  EXPECT_EQ(got["chat_top_stream"], top);
  const Json& completion_top = got["completion_top"]["choices"][0]["logprobs"];
  ASSERT_EQ(completion_top["top_logprobs"].size(), 4u);
  for (size_t t = 0; t < 4; ++t) {
    const Json& entries = completion_top["top_logprobs"][t];
    EXPECT_TRUE(entries.size() == 2u || entries.size() == 1u) << entries;  // two ids may share a text
    EXPECT_EQ(entries[completion_top["tokens"][t].get<std::string>()], completion_top["token_logprobs"][t]);
  }

  // The client surfaces the server's error object.
  EXPECT_EQ(got["error"]["status"], 400);
  EXPECT_EQ(got["error"]["param"], "max_tokens");
  EXPECT_EQ(got["error"]["type"], "invalid_request_error");
}

}  // namespace
}  // namespace lockstep
