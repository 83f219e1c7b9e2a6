#include "tokenizer/chat_json.h"

#include "core/error.h"

namespace lockstep {
namespace {

using nlohmann::ordered_json;

const char* type_name(const ordered_json& j) {
  switch (j.type()) {
    case ordered_json::value_t::null: return "null";
    case ordered_json::value_t::object: return "an object";
    case ordered_json::value_t::array: return "an array";
    case ordered_json::value_t::string: return "a string";
    case ordered_json::value_t::boolean: return "a boolean";
    default: return "a number";
  }
}

void dump_python_style(const ordered_json& j, std::string& out) {
  if (j.is_object()) {
    out += '{';
    bool first = true;
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!first) out += ", ";
      first = false;
      out += ordered_json(it.key()).dump();
      out += ": ";
      dump_python_style(it.value(), out);
    }
    out += '}';
  } else if (j.is_array()) {
    out += '[';
    for (size_t i = 0; i < j.size(); ++i) {
      if (i) out += ", ";
      dump_python_style(j[i], out);
    }
    out += ']';
  } else if (j.is_boolean()) {
    out += j.get<bool>() ? "true" : "false";
  } else {
    // Scalars: nlohmann and Python escape strings identically when ensure_ascii is off.
    out += j.dump();
  }
}

std::string text_field(const ordered_json& obj, const char* key, const std::string& where, bool null_ok) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    LS_CHECK(null_ok, where, ".", key, ": missing (expected a string)");
    return {};
  }
  LS_CHECK(it->is_string(), where, ".", key, ": expected a string, found ", type_name(*it));
  return it->get<std::string>();
}

ToolCall tool_call_from_json(const ordered_json& call, const std::string& where) {
  LS_CHECK(call.is_object(), where, ": expected an object, found ", type_name(call));
  // OpenAI wraps the call in {"function": {...}}; the template unwraps it the same way.
  const ordered_json& fn = call.contains("function") && !call["function"].is_null() ? call["function"] : call;
  const std::string fn_where = &fn == &call ? where : where + ".function";
  LS_CHECK(fn.is_object(), fn_where, ": expected an object, found ", type_name(fn));
  ToolCall out;
  out.name = text_field(fn, "name", fn_where, false);
  auto args = fn.find("arguments");
  LS_CHECK(args != fn.end(), fn_where, ".arguments: missing");
  out.arguments = args->is_string() ? args->get<std::string>() : template_tojson(*args);
  return out;
}

}  // namespace

std::string template_tojson(const ordered_json& value) {
  std::string out;
  dump_python_style(value, out);
  return out;
}

std::vector<ChatMessage> chat_messages_from_json(const ordered_json& messages, const std::string& where) {
  LS_CHECK(messages.is_array(), where, "messages: expected an array, found ", type_name(messages));
  std::vector<ChatMessage> out;
  out.reserve(messages.size());
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string at = where + "messages[" + std::to_string(i) + "]";
    const ordered_json& m = messages[i];
    LS_CHECK(m.is_object(), at, ": expected an object, found ", type_name(m));
    ChatMessage msg;
    msg.role = text_field(m, "role", at, false);
    LS_CHECK(msg.role == "system" || msg.role == "user" || msg.role == "assistant" || msg.role == "tool", at,
             ".role: expected system, user, assistant or tool, found \"", msg.role, "\"");
    msg.content = text_field(m, "content", at, true);
    if (auto r = m.find("reasoning_content"); r != m.end() && !r->is_null())
      msg.reasoning_content = text_field(m, "reasoning_content", at, false);
    if (auto calls = m.find("tool_calls"); calls != m.end() && !calls->is_null()) {
      LS_CHECK(calls->is_array(), at, ".tool_calls: expected an array, found ", type_name(*calls));
      for (size_t k = 0; k < calls->size(); ++k)
        msg.tool_calls.push_back(tool_call_from_json((*calls)[k], at + ".tool_calls[" + std::to_string(k) + "]"));
    }
    out.push_back(std::move(msg));
  }
  return out;
}

std::vector<std::string> chat_tools_from_json(const ordered_json& tools, const std::string& where) {
  if (tools.is_null()) return {};
  LS_CHECK(tools.is_array(), where, "tools: expected an array, found ", type_name(tools));
  std::vector<std::string> out;
  for (const auto& tool : tools) out.push_back(template_tojson(tool));
  return out;
}

}  // namespace lockstep
