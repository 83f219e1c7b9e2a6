// Reads tokenizer.json / tokenizer_config.json into Tokenizer::Impl. Only the pieces
// a byte-level BPE like Qwen3's uses are accepted; anything else is a clear error
// rather than a silently different tokenisation.
#include <algorithm>
#include <cstdint>
#include <optional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_parse.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/tokenizer_impl.h"

namespace lockstep {
namespace {

using nlohmann::json;

// Walks a JSON document keeping the dotted path for error messages.
struct Ctx {
  const std::string& file;
  std::string describe(const json& j) const {
    switch (j.type()) {
      case json::value_t::null: return "null";
      case json::value_t::object: return "an object";
      case json::value_t::array: return "an array";
      case json::value_t::string: return "a string";
      case json::value_t::boolean: return "a boolean";
      case json::value_t::number_float: return "a float";
      case json::value_t::discarded: return "nothing";
      default: return "a number";
    }
  }
  const json& member(const json& obj, const char* key, const std::string& path) const {
    LS_CHECK(obj.is_object(), file, ": ", path.empty() ? "top level" : path, ": expected an object, found ",
             describe(obj));
    auto it = obj.find(key);
    LS_CHECK(it != obj.end(), file, ": missing field \"", path.empty() ? "" : path + ".", key, "\"");
    return *it;
  }
  const json* optional_member(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }
  std::string string(const json& j, const std::string& path) const {
    LS_CHECK(j.is_string(), file, ": ", path, ": expected a string, found ", describe(j));
    return j.get<std::string>();
  }
  bool boolean(const json& obj, const char* key, const std::string& path, bool fallback) const {
    const json* j = optional_member(obj, key);
    if (!j || j->is_null()) return fallback;
    LS_CHECK(j->is_boolean(), file, ": ", path, ".", key, ": expected a boolean, found ", describe(*j));
    return j->get<bool>();
  }
  int32_t id(const json& j, const std::string& path) const {
    LS_CHECK(j.is_number_integer(), file, ": ", path, ": expected a token id (integer), found ", describe(j));
    const auto v = j.get<int64_t>();
    LS_CHECK(v >= 0 && v < (int64_t{1} << 30), file, ": ", path, ": token id ", v, " is out of range");
    return static_cast<int32_t>(v);
  }
  // An absent, null or empty-string field; anything else means a feature we lack.
  void require_unset(const json& obj, const char* key, const std::string& path) const {
    const json* j = optional_member(obj, key);
    if (!j || j->is_null() || (j->is_string() && j->get<std::string>().empty()) ||
        (j->is_boolean() && !j->get<bool>()))
      return;
    fail(file, ": ", path, ".", key, " = ", j->dump(), " is not supported (expected null or empty)");
  }
};

// The vocab and merges are 99% of tokenizer.json. Building them as a DOM costs most of
// the load time, so a SAX pass collects them into flat vectors and the DOM parse
// skips them. Anything unexpected in those two fields makes the SAX pass give up, and
// the caller falls back to the DOM for everything, which reports the precise error.
struct FlatModel {
  std::vector<std::pair<std::string, int64_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;
  bool has_vocab = false, has_merges = false;
};

class FlatModelReader : public nlohmann::json_sax<json> {
 public:
  explicit FlatModelReader(FlatModel& out) : out_(out) {}

