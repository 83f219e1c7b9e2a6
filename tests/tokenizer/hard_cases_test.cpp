// Cases without HF reference ids: properties that must hold for any correct
// byte-level BPE (round trips, digit splitting, special-token matching, UTF-8 safety).
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/utf8.h"

namespace lockstep {
namespace {

const std::vector<std::string>& hard_strings() {
  static const std::vector<std::string> strings = {
      "Hello, 世界! Привет, мир! مرحبا بالعالم 🌍",
      "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 tone, 🇯🇵🇫🇷 regional indicators",
      "日本語のテキストと한국어 텍스트, ไทย, עברית",
      std::string(1000, ' ') + "x" + std::string(777, '\n') + "\t \t\r\n  ",
      "   leading\t\ttabs   and trailing   ",
      std::string(300, '9') + "." + std::string(41, '0'),
      "x<|im_end|>y<|im_start|><|im_start|>z<|endoftext|>",
      "<|im_end| <|im_end <im_end|> <<|im_start|>> <think></think>",
      "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\n    \n",
      "don't I'LL we'Re it's 'S 'll",
      "\u00e9\u00e8\u00ea \u00c5ngstr\u00f6m caf\u00e9",
      "zero\u200bwidth\u200d joiner \ufeff bom \u00a0 nbsp",
      "\x01\x02\x7f control chars \x1b[0m",
      "math: ∑_{i=1}^{n} x_i² ≤ ∞, ½ ¾ Ⅻ ①",
      "",
      " ",
      "a",
  };
  return strings;
}

std::vector<int32_t> byte_ids(const Tokenizer& tok, std::string_view bytes) {
  std::vector<int32_t> ids;
  for (char c : bytes) ids.push_back(*tok.token_id(byte_level::char_of(static_cast<uint8_t>(c))));
  return ids;
}

bool valid_utf8(std::string_view s) { return utf8::first_invalid(s) == std::string_view::npos; }

TEST(TokenizerHard, RoundTrips) {
  const Tokenizer& tok = test::qwen3();
  for (const std::string& s : hard_strings()) EXPECT_EQ(tok.decode(tok.encode(s)), s) << s;
}

TEST(TokenizerHard, RandomMixedTextRoundTrips) {
  const Tokenizer& tok = test::qwen3();
  const std::vector<std::string> pieces = {"a",  "Z",  " ",  "  ", "\n", "\t", "7",   "42", "中", "文",
                                           "😀", "🚀", "é",  "ß",  "'s", ".",  "<|",  "|>", "_",  "\u200d",
                                           "Ω",  "й",  "ا",  "क",  "्",   "\r", "\r\n", "{}", "\u3000"};
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    std::string s;
    const int n = static_cast<int>(rng() % 60);
    for (int i = 0; i < n; ++i) s += pieces[rng() % pieces.size()];
    ASSERT_EQ(tok.decode(tok.encode(s)), s) << s;
  }
}

TEST(TokenizerHard, DigitsAreSplitOneByOne) {
  const Tokenizer& tok = test::qwen3();
  const std::string digits = "0123456789987654321000";
  const auto ids = tok.encode(digits);
  ASSERT_EQ(ids.size(), digits.size());
  for (size_t i = 0; i < digits.size(); ++i) EXPECT_EQ(ids[i], *tok.token_id(std::string(1, digits[i])));
  EXPECT_EQ(tok.encode(std::string(500, '7')).size(), 500u);
  // Non-ASCII \p{N} characters are separate pre-tokens too.
  EXPECT_EQ(tok.decode(tok.encode("٣٤٥")), "٣٤٥");
}

TEST(TokenizerHard, KnownSingleTokens) {
  const Tokenizer& tok = test::qwen3();
  EXPECT_EQ(tok.encode("Hello"), std::vector<int32_t>{9707});
  EXPECT_EQ(tok.encode(" world"), std::vector<int32_t>{1879});
  EXPECT_EQ(tok.token_id("Ġworld"), 1879);  // vocab spelling (byte-level)
  EXPECT_EQ(tok.token_id("<|im_end|>"), 151645);
  EXPECT_EQ(tok.token_id("<think>"), 151667);
  EXPECT_FALSE(tok.token_id("definitely not a token").has_value());
  EXPECT_TRUE(tok.is_special(151645));
  EXPECT_FALSE(tok.is_special(151667));  // <think> is an added but not special token
  EXPECT_EQ(tok.vocab_size(), 151669);
  EXPECT_EQ(tok.eos_token_ids(), (std::vector<int32_t>{151645, 151643}));
}

TEST(TokenizerHard, SpecialTokensInsideText) {
  const Tokenizer& tok = test::qwen3();
  const auto ids = tok.encode("abc<|im_end|>def<|im_end|><|im_end|>");
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151645), 3);
  const auto near_miss = tok.encode("<|im_end|");
  EXPECT_EQ(std::count(near_miss.begin(), near_miss.end(), 151645), 0);
  EXPECT_EQ(tok.encode("<think>"), std::vector<int32_t>{151667});
  EXPECT_EQ(tok.decode({151644, 872, 198, 151645}, /*skip_special=*/true), "user\n");
  EXPECT_EQ(tok.decode({151667, 151668}, /*skip_special=*/true), "<think></think>");
}

