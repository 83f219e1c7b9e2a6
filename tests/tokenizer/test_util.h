// Shared helpers for the tokenizer tests: the fixture tokenizer is loaded once.
#pragma once
#include <fstream>
#include <sstream>
#include <string>

#include "tokenizer/tokenizer.h"

namespace lockstep::test {

inline std::string fixture_dir() { return std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer"; }

inline const Tokenizer& qwen3() {
  static const Tokenizer tokenizer = Tokenizer::load(fixture_dir());
  return tokenizer;
}

inline std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace lockstep::test