  bool start_object(std::size_t) override {
    ++depth_;
    if (depth_ == 3 && in_model() && key_ == "vocab") mode_ = Mode::kVocab, out_.has_vocab = true;
    else if (mode_ != Mode::kNone) return false;
    return true;
  }
  bool end_object() override {
    if (mode_ == Mode::kVocab && depth_ == 3) mode_ = Mode::kNone;
    if (--depth_ == 1) top_key_.clear();
    return true;
  }
  bool start_array(std::size_t) override {
    ++depth_;
    if (depth_ == 3 && in_model() && key_ == "merges") {
      mode_ = Mode::kMerges;
      out_.has_merges = true;
    } else if (mode_ == Mode::kMerges && depth_ == 4) {
      pair_.clear();
    } else if (mode_ != Mode::kNone) {
      return false;
    }
    return true;
  }
  bool end_array() override {
    if (mode_ == Mode::kMerges && depth_ == 4) {
      if (pair_.size() != 2) return false;
      out_.merges.emplace_back(std::move(pair_[0]), std::move(pair_[1]));
    } else if (mode_ == Mode::kMerges && depth_ == 3) {
      mode_ = Mode::kNone;
    }
    --depth_;
    return true;
  }
  bool key(string_t& k) override {
    if (depth_ == 1) top_key_ = k;
    if (mode_ == Mode::kVocab) vocab_key_ = std::move(k);
    else key_ = k;
    return true;
  }
  bool number_integer(number_integer_t v) override { return number(v); }
  bool number_unsigned(number_unsigned_t v) override {
    return number(v > static_cast<number_unsigned_t>(INT64_MAX) ? -1 : static_cast<int64_t>(v));
  }
  bool string(string_t& v) override {
    if (mode_ == Mode::kMerges && depth_ == 3) {
      const size_t space = v.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 == v.size() || v.find(' ', space + 1) != v.npos)
        return false;
      out_.merges.emplace_back(v.substr(0, space), v.substr(space + 1));
      return true;
    }
    if (mode_ == Mode::kMerges && depth_ == 4) {
      pair_.push_back(std::move(v));
      return pair_.size() <= 2;
    }
    return mode_ == Mode::kNone;
  }
  bool null() override { return mode_ == Mode::kNone; }
  bool boolean(bool) override { return mode_ == Mode::kNone; }
  bool number_float(number_float_t, const string_t&) override { return mode_ == Mode::kNone; }
  bool binary(binary_t&) override { return false; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  enum class Mode { kNone, kVocab, kMerges };
  bool in_model() const { return top_key_ == "model"; }
  bool number(int64_t v) {
    if (mode_ == Mode::kVocab && depth_ == 3) {
      out_.vocab.emplace_back(std::move(vocab_key_), v);
      return true;
    }
    return mode_ == Mode::kNone;
  }
  FlatModel& out_;
  int depth_ = 0;
  Mode mode_ = Mode::kNone;
  std::string top_key_, key_, vocab_key_;
  std::vector<std::string> pair_;
};

// Parses tokenizer.json; when the fast path works, `flat` gets model.vocab and
// model.merges and the returned DOM lacks them.
json parse_tokenizer_json(std::string_view text, const std::string& file, std::optional<FlatModel>& flat) {
  check_json_depth(text, file);
  flat.emplace();
  FlatModelReader reader(*flat);
  if (json::sax_parse(text.begin(), text.end(), &reader) && flat->has_vocab && flat->has_merges) {
    std::string top_key;
    return json::parse(text.begin(), text.end(), [&](int depth, json::parse_event_t event, json& parsed) {
      if (event != json::parse_event_t::key) return true;
      if (depth == 1) top_key = parsed.get<std::string>();
      return !(depth == 2 && top_key == "model" && (parsed == "vocab" || parsed == "merges"));
    });
  }
  flat.reset();
  return parse_json(text, file);
}

const char* const kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

void load_model(const Ctx& c, const json& root, const FlatModel* flat, Tokenizer::Impl& impl) {
  const json& model = c.member(root, "model", "");
  LS_CHECK(model.is_object(), c.file, ": model: expected an object, found ", c.describe(model));
  if (const json* type = c.optional_member(model, "type")) {
    const std::string t = c.string(*type, "model.type");
    LS_CHECK(t == "BPE", c.file, ": model.type: expected \"BPE\", found \"", t, "\"");
  }
  c.require_unset(model, "dropout", "model");
  c.require_unset(model, "continuing_subword_prefix", "model");
  c.require_unset(model, "end_of_word_suffix", "model");
  c.require_unset(model, "byte_fallback", "model");

  int32_t max_id = -1;
  if (flat) {
    impl.vocab.reserve(flat->vocab.size() * 2);
    for (auto& [token, value] : flat->vocab) {
      LS_CHECK(value >= 0 && value < (int64_t{1} << 30), c.file, ": model.vocab[\"", token, "\"]: token id ", value,
               " is out of range");
      const auto id = static_cast<int32_t>(value);
      impl.vocab.emplace(std::move(token), id);
      max_id = std::max(max_id, id);
    }
  } else {
    const json& vocab = c.member(model, "vocab", "model");
    LS_CHECK(vocab.is_object(), c.file, ": model.vocab: expected an object {token: id}, found ",
             c.describe(vocab));
    impl.vocab.reserve(vocab.size() * 2);
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      const int32_t id = c.id(it.value(), "model.vocab[\"" + it.key() + "\"]");
      impl.vocab.emplace(it.key(), id);
      max_id = std::max(max_id, id);
    }
  }
  impl.id_bytes.resize(static_cast<size_t>(max_id + 1));
  impl.id_kind.assign(static_cast<size_t>(max_id + 1), Tokenizer::Impl::Kind::kNone);
  std::string bytes;
  for (const auto& [token, id] : impl.vocab) {
    LS_CHECK(impl.id_kind[id] == Tokenizer::Impl::Kind::kNone, c.file, ": model.vocab: id ", id,
             " is used twice (\"", token, "\")");
    LS_CHECK(byte_level::decode(token, bytes), c.file, ": model.vocab[\"", token,
             "\"]: not a byte-level token (contains a character outside the 256-byte alphabet)");
    impl.id_bytes[id] = bytes;
    impl.id_kind[id] = Tokenizer::Impl::Kind::kVocab;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = impl.vocab.find(byte_level::char_of(static_cast<uint8_t>(b)));
    LS_CHECK(it != impl.vocab.end(), c.file, ": model.vocab: no token for byte 0x", std::hex, b,
             " (a byte-level BPE needs all 256)");
    impl.model.byte_id[b] = it->second;
  }

