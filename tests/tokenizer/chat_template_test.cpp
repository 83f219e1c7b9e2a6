// The built-in Qwen3 renderer against renderings of the real Jinja template
// (chat_template_cases.json, written by gen_chat_cases.py with jinja2).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/chat_json.h"

namespace lockstep {
namespace {

using nlohmann::ordered_json;

TEST(ChatTemplate, MatchesJinjaRenderings) {
  const Tokenizer& tok = test::qwen3();
  const auto cases = ordered_json::parse(
      test::read_text(std::string(LOCKSTEP_SOURCE_DIR) + "/tests/tokenizer/chat_template_cases.json"));
  ASSERT_GE(cases.size(), 15u);
  for (const auto& c : cases) {
    const ordered_json& request = c.at("request");
    ChatOptions options;
    options.add_generation_prompt = request.value("add_generation_prompt", true);
    options.enable_thinking = request.value("enable_thinking", true);
    if (request.contains("tools")) options.tools = chat_tools_from_json(request["tools"], "");
    const auto messages = chat_messages_from_json(request.at("messages"), "");
    const std::string text = tok.render_chat(messages, options);
    EXPECT_EQ(text, c.at("text").get<std::string>()) << "case: " << c.at("name");
    EXPECT_EQ(tok.decode(tok.encode(text)), text) << "case: " << c.at("name");
  }
}

TEST(ChatTemplate, ThinkTagsBecomeSingleTokens) {
  const Tokenizer& tok = test::qwen3();
  const std::string text = tok.render_chat({{"user", "hi"}}, ChatOptions{true, false, {}});
  const auto ids = tok.encode(text);
  const std::vector<int32_t> tail(ids.end() - 4, ids.end());
  EXPECT_EQ(tail, (std::vector<int32_t>{151667, 271, 151668, 271}));  // <think> \n\n </think> \n\n
}

TEST(ChatTemplate, RejectsBadRequests) {
  const Tokenizer& tok = test::qwen3();
  EXPECT_THROW(tok.render_chat({}, ChatOptions{}), Error);
  auto bad = [](const char* json) {
    try {
      chat_messages_from_json(ordered_json::parse(json), "line 7: ");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(bad(R"([{"role": "bot", "content": "x"}])").find("line 7: messages[0].role"), std::string::npos);
  EXPECT_NE(bad(R"([{"content": "x"}])").find("messages[0].role: missing"), std::string::npos);
  EXPECT_NE(bad(R"([{"role": "user", "content": 5}])").find("messages[0].content: expected a string"),
            std::string::npos);
  EXPECT_NE(bad(R"({"role": "user"})").find("messages: expected an array"), std::string::npos);
  EXPECT_NE(bad(R"([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}])")
                .find("tool_calls[0].function.arguments: missing"),
            std::string::npos);
}

TEST(ChatTemplate, NeedsAConfigWithTheQwen3Template) {
  const std::string tokenizer_json = test::read_text(test::fixture_dir() + "/tokenizer.json");
  const Tokenizer no_config = Tokenizer::from_json(tokenizer_json, "");
  EXPECT_THROW(no_config.render_chat({{"user", "hi"}}, ChatOptions{}), Error);
  const Tokenizer other = Tokenizer::from_json(tokenizer_json, R"({"chat_template": "{{ messages }}"})");
  EXPECT_THROW(other.render_chat({{"user", "hi"}}, ChatOptions{}), Error);
}

TEST(ChatTemplate, TojsonMatchesPythonJsonDumps) {
  const auto value = ordered_json::parse(R"({"z": 1, "a": [true, null, 2.5, "é\n\"q\""], "m": {}})");
  EXPECT_EQ(template_tojson(value), R"({"z": 1, "a": [true, null, 2.5, "é\n\"q\""], "m": {}})");
}

}  // namespace
}  // namespace lockstep
