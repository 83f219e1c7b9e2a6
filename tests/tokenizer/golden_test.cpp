// Every case in tokenizer_golden.json (produced by HF tokenizers / transformers) must
// match exactly: encode ids, decode text, chat rendering and its ids.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace lockstep {
namespace {

nlohmann::json golden() {
  return nlohmann::json::parse(test::read_text(test::fixture_dir() + "/tokenizer_golden.json"));
}

TEST(TokenizerGolden, EncodeAndDecode) {
  const Tokenizer& tok = test::qwen3();
  const auto cases = golden().at("encode");
  ASSERT_GE(cases.size(), 10u);
  for (const auto& c : cases) {
    const std::string text = c.at("text");
    const auto expected = c.at("ids").get<std::vector<int32_t>>();
    EXPECT_EQ(tok.encode(text), expected) << "text: " << text;
    EXPECT_EQ(tok.decode(expected), c.at("decoded").get<std::string>()) << "text: " << text;
  }
}

TEST(TokenizerGolden, ChatRenderingAndIds) {
  const Tokenizer& tok = test::qwen3();
  const auto cases = golden().at("chat");
  ASSERT_GE(cases.size(), 2u);
  for (const auto& c : cases) {
    std::vector<ChatMessage> messages;
    for (const auto& m : c.at("messages")) messages.push_back({m.at("role"), m.at("content")});
    ChatOptions options;
    options.add_generation_prompt = c.value("add_generation_prompt", true);
    options.enable_thinking = c.value("enable_thinking", true);
    const std::string text = tok.render_chat(messages, options);
    EXPECT_EQ(text, c.at("text").get<std::string>());
    EXPECT_EQ(tok.encode(text), c.at("ids").get<std::vector<int32_t>>());
  }
}

}  // namespace
}  // namespace lockstep
