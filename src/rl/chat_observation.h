// An environment's reply as the Qwen3 chat template renders it after an assistant turn: "user"
// messages as a user turn, "tool" messages as <tool_response> blocks (consecutive ones in one user
// turn), then the generation prompt for the policy's next turn. The text is what the template
// appends after the assistant message, so a multi-turn sequence is the template's rendering of
// the whole conversation, except that the policy's turns are its sampled tokens.
#pragma once
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace lockstep::rl {

// The text to append after a policy turn whose last token was `turn_ended` (<|im_end|> sampled;
// when not, the turn is closed here first). `messages` are "user" or "tool" messages.
std::string chat_observation_text(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                                  bool enable_thinking, bool turn_ended);

}  // namespace lockstep::rl
