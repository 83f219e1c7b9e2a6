// Splits text into pre-tokens with the Split regex from tokenizer.json (PCRE2, UTF +
// UCP, JIT when available). Every byte of the input ends up in exactly one piece:
// matches and the gaps between them ("Isolated" behaviour).
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace lockstep {

class PreTokenizer {
 public:
  // Throws lockstep::Error (naming `where`) if the pattern does not compile.
  PreTokenizer(const std::string& pattern, const std::string& where);
  ~PreTokenizer();
  PreTokenizer(const PreTokenizer&) = delete;
  PreTokenizer& operator=(const PreTokenizer&) = delete;

  // Appends the pieces of `text`, which must be valid UTF-8, to `pieces`.
  void split_into(std::string_view text, std::vector<std::string_view>& pieces) const;

  const std::string& pattern() const { return pattern_; }
  bool jit() const { return jit_; }

 private:
  struct Code;
  std::string pattern_;
  std::unique_ptr<Code> code_;
  bool jit_ = false;
};

}  // namespace lockstep
