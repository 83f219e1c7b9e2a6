#include "rl/chat_observation.h"

#include "core/error.h"

namespace lockstep::rl {

std::string chat_observation_text(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages,
                                  bool enable_thinking, bool turn_ended) {
  for (const auto& m : messages)
    LS_CHECK(m.role == "user" || m.role == "tool", "an environment's message role must be \"user\" or \"tool\", got \"",
             m.role, "\"");
  // Render a stand-in conversation with the reply; the reply is what follows the assistant turn.
  std::vector<ChatMessage> conversation = {ChatMessage("user", "q"), ChatMessage("assistant", "a")};
  conversation.insert(conversation.end(), messages.begin(), messages.end());
  ChatOptions options;
  options.enable_thinking = enable_thinking;
  const std::string whole = tokenizer.render_chat(conversation, options);
  const std::string end = "<|im_end|>\n";
  const size_t assistant = whole.find("<|im_start|>assistant\n");
  const size_t closed = assistant == std::string::npos ? assistant : whole.find(end, assistant);
  LS_CHECK(closed != std::string::npos,
           "the chat template does not render an environment's reply after an assistant turn");
  // The policy sampled <|im_end|>; the template's newline after it belongs to the reply.
  return (turn_ended ? std::string("\n") : end) + whole.substr(closed + end.size());
}

}  // namespace lockstep::rl