  auto lookup = [&](std::string_view token, size_t rank, const char* what) {
    auto it = impl.vocab.find(token);
    LS_CHECK(it != impl.vocab.end(), c.file, ": model.merges[", rank, "]", what, ": token \"", token,
             "\" is not in model.vocab");
    return it->second;
  };
  std::string joined;
  auto add_merge = [&](const std::string& left, const std::string& right, size_t rank) {
    joined.assign(left).append(right);
    const int32_t l = lookup(left, rank, ""), r = lookup(right, rank, ""), merged = lookup(joined, rank, " (merged)");
    impl.model.merges.insert(l, r, {static_cast<int32_t>(rank), merged});
  };
  if (flat) {
    impl.model.merges.reserve(flat->merges.size());
    for (size_t rank = 0; rank < flat->merges.size(); ++rank)
      add_merge(flat->merges[rank].first, flat->merges[rank].second, rank);
    return;
  }
  const json& merges = c.member(model, "merges", "model");
  LS_CHECK(merges.is_array(), c.file, ": model.merges: expected an array, found ", c.describe(merges));
  impl.model.merges.reserve(merges.size());
  std::string left, right;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const json& m = merges[rank];
    const std::string path = "model.merges[" + std::to_string(rank) + "]";
    if (m.is_string()) {
      const auto& s = m.get_ref<const std::string&>();
      const size_t space = s.find(' ');
      LS_CHECK(space != std::string::npos && space > 0 && space + 1 < s.size() &&
                   s.find(' ', space + 1) == std::string::npos,
               c.file, ": ", path, ": expected \"left right\", found \"", s, "\"");
      left.assign(s, 0, space);
      right.assign(s, space + 1);
    } else if (m.is_array() && m.size() == 2) {
      left = c.string(m[0], path + "[0]");
      right = c.string(m[1], path + "[1]");
    } else {
      fail(c.file, ": ", path, ": expected \"left right\" or [\"left\", \"right\"], found ", m.dump());
    }
    add_merge(left, right, rank);
  }
}

