// Qwen3 tokenizer: byte-level BPE loaded from a Hugging Face tokenizer.json, the
// Qwen3 chat template, and a streaming decoder. See docs/tokenizer.md.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lockstep {

// One tool call of an assistant message. `arguments` is emitted verbatim, so it should
// be JSON text (the CLI serialises objects the way the HF template's `tojson` does).
struct ToolCall {
  std::string name;
  std::string arguments;
};

struct ChatMessage {
  ChatMessage() = default;
  ChatMessage(std::string role, std::string content, std::optional<std::string> reasoning_content = std::nullopt)
      : role(std::move(role)), content(std::move(content)), reasoning_content(std::move(reasoning_content)) {}

  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
  // Set (even to "") to bypass the template's split of `content` at "</think>".
  std::optional<std::string> reasoning_content;
  std::vector<ToolCall> tool_calls;  // assistant messages only
};

struct ChatOptions {
  bool add_generation_prompt = true;
  bool enable_thinking = true;  // false appends the empty "<think>\n\n</think>\n\n"
  // Tool definitions, each already JSON text; non-empty adds the template's tools block.
  std::vector<std::string> tools;
};

// Immutable after load; copies share the vocabulary, merges and word cache, and all
// const methods are safe to call from several threads at once.
class Tokenizer {
 public:
  // Loads DIR/tokenizer.json and, if present, DIR/tokenizer_config.json. Throws
  // lockstep::Error naming the file and field on a missing or malformed file.
  static Tokenizer load(const std::string& model_dir);
  // Loads from in-memory JSON text (tokenizer_config_json may be empty). `origin`
  // names the source in error messages.
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json,
                             const std::string& origin = "tokenizer.json");
  // True when DIR/tokenizer.json exists.
  static bool available(const std::string& model_dir);

  // Added/special tokens in `text` (e.g. "<|im_start|>") are matched as single tokens
  // first. `text` must be valid UTF-8; otherwise throws lockstep::Error with the offset.
  std::vector<int32_t> encode(std::string_view text) const;
  // Invalid UTF-8 produced by a partial sequence of ids is replaced by U+FFFD (as HF
  // does); throws lockstep::Error on an id outside the vocabulary.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;
  // Raw bytes of one token (no UTF-8 repair); throws on an unknown id.
  const std::string& token_bytes(int32_t id) const;
  bool is_special(int32_t id) const;

  // Renders `messages` exactly as Qwen3's tokenizer_config.json chat template does.
  // Throws lockstep::Error if the loaded config has no Qwen3-style chat template.
  std::string render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& options) const;

  // eos_token from tokenizer_config.json first, then <|im_end|> and <|endoftext|>.
  std::vector<int32_t> eos_token_ids() const;
  // One past the largest token id (vocab plus added tokens).
  int32_t vocab_size() const;
  std::optional<int32_t> token_id(std::string_view token) const;

  struct Impl;

 private:
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Turns a stream of ids into text without ever emitting a broken UTF-8 sequence:
// bytes of an incomplete character are held until the character completes.
class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(Tokenizer tokenizer, bool skip_special = false);
  // Returns the text completed by `id` (possibly empty).
  std::string push(int32_t id);
  // Returns whatever is held, with invalid or truncated sequences replaced by U+FFFD,
  // and resets the decoder.
  std::string flush();
  // Number of bytes held back waiting for the rest of a character.
  size_t pending_bytes() const { return pending_.size(); }

 private:
  Tokenizer tokenizer_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace lockstep
