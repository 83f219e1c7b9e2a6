// Prompt data sets of `lockstep train --prompt-data F.jsonl[.gz]`: one JSON object a line with
// the prompt under --input-key (a string, or a list of chat messages) and the answer under
// --label-key (a string or a number), optionally metadata under --metadata-key (any JSON).
// The whole file is read, checked and tokenized before any training: errors name the file, the
// line and the key. Prompts longer than the limit are skipped and counted.
//
// Data order is stateless: the run's `position`-th prompt is a function of (seed, position), so
// the data position in the checkpoint resumes a run mid-epoch bit for bit.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace lockstep::rl {

struct PromptDataOptions {
  std::string input_key = "prompt";
  std::string label_key = "label";
  std::string metadata_key;  // "" = none
  // Render the prompt with the tokenizer's Qwen3 chat template (a string prompt becomes one user
  // message; a generation prompt is added). A per-line boolean "enable_thinking" overrides.
  bool apply_chat_template = false;
  bool enable_thinking = true;
  std::vector<std::string> tools;  // tool definitions (JSON text) for the template's tools block
  int64_t max_prompt_len = 0;      // tokens; longer prompts are skipped (0 = no limit)
};

struct PromptSample {
  int64_t line = 0;                 // 1-based line in the file
  std::string prompt;               // the text the model sees (rendered when templated)
  std::vector<int32_t> prompt_ids;  // its tokens
  std::string label;
  nlohmann::json metadata;      // null when there is none
  bool enable_thinking = true;  // the chat template's, for this prompt (and later turns)
};

struct PromptDataset {
  std::string path;
  std::vector<PromptSample> samples;
  int64_t skipped_too_long = 0;  // prompts over max_prompt_len, left out
};

PromptDataset load_prompt_dataset(const std::string& path, const PromptDataOptions& options,
                                  const Tokenizer& tokenizer);

// The text of sampled ids. A model's vocabulary is often padded past the tokenizer's (Qwen3:
// 151936 rows, 151669 tokens) and a sampled padding id has no text: it is left out.
std::string decode_sampled(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip_special);

// Which sample is the `position`-th prompt of a run: epoch `position / size` in file order, or
// with `shuffle` in an order drawn from (seed, epoch). Caches the current epoch's order.
class PromptOrder {
 public:
  PromptOrder(int64_t size, uint64_t seed, bool shuffle);
  int64_t index(int64_t position);

 private:
  int64_t size_;
  uint64_t seed_;
  bool shuffle_;
  int64_t epoch_ = -1;
  std::vector<int64_t> order_;
};

}  // namespace lockstep::rl