TEST(TokenizerHard, NfcNormalisesInput) {
  const Tokenizer& tok = test::qwen3();
  EXPECT_EQ(tok.encode("cafe\u0301"), tok.encode("caf\u00e9"));
  EXPECT_EQ(tok.encode("\u212b"), tok.encode("\u00c5"));  // ANGSTROM SIGN -> A WITH RING
  EXPECT_EQ(tok.decode(tok.encode("\u1100\u1161\u11a8")), "\uac01");  // Hangul jamo compose
  // Compatibility characters are left alone (NFC, not NFKC).
  EXPECT_EQ(tok.decode(tok.encode("\ufb01 \u2460")), "\ufb01 \u2460");
}

TEST(TokenizerHard, InvalidUtf8IsAClearError) {
  const Tokenizer& tok = test::qwen3();
  for (std::string bad : {std::string("\xff"), std::string("abc\xc3"), std::string("\xed\xa0\x80"),
                          std::string("\xc0\xaf"), std::string("ok \xf4\x90\x80\x80"), std::string("\x80")}) {
    try {
      tok.encode(bad);
      ADD_FAILURE() << "no error for invalid UTF-8";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not valid UTF-8"), std::string::npos) << e.what();
    }
  }
}

TEST(TokenizerHard, DecodeRepairsPartialCharacters) {
  const Tokenizer& tok = test::qwen3();
  EXPECT_EQ(tok.decode(byte_ids(tok, "\xe4\xb8")), "\ufffd");
  EXPECT_EQ(tok.decode(byte_ids(tok, "\xe4\xb8" "A")), "\ufffd" "A");
  EXPECT_EQ(tok.decode(byte_ids(tok, "\xe0\x80")), "\ufffd\ufffd");
  EXPECT_EQ(tok.decode(byte_ids(tok, "\xe4\xb8\xad")), "中");
  EXPECT_THROW(tok.decode({tok.vocab_size()}), Error);
  EXPECT_THROW(tok.decode({-1}), Error);
}

TEST(TokenizerHard, IncrementalDecoderNeverEmitsBrokenUtf8) {
  const Tokenizer& tok = test::qwen3();
  for (const std::string& s : hard_strings()) {
    const auto ids = tok.encode(s);
    IncrementalDecoder decoder(tok);
    std::string streamed;
    for (int32_t id : ids) {
      const std::string piece = decoder.push(id);
      ASSERT_TRUE(valid_utf8(piece)) << s;
      streamed += piece;
      ASSERT_EQ(s.compare(0, streamed.size(), streamed), 0) << "streamed text is not a prefix of " << s;
    }
    streamed += decoder.flush();
    EXPECT_EQ(streamed, s);
  }
}

TEST(TokenizerHard, IncrementalDecoderOnRandomBytes) {
  const Tokenizer& tok = test::qwen3();
  std::mt19937 rng(11);
  for (int trial = 0; trial < 500; ++trial) {
    std::string bytes;
    const int n = 1 + static_cast<int>(rng() % 24);
    for (int i = 0; i < n; ++i) {
      // Mostly pieces of real characters, sometimes arbitrary bytes.
      static const std::string chars[] = {"\xe4\xb8\xad", "\xf0\x9f\x98\x80", "\xc3\xa9", "a", " "};
      if (rng() % 4 == 0) bytes.push_back(static_cast<char>(rng() % 256));
      else bytes += chars[rng() % 5].substr(0, 1 + rng() % 4);
    }
    IncrementalDecoder decoder(tok);
    std::string streamed;
    for (int32_t id : byte_ids(tok, bytes)) {
      const std::string piece = decoder.push(id);
      ASSERT_TRUE(valid_utf8(piece));
      streamed += piece;
    }
    streamed += decoder.flush();
    EXPECT_EQ(streamed, utf8::repair(bytes));
    EXPECT_EQ(streamed, tok.decode(byte_ids(tok, bytes)));
  }
}

TEST(TokenizerHard, CopiesShareStateAndThreadsAgree) {
  const Tokenizer copy = test::qwen3();
  const std::string text = hard_strings()[0] + hard_strings()[2];
  const auto expected = copy.encode(text);
  std::vector<std::thread> threads;
  std::vector<bool> ok(4, false);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      bool same = true;
      for (int i = 0; i < 50; ++i) same = same && copy.encode(text) == expected;
      ok[t] = same;
    });
  }
  for (auto& th : threads) th.join();
  for (bool b : ok) EXPECT_TRUE(b);
}

}  // namespace
}  // namespace lockstep
