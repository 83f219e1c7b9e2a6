// The text of one choice as its tokens arrive: decoded token by token (never a broken UTF-8
// character; special tokens skipped), cut before the first stop string (OpenAI's rule: the
// stop string itself is not returned, while output_ids keep every sampled token), and
// released to a stream only once no stop string can still begin in it.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace lockstep::serve {

// decode() without the ids the tokenizer does not know: a model's vocabulary is often padded
// past the tokenizer's, and a sampled padding id has no text (rather than failing the request).
std::string decode_known(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip_special);

class ChoiceText {
 public:
  // Without a tokenizer the text stays empty.
  ChoiceText(const Tokenizer* tokenizer, std::vector<std::string> stop);
  void push(int32_t id);
  // The choice ended: flushes held bytes and applies the stop cut to the end.
  void finish();
  // Text that is final and was not taken before.
  std::string take_new();
  const std::string& text() const { return text_; }

 private:
  void cut_at_stop();

  const Tokenizer* tokenizer_;
  std::optional<IncrementalDecoder> decoder_;
  std::vector<std::string> stop_;
  size_t longest_stop_ = 0;
  std::string text_;
  size_t taken_ = 0;
  bool stopped_ = false, finished_ = false;
};

}  // namespace lockstep::serve
