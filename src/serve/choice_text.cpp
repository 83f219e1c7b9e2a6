#include "serve/choice_text.h"

#include <algorithm>

namespace lockstep::serve {

std::string decode_known(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip_special) {
  std::vector<int32_t> known;
  for (int32_t id : ids)
    if (id >= 0 && id < tokenizer.vocab_size()) known.push_back(id);
  return tokenizer.decode(known, skip_special);
}

ChoiceText::ChoiceText(const Tokenizer* tokenizer, std::vector<std::string> stop)
    : tokenizer_(tokenizer), stop_(std::move(stop)) {
  if (tokenizer) decoder_.emplace(*tokenizer, /*skip_special=*/true);
  for (const auto& s : stop_) longest_stop_ = std::max(longest_stop_, s.size());
}

void ChoiceText::cut_at_stop() {
  size_t cut = std::string::npos;
  for (const auto& s : stop_) cut = std::min(cut, text_.find(s));
  if (cut == std::string::npos) return;
  text_.resize(std::max(cut, taken_));  // what was taken is never unsaid (it held no stop string then)
  stopped_ = true;
}

void ChoiceText::push(int32_t id) {
  if (!decoder_ || stopped_ || id < 0 || id >= tokenizer_->vocab_size()) return;
  text_ += decoder_->push(id);
  cut_at_stop();
}

void ChoiceText::finish() {
  if (decoder_ && !stopped_) {
    text_ += decoder_->flush();
    cut_at_stop();
  }
  finished_ = true;
}

std::string ChoiceText::take_new() {
  size_t end = text_.size();
  if (!finished_ && !stopped_ && longest_stop_ > 1) {
    // Hold back what could be the start of a stop string, on a UTF-8 character boundary.
    end = end > longest_stop_ - 1 ? end - (longest_stop_ - 1) : 0;
    while (end > taken_ && (uint8_t(text_[end]) & 0xC0) == 0x80) --end;
  }
  if (end <= taken_) return {};
  std::string out = text_.substr(taken_, end - taken_);
  taken_ = end;
  return out;
}

}  // namespace lockstep::serve