void load_added_tokens(const Ctx& c, const json& root, Tokenizer::Impl& impl) {
  const json* added = c.optional_member(root, "added_tokens");
  if (!added || added->is_null()) return;
  LS_CHECK(added->is_array(), c.file, ": added_tokens: expected an array, found ", c.describe(*added));
  for (size_t i = 0; i < added->size(); ++i) {
    const json& t = (*added)[i];
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    AddedToken token;
    token.id = c.id(c.member(t, "id", path), path + ".id");
    token.content = c.string(c.member(t, "content", path), path + ".content");
    LS_CHECK(!token.content.empty(), c.file, ": ", path, ".content: empty token");
    token.special = c.boolean(t, "special", path, false);
    token.lstrip = c.boolean(t, "lstrip", path, false);
    token.rstrip = c.boolean(t, "rstrip", path, false);
    impl.added.add(token);
    impl.added_by_content.emplace(token.content, token.id);
    if (static_cast<size_t>(token.id) >= impl.id_bytes.size()) {
      impl.id_bytes.resize(token.id + 1);
      impl.id_kind.resize(token.id + 1, Tokenizer::Impl::Kind::kNone);
    }
    impl.id_bytes[token.id] = token.content;
    impl.id_kind[token.id] = token.special ? Tokenizer::Impl::Kind::kSpecial : Tokenizer::Impl::Kind::kAdded;
  }
}

void load_normalizer(const Ctx& c, const json& root, Tokenizer::Impl& impl) {
  const json* n = c.optional_member(root, "normalizer");
  if (!n || n->is_null()) return;
  const std::string type = c.string(c.member(*n, "type", "normalizer"), "normalizer.type");
  LS_CHECK(type == "NFC", c.file, ": normalizer.type: only \"NFC\" or null is supported, found \"", type, "\"");
  impl.nfc = true;
}

// Accepts Split(Regex, Isolated) followed by ByteLevel(use_regex=false), or a lone
// ByteLevel (which then splits with the GPT-2 pattern if use_regex is set).
void load_pre_tokenizer(const Ctx& c, const json& root, Tokenizer::Impl& impl) {
  const json& pre = c.member(root, "pre_tokenizer", "");
  LS_CHECK(pre.is_object(), c.file, ": pre_tokenizer: expected an object, found ", c.describe(pre));
  std::vector<std::pair<const json*, std::string>> steps;
  const std::string type = c.string(c.member(pre, "type", "pre_tokenizer"), "pre_tokenizer.type");
  if (type == "Sequence") {
    const json& list = c.member(pre, "pretokenizers", "pre_tokenizer");
    LS_CHECK(list.is_array(), c.file, ": pre_tokenizer.pretokenizers: expected an array, found ",
             c.describe(list));
    for (size_t i = 0; i < list.size(); ++i)
      steps.emplace_back(&list[i], "pre_tokenizer.pretokenizers[" + std::to_string(i) + "]");
  } else {
    steps.emplace_back(&pre, "pre_tokenizer");
  }
  std::string pattern;
  bool byte_level_seen = false;
  for (const auto& [step, path] : steps) {
    const std::string t = c.string(c.member(*step, "type", path), path + ".type");
    if (t == "Split") {
      LS_CHECK(pattern.empty() && !byte_level_seen, c.file, ": ", path,
               ": only one Split, before ByteLevel, is supported");
      const json& p = c.member(*step, "pattern", path);
      pattern = c.string(c.member(p, "Regex", path + ".pattern"), path + ".pattern.Regex");
      const std::string behavior = c.string(c.member(*step, "behavior", path), path + ".behavior");
      LS_CHECK(behavior == "Isolated", c.file, ": ", path, ".behavior: only \"Isolated\" is supported, found \"",
               behavior, "\"");
      LS_CHECK(!c.boolean(*step, "invert", path, false), c.file, ": ", path, ".invert: true is not supported");
    } else if (t == "ByteLevel") {
      byte_level_seen = true;
      LS_CHECK(!c.boolean(*step, "add_prefix_space", path, false), c.file, ": ", path,
               ".add_prefix_space: true is not supported");
      if (c.boolean(*step, "use_regex", path, true)) {
        LS_CHECK(pattern.empty(), c.file, ": ", path, ".use_regex: a second regex split is not supported");
        pattern = kGpt2Pattern;
      }
    } else {
      fail(c.file, ": ", path, ".type: unsupported pre-tokenizer \"", t, "\" (expected Split or ByteLevel)");
    }
  }
  LS_CHECK(byte_level_seen, c.file, ": pre_tokenizer: expected a ByteLevel step (byte-level BPE)");
  if (!pattern.empty()) impl.pretokenizer = std::make_unique<PreTokenizer>(pattern, c.file + ": pre_tokenizer");
}

