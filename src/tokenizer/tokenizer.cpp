#include "tokenizer/tokenizer.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "tokenizer/nfc.h"
#include "tokenizer/tokenizer_impl.h"
#include "tokenizer/utf8.h"

namespace lockstep {
namespace {

std::string read_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  LS_CHECK(f != nullptr, path, ": cannot open (", std::strerror(errno), ")");
  std::string data;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), f)) > 0) data.append(buffer, n);
  const bool error = std::ferror(f);
  std::fclose(f);
  LS_CHECK(!error, path, ": read error");
  return data;
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& model_dir) {
  const std::string tokenizer_path = model_dir + "/tokenizer.json";
  const std::string config_path = model_dir + "/tokenizer_config.json";
  LS_CHECK(std::filesystem::exists(tokenizer_path), tokenizer_path,
           ": not found (expected a Hugging Face tokenizer.json in the model directory)");
  const std::string tokenizer_json = read_file(tokenizer_path);
  std::string config_json;
  if (std::filesystem::exists(config_path)) config_json = read_file(config_path);
  return Tokenizer(parse_tokenizer(tokenizer_json, config_json, tokenizer_path, config_path));
}

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json,
                               const std::string& origin) {
  return Tokenizer(parse_tokenizer(tokenizer_json, tokenizer_config_json, origin, "tokenizer_config.json"));
}

bool Tokenizer::available(const std::string& model_dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(model_dir + "/tokenizer.json", ec);
}

void Tokenizer::Impl::encode_plain(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::string normalized;
  if (nfc && !nfc::quick_check(text)) {
    normalized = nfc::normalize(text);
    text = normalized;
  }
  if (!pretokenizer) {
    model.encode_word(text, out);
    return;
  }
  thread_local std::vector<std::string_view> pieces;
  pieces.clear();
  pretokenizer->split_into(text, pieces);
  for (std::string_view piece : pieces) {
    if (cache.lookup(piece, out)) continue;
    const size_t before = out.size();
    model.encode_word(piece, out);
    cache.store(piece, out.data() + before, out.size() - before);
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  if (const size_t bad = utf8::first_invalid(text); bad != std::string_view::npos) {
    fail("encode: input is not valid UTF-8 (byte 0x", std::hex, static_cast<int>(static_cast<uint8_t>(text[bad])),
         std::dec, " at offset ", bad, " of ", text.size(), ")");
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  size_t pos = 0;
  AddedTokenMatcher::Match match;
  while (pos < text.size()) {
    if (impl_->added.empty() || !impl_->added.find(text, pos, match)) {
      impl_->encode_plain(text.substr(pos), ids);
      break;
    }
    impl_->encode_plain(text.substr(pos, match.begin - pos), ids);
    ids.push_back(match.id);
    pos = match.end;
  }
  return ids;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  LS_CHECK(id >= 0 && static_cast<size_t>(id) < impl_->id_bytes.size() &&
               impl_->id_kind[id] != Impl::Kind::kNone,
           "decode: token id ", id, " is not in the vocabulary (", impl_->origin, " has ids 0..",
           impl_->id_bytes.size() - 1, ")");
  return impl_->id_bytes[id];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_kind.size() && impl_->id_kind[id] == Impl::Kind::kSpecial;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) {
    const std::string& b = token_bytes(id);
    if (skip_special && impl_->id_kind[id] == Impl::Kind::kSpecial) continue;
    bytes += b;
  }
  if (utf8::first_invalid(bytes) == std::string::npos) return bytes;
  return utf8::repair(bytes);
}

std::vector<int32_t> Tokenizer::eos_token_ids() const { return impl_->eos_ids; }

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_bytes.size()); }

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end()) return it->second;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

}  // namespace lockstep
