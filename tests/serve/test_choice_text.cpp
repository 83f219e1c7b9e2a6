// ChoiceText: token-by-token text equals the whole decode, stop strings are cut (and never
// half-streamed), and ids the tokenizer does not know decode to nothing.
#include <gtest/gtest.h>

#include "serve/choice_text.h"

namespace lockstep::serve {
namespace {

const Tokenizer& tokenizer() {
  static const Tokenizer t = Tokenizer::load(std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer");
  return t;
}

// Feeds `ids` one at a time, taking the streamable text after each; returns the pieces' concatenation.
std::string stream(ChoiceText& text, const std::vector<int32_t>& ids, std::vector<std::string>* pieces = nullptr) {
  std::string out;
  for (int32_t id : ids) {
    text.push(id);
    std::string piece = text.take_new();
    if (pieces) pieces->push_back(piece);
    out += piece;
  }
  text.finish();
  return out + text.take_new();
}

TEST(ChoiceText, StreamedPiecesMakeTheWholeDecode) {
  const auto ids = tokenizer().encode("Hello, world! 你好 — ünïcödé <|im_end|>");
  ChoiceText text(&tokenizer(), {});
  EXPECT_EQ(stream(text, ids), tokenizer().decode(ids, true));
  EXPECT_EQ(text.text(), tokenizer().decode(ids, true));
}

TEST(ChoiceText, StopStringIsCutAndNeverHalfSent) {
  const auto ids = tokenizer().encode("Hello, world! And more words after.");
  ChoiceText text(&tokenizer(), {"world", "zzz"});
  std::vector<std::string> pieces;
  const std::string streamed = stream(text, ids, &pieces);
  EXPECT_EQ(streamed, "Hello, ");
  EXPECT_EQ(text.text(), "Hello, ");
  for (const auto& p : pieces) EXPECT_EQ(p.find('w'), std::string::npos) << p;
}

TEST(ChoiceText, UnknownIdsHaveNoText) {
  const int32_t beyond = tokenizer().vocab_size() + 5;  // a padded model vocabulary
  auto ids = tokenizer().encode("ab");
  ids.insert(ids.begin() + 1, beyond);
  ChoiceText text(&tokenizer(), {"q"});
  EXPECT_EQ(stream(text, ids), "ab");
  EXPECT_EQ(decode_known(tokenizer(), ids, false), "ab");
  ChoiceText none(nullptr, {});
  EXPECT_EQ(stream(none, ids), "");
}

}  // namespace
}  // namespace lockstep::serve
