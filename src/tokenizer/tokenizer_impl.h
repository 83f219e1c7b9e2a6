// Internal state of a loaded Tokenizer, shared (read-only) by all its copies.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/word_cache.h"

namespace lockstep {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

struct Tokenizer::Impl {
  enum class Kind : uint8_t { kNone, kVocab, kAdded, kSpecial };

  std::string origin;                // file name for error messages
  bpe::Model model;
  TokenMap vocab;                    // byte-level token text -> id
  TokenMap added_by_content;         // added token content -> id
  std::vector<std::string> id_bytes;  // id -> raw bytes it decodes to
  std::vector<Kind> id_kind;
  AddedTokenMatcher added;
  std::unique_ptr<PreTokenizer> pretokenizer;  // null: the whole segment is one word
  bool nfc = false;                  // normalizer is NFC

  bool has_config = false;
  std::string chat_template;
  std::vector<int32_t> eos_ids;

  WordCache cache;

  // Encodes text that contains no added tokens.
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const;
};

// Parses tokenizer.json (and optionally tokenizer_config.json) text into an Impl.
std::shared_ptr<Tokenizer::Impl> parse_tokenizer(std::string_view tokenizer_json, std::string_view config_json,
                                                 const std::string& origin, const std::string& config_origin);

}  // namespace lockstep
