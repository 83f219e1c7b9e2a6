// A built-in renderer for the Qwen3 chat template (tokenizer_config.json
// "chat_template"). It follows the Jinja source step by step; comments quote the
// conditions they mirror. No Jinja interpreter is involved.
#include <string>
#include <string_view>

#include "core/error.h"
#include "tokenizer/tokenizer_impl.h"

namespace lockstep {
namespace {

bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}
// Python's str.lstrip('\n') / rstrip('\n') / strip('\n').
std::string_view lstrip_nl(std::string_view s) {
  while (!s.empty() && s.front() == '\n') s.remove_prefix(1);
  return s;
}
std::string_view rstrip_nl(std::string_view s) {
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return s;
}
std::string_view strip_nl(std::string_view s) { return rstrip_nl(lstrip_nl(s)); }

// Python's s.split(sep)[-1] and s.split(sep)[0].
std::string_view after_last(std::string_view s, std::string_view sep) {
  const size_t at = s.rfind(sep);
  return at == std::string_view::npos ? s : s.substr(at + sep.size());
}
std::string_view before_first(std::string_view s, std::string_view sep) {
  const size_t at = s.find(sep);
  return at == std::string_view::npos ? s : s.substr(0, at);
}

bool is_tool_response(const std::string& content) {
  return starts_with(content, "<tool_response>") && ends_with(content, "</tool_response>");
}

}  // namespace

std::string Tokenizer::render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& options) const {
  LS_CHECK(impl_->has_config, "render_chat: no tokenizer_config.json was loaded next to ", impl_->origin,
           ", so there is no chat template");
  const std::string& tpl = impl_->chat_template;
  LS_CHECK(tpl.find("<|im_start|>") != std::string::npos && tpl.find("</think>") != std::string::npos &&
               tpl.find("last_query_index") != std::string::npos,
           "render_chat: the chat_template in tokenizer_config.json is not the Qwen3 template this renderer "
           "implements (expected <|im_start|>, </think> and last_query_index in it)");

  // The template indexes messages[0], which fails in Jinja for an empty list.
  LS_CHECK(!messages.empty(), "render_chat: messages is empty (the chat template needs at least one message)");
  const size_t n = messages.size();
  std::string out;
  const bool first_is_system = n > 0 && messages[0].role == "system";

  // {%- if tools %} ... {%- else %} system message {%- endif %}
  if (!options.tools.empty()) {
    out += "<|im_start|>system\n";
    if (first_is_system) out += messages[0].content + "\n\n";
    out +=
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
    for (const std::string& tool : options.tools) out += "\n" + tool;
    out +=
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n";
  } else if (first_is_system) {
    out += "<|im_start|>system\n" + messages[0].content + "<|im_end|>\n";
  }

  // The last user turn that is a real query (not a wrapped tool response), scanning
  // backwards; messages|length - 1 if there is none.
  size_t last_query_index = n == 0 ? 0 : n - 1;
  for (size_t i = n; i-- > 0;) {
    if (messages[i].role == "user" && !is_tool_response(messages[i].content)) {
      last_query_index = i;
      break;
    }
  }

  for (size_t i = 0; i < n; ++i) {
    const ChatMessage& m = messages[i];
    const bool first = i == 0, last = i + 1 == n;
    if (m.role == "user" || (m.role == "system" && !first)) {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      std::string_view reasoning;
      if (m.reasoning_content.has_value()) {
        reasoning = *m.reasoning_content;
      } else if (content.find("</think>") != std::string_view::npos) {
        reasoning = lstrip_nl(after_last(rstrip_nl(before_first(content, "</think>")), "<think>"));
        content = lstrip_nl(after_last(content, "</think>"));
      }
      // Reasoning is kept only for assistant turns after the last user query.
      if (i > last_query_index && (last || !reasoning.empty())) {
        out += "<|im_start|>assistant\n<think>\n";
        out += strip_nl(reasoning);
        out += "\n</think>\n\n";
        out += lstrip_nl(content);
      } else {
        out += "<|im_start|>assistant\n";
        out += content;
      }
      for (size_t k = 0; k < m.tool_calls.size(); ++k) {
        if ((k == 0 && !content.empty()) || k > 0) out += "\n";
        out += "<tool_call>\n{\"name\": \"" + m.tool_calls[k].name + "\", \"arguments\": " +
               m.tool_calls[k].arguments + "}\n</tool_call>";
      }
      out += "<|im_end|>\n";
    } else if (m.role == "tool") {
      if (first || messages[i - 1].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n" + m.content + "\n</tool_response>";
      if (last || messages[i + 1].role != "tool") out += "<|im_end|>\n";
    }
    // Any other role (or the leading system message) renders nothing, as in the template.
  }

  if (options.add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (!options.enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

}  // namespace lockstep
