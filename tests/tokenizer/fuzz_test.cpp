// Fuzz-style robustness: random bytes through encode, and broken tokenizer.json files
// through the loader, must give a lockstep::Error (or a result), never a crash or a
// foreign exception.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "test_util.h"
#include "tokenizer/byte_level.h"
#include "tokenizer/utf8.h"

namespace lockstep {
namespace {

using nlohmann::json;

// A tiny but complete byte-level BPE in the Qwen3 tokenizer.json layout.
json toy_tokenizer() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level::char_of(static_cast<uint8_t>(b))] = b;
  vocab["he"] = 256;
  vocab["ll"] = 257;
  vocab["hell"] = 258;
  vocab["Ġw"] = 259;
  json merges = json::array({"h e", json::array({"l", "l"}), "he ll", "Ġ w"});
  json split = {{"type", "Split"},
                {"pattern", {{"Regex", "(?i:'s|'t)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                                       "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
                {"behavior", "Isolated"},
                {"invert", false}};
  json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}};
  return {{"version", "1.0"},
          {"added_tokens",
           json::array({{{"id", 260}, {"content", "<|end|>"}, {"special", true}, {"lstrip", false}, {"rstrip", false}}})},
          {"normalizer", {{"type", "NFC"}}},
          {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", json::array({split, byte_level})}}},
          {"decoder", byte_level},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

// Loads `text`; returns the error message, or "" on success. Any exception other than
// lockstep::Error fails the test.
std::string load_error(const std::string& text) {
  try {
    Tokenizer::from_json(text, "", "toy.json");
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

TEST(TokenizerFuzz, ToyTokenizerWorks) {
  const Tokenizer tok = Tokenizer::from_json(toy_tokenizer().dump(), "", "toy.json");
  EXPECT_EQ(tok.encode("hello"), (std::vector<int32_t>{258, 'o'}));
  EXPECT_EQ(tok.encode("hello world<|end|>").back(), 260);
  EXPECT_EQ(tok.decode(tok.encode("hello world<|end|>")), "hello world<|end|>");
}

TEST(TokenizerFuzz, RandomBytesEncodeOrFailCleanly) {
  const Tokenizer& tok = test::qwen3();
  std::mt19937 rng(5);
  for (int trial = 0; trial < 2000; ++trial) {
    std::string s(rng() % 40, '\0');
    for (char& c : s) c = static_cast<char>(rng() % 4 == 0 ? rng() % 128 : rng() % 256);
    if (trial % 3 == 0) s = "<|im_" + s + "|>";
    const bool valid = utf8::first_invalid(s) == std::string::npos;
    try {
      const auto ids = tok.encode(s);
      ASSERT_TRUE(valid) << "accepted invalid UTF-8";
      const std::string back = tok.decode(ids);
      ASSERT_EQ(utf8::first_invalid(back), std::string::npos);
    } catch (const Error&) {
      ASSERT_FALSE(valid) << "rejected valid UTF-8";
    }
  }
}

TEST(TokenizerFuzz, StructuralMutationsNameTheField) {
  struct Case {
    const char* expect;
    std::function<void(json&)> mutate;
  };
  const std::vector<Case> cases = {
      {"missing field \"model\"", [](json& j) { j.erase("model"); }},
      {"model.vocab", [](json& j) { j["model"].erase("vocab"); }},
      {"model.merges", [](json& j) { j["model"].erase("merges"); }},
      {"model.vocab: expected an object", [](json& j) { j["model"]["vocab"] = json::array(); }},
      {"model.merges: expected an array", [](json& j) { j["model"]["merges"] = "h e"; }},
      {"model: expected an object", [](json& j) { j["model"] = 3; }},
      {"model.type", [](json& j) { j["model"]["type"] = "WordPiece"; }},
      {"model.merges[1]", [](json& j) { j["model"]["merges"][1] = 7; }},
      {"model.merges[0]: expected \"left right\"", [](json& j) { j["model"]["merges"][0] = "hello"; }},
      {"is not in model.vocab", [](json& j) { j["model"]["merges"][0] = "h q"; }},
      {"expected a token id", [](json& j) { j["model"]["vocab"]["he"] = "256"; }},
      {"out of range", [](json& j) { j["model"]["vocab"]["he"] = -4; }},
      {"no token for byte", [](json& j) { j["model"]["vocab"].erase("a"); }},
      {"used twice", [](json& j) { j["model"]["vocab"]["ll"] = 256; }},
      {"added_tokens[0].id", [](json& j) { j["added_tokens"][0].erase("id"); }},
      {"added_tokens[0].content: expected a string", [](json& j) { j["added_tokens"][0]["content"] = 1; }},
      {"added_tokens: expected an array", [](json& j) { j["added_tokens"] = json::object(); }},
      {"does not compile", [](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(["; }},
      {"unsupported pre-tokenizer", [](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["type"] = "Whitespace"; }},
      {"pre_tokenizer", [](json& j) { j.erase("pre_tokenizer"); }},
      {"normalizer.type", [](json& j) { j["normalizer"]["type"] = "NFKC"; }},
      {"byte_fallback", [](json& j) { j["model"]["byte_fallback"] = true; }},
      {"top level", [](json& j) { j = json::array({1, 2}); }},
  };
  for (const Case& c : cases) {
    json j = toy_tokenizer();
    c.mutate(j);
    const std::string error = load_error(j.dump());
    EXPECT_NE(error.find(c.expect), std::string::npos) << "expected \"" << c.expect << "\", got \"" << error << "\"";
    EXPECT_NE(error.find("toy.json"), std::string::npos) << error;
  }
}

TEST(TokenizerFuzz, TruncationsAndByteFlips) {
  const std::string text = toy_tokenizer().dump();
  std::mt19937 rng(9);
  for (int trial = 0; trial < 60; ++trial) {
    const std::string cut = text.substr(0, rng() % text.size());
    EXPECT_NE(load_error(cut).find("not valid JSON"), std::string::npos);
  }
  int loaded = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::string mutated = text;
    for (int k = 0; k < 1 + static_cast<int>(rng() % 3); ++k)
      mutated[rng() % mutated.size()] = "\"{}[]:,0a \\\xff"[rng() % 13];
    if (load_error(mutated).empty()) ++loaded;  // only checks that nothing else escapes
  }
  SUCCEED() << loaded << " mutated files still loaded";
}

// Nesting past the JSON depth limit, in the model (the SAX fast path) or elsewhere, is an
// error naming the file at any depth, never a stack overflow.
TEST(TokenizerFuzz, DeeplyNestedJsonIsAnError) {
  for (int depth : {513, 10000, 1000000}) {
    const std::string deep = std::string(depth, '[') + std::string(depth, ']');
    for (const char* key : {"normalizer", "merges"}) {
      json t = toy_tokenizer();
      std::string text = t.dump();
      const std::string field = std::string("\"") + key + "\":";
      text.insert(text.find(field) + field.size(), deep + ",\"x\":");  // the old value is kept after
      const std::string err = load_error(text);
      EXPECT_EQ(err.rfind("toy.json: JSON nests deeper than 512 levels", 0), 0u) << key << " " << depth << ": " << err;
    }
  }
}

TEST(TokenizerFuzz, TruncatedRealTokenizerJson) {
  const std::string text = test::read_text(test::fixture_dir() + "/tokenizer.json");
  for (size_t cut : {size_t{0}, size_t{1}, text.size() / 2, text.size() - 2})
    EXPECT_NE(load_error(text.substr(0, cut)).find("not valid JSON"), std::string::npos) << cut;
}

TEST(TokenizerFuzz, MissingDirectoryAndBadConfig) {
  try {
    Tokenizer::load("/nonexistent-dir");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/tokenizer.json"), std::string::npos);
  }
  EXPECT_FALSE(Tokenizer::available("/nonexistent-dir"));
  EXPECT_TRUE(Tokenizer::available(test::fixture_dir()));
  const std::string toy = toy_tokenizer().dump();
  EXPECT_THROW(Tokenizer::from_json(toy, "{\"eos_token\": \"<|nope|>\"}"), Error);
  EXPECT_THROW(Tokenizer::from_json(toy, "[1]"), Error);
  EXPECT_THROW(Tokenizer::from_json(toy, "{\"chat_template\": 5}"), Error);
  EXPECT_EQ(Tokenizer::from_json(toy, "{\"eos_token\": {\"content\": \"<|end|>\"}}").eos_token_ids(),
            std::vector<int32_t>{260});
}

}  // namespace
}  // namespace lockstep
