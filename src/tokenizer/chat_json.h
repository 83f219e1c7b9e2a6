// Conversions from OpenAI-style JSON requests ({"messages": [...], "tools": [...]})
// to ChatMessage / ChatOptions, shared by `lockstep tokenize` and the rollout server.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace lockstep {

// Parses a "messages" array. Each message needs "role" (system, user, assistant or
// tool) and "content" (string or null); "reasoning_content" and "tool_calls" are
// optional. Errors name `where` and the field, e.g. "line 3: messages[1].role".
std::vector<ChatMessage> chat_messages_from_json(const nlohmann::ordered_json& messages, const std::string& where);

// Parses a "tools" array into the JSON text the template would print for each tool.
std::vector<std::string> chat_tools_from_json(const nlohmann::ordered_json& tools, const std::string& where);

// JSON text as the HF chat template's `tojson` filter writes it (Python json.dumps
// with ensure_ascii=False): ", " and ": " separators, keys in their given order.
std::string template_tojson(const nlohmann::ordered_json& value);

}  // namespace lockstep