std::optional<std::string> token_text(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return std::nullopt;
}

void load_config(std::string_view text, const std::string& file, Tokenizer::Impl& impl) {
  const json root = parse_json(text, file);
  const Ctx c{file};
  LS_CHECK(root.is_object(), file, ": expected an object at the top level, found ", c.describe(root));
  impl.has_config = true;
  if (const json* t = c.optional_member(root, "chat_template"); t && !t->is_null()) {
    if (t->is_string()) {
      impl.chat_template = t->get<std::string>();
    } else if (t->is_array()) {
      // Newer configs list named templates; the one called "default" is the chat one.
      for (const json& entry : *t)
        if (entry.is_object() && entry.value("name", "") == "default")
          impl.chat_template = c.string(c.member(entry, "template", "chat_template[]"), "chat_template[].template");
    } else {
      fail(file, ": chat_template: expected a string, found ", c.describe(*t));
    }
  }
  if (const json* eos = c.optional_member(root, "eos_token"); eos && !eos->is_null()) {
    const auto name = token_text(*eos);
    LS_CHECK(name.has_value(), file, ": eos_token: expected a string or {\"content\": ...}, found ",
             c.describe(*eos));
    std::optional<int32_t> id;
    if (auto it = impl.added_by_content.find(*name); it != impl.added_by_content.end()) id = it->second;
    else if (auto v = impl.vocab.find(byte_level::encode(*name)); v != impl.vocab.end()) id = v->second;
    LS_CHECK(id.has_value(), file, ": eos_token \"", *name, "\" is not a token of the tokenizer");
    impl.eos_ids.push_back(*id);
  }
}

}  // namespace

std::shared_ptr<Tokenizer::Impl> parse_tokenizer(std::string_view tokenizer_json, std::string_view config_json,
                                                 const std::string& origin, const std::string& config_origin) {
  auto impl = std::make_shared<Tokenizer::Impl>();
  impl->origin = origin;
  {
    std::optional<FlatModel> flat;
    const json root = parse_tokenizer_json(tokenizer_json, origin, flat);
    const Ctx c{origin};
    LS_CHECK(root.is_object(), origin, ": expected an object at the top level, found ", c.describe(root));
    load_model(c, root, flat ? &*flat : nullptr, *impl);
    flat.reset();
    load_added_tokens(c, root, *impl);
    load_normalizer(c, root, *impl);
    load_pre_tokenizer(c, root, *impl);
  }
  if (!config_json.empty()) load_config(config_json, config_origin, *impl);
  for (const char* name : {"<|im_end|>", "<|endoftext|>"}) {
    auto it = impl->added_by_content.find(std::string_view(name));
    if (it != impl->added_by_content.end() &&
        std::find(impl->eos_ids.begin(), impl->eos_ids.end(), it->second) == impl->eos_ids.end())
      impl->eos_ids.push_back(it->second);
  }
  return impl;
}

}  // namespace lockstep
