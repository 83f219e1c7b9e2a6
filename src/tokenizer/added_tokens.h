// Added tokens (e.g. "<|im_start|>", "<think>") are found in raw text before
// normalisation and pre-tokenisation, leftmost first and longest at a position.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lockstep {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool lstrip = false;  // also swallows whitespace before the token
  bool rstrip = false;  // also swallows whitespace after the token
};

class AddedTokenMatcher {
 public:
  void add(const AddedToken& token);
  bool empty() const { return tokens_.empty(); }

  struct Match {
    size_t begin = 0, end = 0;  // span consumed, including stripped whitespace
    int32_t id = -1;
  };
  // Finds the next added token at or after `from`; returns false when there is none.
  bool find(std::string_view text, size_t from, Match& match) const;

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t token = -1;  // index into tokens_ of the token ending here
  };
  int32_t child(int32_t node, unsigned char byte) const;
  std::vector<Node> nodes_{Node{}};
  std::vector<AddedToken> tokens_;
  std::array<bool, 256> first_byte_{};
};

}  // namespace lockstep
