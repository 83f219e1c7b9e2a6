#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace lockstep {

IncrementalDecoder::IncrementalDecoder(Tokenizer tokenizer, bool skip_special)
    : tokenizer_(std::move(tokenizer)), skip_special_(skip_special) {}

std::string IncrementalDecoder::push(int32_t id) {
  const std::string& bytes = tokenizer_.token_bytes(id);
  if (skip_special_ && tokenizer_.is_special(id)) return {};
  pending_ += bytes;
  // Emit everything except a trailing sequence that may still complete; invalid bytes
  // can never become valid, so they are replaced right away.
  const size_t ready = utf8::emittable_prefix(pending_);
  if (ready == 0) return {};
  std::string out = utf8::repair(std::string_view(pending_).substr(0, ready));
  pending_.erase(0, ready);
  return out;
}

std::string IncrementalDecoder::flush() {
  std::string out = utf8::repair(pending_);
  pending_.clear();
  return out;
}

}  // namespace lockstep
