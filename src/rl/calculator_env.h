// --rollout-tool calculator: the policy may call a calculator in the tool-call format of the Qwen3
// chat template, <tool_call>{"name": "calculator", "arguments": {"expression": "..."}}</tool_call>;
// each call is answered by a tool message (the result, or "error: ..." for a call that is not
// JSON, names another tool or has bad arguments: the policy sees it and goes on). A turn without
// a tool call is the final answer and gets the run's reward (--rm-type, --rm-url, ...).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "rl/episode.h"

namespace lockstep::rl {

// The tool's definition as the prompts' tools block shows it (JSON text).
std::string calculator_tool_definition();

// The tool messages' contents answering the tool calls in `text` (none when it has no call).
std::vector<std::string> answer_calculator_calls(const std::string& text);

std::unique_ptr<Environment> make_calculator_env(EpisodeData& source);

}  // namespace lockstep::rl
