// Prompt data sets: keys, chat templates, gzip, errors naming file/line/key, length limits, the
// stateless data order, and a mutated-file fuzz test of the parser.
#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "rl/prompt_dataset.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

using testing::TempDir;

const Tokenizer& fixture_tokenizer() {
  static const Tokenizer tok = Tokenizer::load(std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer");
  return tok;
}

std::string write_file(const TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.sub(name);
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

std::string write_gz(const TempDir& dir, const std::string& name, const std::string& text) {
  const std::string path = dir.sub(name);
  gzFile f = gzopen(path.c_str(), "wb");
  EXPECT_TRUE(f);
  EXPECT_EQ(gzwrite(f, text.data(), unsigned(text.size())), int(text.size()));
  gzclose(f);
  return path;
}

// The error message of loading `path`, or "" when it loads.
std::string load_error(const std::string& path, const PromptDataOptions& o = {}) {
  try {
    load_prompt_dataset(path, o, fixture_tokenizer());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

const char* kThreeLines = R"({"prompt": "What is 1 + 1?", "label": "2", "meta": {"id": 7}})"
                          "\n"
                          R"({"prompt": "What is 3 / 4?", "label": 0.75, "meta": null})"
                          "\n\n"
                          R"({"prompt": "What is 10 * 10?", "label": 100, "meta": [1, 2]})"
                          "\n";

TEST(PromptDataset, ReadsPromptsLabelsAndMetadata) {
  TempDir dir("prompt_data");
  PromptDataOptions o;
  o.metadata_key = "meta";
  auto d = load_prompt_dataset(write_file(dir, "d.jsonl", kThreeLines), o, fixture_tokenizer());
  ASSERT_EQ(d.samples.size(), 3u);
  EXPECT_EQ(d.samples[0].prompt, "What is 1 + 1?");
  EXPECT_EQ(d.samples[0].prompt_ids, fixture_tokenizer().encode("What is 1 + 1?"));
  EXPECT_EQ(d.samples[0].label, "2");
  EXPECT_EQ(d.samples[0].metadata["id"], 7);
  EXPECT_EQ(d.samples[1].label, "0.75");
  EXPECT_TRUE(d.samples[1].metadata.is_null());
  EXPECT_EQ(d.samples[2].line, 4);  // the blank line 3 is skipped but counted
  EXPECT_EQ(d.samples[2].label, "100");
  EXPECT_EQ(d.skipped_too_long, 0);
}

TEST(PromptDataset, GzipReadsTheSameAndCorruptionIsAnError) {
  TempDir dir("prompt_data_gz");
  auto plain = load_prompt_dataset(write_file(dir, "d.jsonl", kThreeLines), {}, fixture_tokenizer());
  const std::string gz = write_gz(dir, "d.jsonl.gz", kThreeLines);
  auto packed = load_prompt_dataset(gz, {}, fixture_tokenizer());
  ASSERT_EQ(packed.samples.size(), plain.samples.size());
  for (size_t i = 0; i < plain.samples.size(); ++i)
    EXPECT_EQ(packed.samples[i].prompt_ids, plain.samples[i].prompt_ids);
  std::string bytes = testing::read_bytes(gz);
  const std::string cut = write_file(dir, "cut.jsonl.gz", bytes.substr(0, bytes.size() - 12));
  EXPECT_NE(load_error(cut).find(cut + ": cannot read the file"), std::string::npos) << load_error(cut);
  EXPECT_NE(load_error(dir.sub("absent.jsonl")).find("absent.jsonl: file not found"), std::string::npos);
}

TEST(PromptDataset, ChatTemplateRendersStringsAndMessageLists) {
  TempDir dir("prompt_data_chat");
  const std::string path = write_file(
      dir, "chat.jsonl",
      R"({"question": "Add 2 and 3.", "answer": "5"})"
      "\n"
      R"({"question": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}], "answer": "5", "enable_thinking": false})"
      "\n");
  PromptDataOptions o;
  o.input_key = "question";
  o.label_key = "answer";
  o.apply_chat_template = true;
  auto d = load_prompt_dataset(path, o, fixture_tokenizer());
  ASSERT_EQ(d.samples.size(), 2u);
  ChatOptions thinking;
  EXPECT_EQ(d.samples[0].prompt, fixture_tokenizer().render_chat({ChatMessage("user", "Add 2 and 3.")}, thinking));
  ChatOptions no_thinking;
  no_thinking.enable_thinking = false;
  EXPECT_EQ(d.samples[1].prompt,
            fixture_tokenizer().render_chat({ChatMessage("system", "Be brief."), ChatMessage("user", "Add 2 and 3.")},
                                            no_thinking));
  EXPECT_NE(d.samples[1].prompt.find("<think>\n\n</think>"), std::string::npos);
  EXPECT_EQ(d.samples[0].prompt_ids, fixture_tokenizer().encode(d.samples[0].prompt));
  o.apply_chat_template = false;
  EXPECT_EQ(load_error(path, o), path + ":2: key 'question': a list of chat messages needs --apply-chat-template");
}

TEST(PromptDataset, BadLinesNameFileLineAndKey) {
  TempDir dir("prompt_data_bad");
  const std::string good = R"({"prompt": "p", "label": "1"})";
  auto error_for = [&](const std::string& bad, PromptDataOptions o = {}) {
    return load_error(write_file(dir, "bad.jsonl", good + "\n" + bad + "\n" + good + "\n"), o);
  };
  const std::string at = dir.sub("bad.jsonl") + ":2: ";
  EXPECT_EQ(error_for(R"({"label": "1"})"), at + "missing key 'prompt' (the prompt; see --input-key)");
  EXPECT_EQ(error_for(R"({"prompt": "p"})"), at + "missing key 'label' (the answer; see --label-key)");
  EXPECT_EQ(error_for(R"({"prompt": 5, "label": "1"})"),
            at + "key 'prompt': expected a string or a list of chat messages, found number");
  EXPECT_EQ(error_for(R"({"prompt": "p", "label": {"a": 1}})"),
            at + "key 'label': expected a string or a number, found object");
  EXPECT_EQ(error_for(R"({"prompt": "", "label": "1"})"), at + "key 'prompt': the prompt is empty");
  EXPECT_EQ(error_for(R"(["prompt", "label"])"), at + "expected a JSON object, found array");
  EXPECT_EQ(error_for(R"({"prompt": "p", "label": "1", "enable_thinking": "no"})"),
            at + "key 'enable_thinking': expected true or false, found string");
  EXPECT_EQ(error_for(R"({"prompt": "p", "label": "1"})").size(), 0u);
  EXPECT_EQ(error_for(R"({"prompt": "p", "label": "1"} trailing)").rfind(at + "not valid JSON", 0), 0u);
  PromptDataOptions meta;
  meta.metadata_key = "info";
  EXPECT_EQ(load_error(write_file(dir, "m.jsonl", good + "\n"), meta),
            dir.sub("m.jsonl") + ":1: missing key 'info' (see --metadata-key)");
  PromptDataOptions chat;
  chat.apply_chat_template = true;
  EXPECT_EQ(error_for(R"({"prompt": [{"role": "robot", "content": "hi"}], "label": "1"})", chat),
            at + "key 'prompt': messages[0].role: expected system, user, assistant or tool, found \"robot\"");
}

TEST(PromptDataset, LongPromptsAreSkippedAndCounted) {
  TempDir dir("prompt_data_long");
  const std::string path = write_file(dir, "d.jsonl", kThreeLines);
  PromptDataOptions o;
  o.max_prompt_len = int64_t(fixture_tokenizer().encode("What is 3 / 4?").size());
  auto d = load_prompt_dataset(path, o, fixture_tokenizer());
  EXPECT_EQ(d.skipped_too_long, 1);  // "What is 10 * 10?" is the longest
  ASSERT_EQ(d.samples.size(), 2u);
  EXPECT_EQ(d.samples[1].label, "0.75");
  o.max_prompt_len = 1;
  EXPECT_NE(load_error(path, o).find("no prompts (3 longer than --rollout-max-prompt-len were skipped)"),
            std::string::npos);
}

TEST(PromptOrder, EpochsArePermutationsDrawnFromSeedAndEpoch) {
  PromptOrder plain(5, 1, false);
  for (int64_t p = 0; p < 12; ++p) EXPECT_EQ(plain.index(p), p % 5);
  PromptOrder a(50, 7, true), b(50, 7, true), other_seed(50, 8, true);
  std::vector<int64_t> first, second, again, other;
  for (int64_t p = 0; p < 50; ++p) first.push_back(a.index(p));
  for (int64_t p = 50; p < 100; ++p) second.push_back(a.index(p));
  for (int64_t p = 99; p >= 50; --p) again.insert(again.begin(), b.index(p));  // random access, backwards
  for (int64_t p = 0; p < 50; ++p) other.push_back(other_seed.index(p));
  EXPECT_EQ(std::set<int64_t>(first.begin(), first.end()).size(), 50u);
  EXPECT_EQ(std::set<int64_t>(second.begin(), second.end()).size(), 50u);
  EXPECT_EQ(*std::max_element(first.begin(), first.end()), 49);
  EXPECT_NE(first, second);
  EXPECT_EQ(second, again);
  EXPECT_NE(first, other);
  std::vector<int64_t> identity(50);
  for (int64_t i = 0; i < 50; ++i) identity[size_t(i)] = i;
  EXPECT_NE(first, identity);
}

// Mutated copies of a valid file either load or fail with an Error that names the file; no
// other exception, crash or hang. Mutations are drawn from a fixed seed.
TEST(PromptDataset, FuzzedFilesLoadOrNameTheFile) {
  TempDir dir("prompt_data_fuzz");
  const std::string base =
      std::string(kThreeLines) +
      R"({"prompt": [{"role": "user", "content": "Caf\u00e9 \u4e2d \\boxed{1}"}], "label": "-1/2", "meta": {"k": [true, 1.5]}})"
      "\n";
  PromptDataOptions o;
  o.metadata_key = "meta";
  o.apply_chat_template = true;
  const std::string alphabet = "{}[]\":,\\\n 0a-\xC3\xA9\xFF";
  int loaded = 0, rejected = 0;
  for (uint64_t trial = 0; trial < 300; ++trial) {
    std::string text = base;
    const int edits = 1 + int(philox_uniform(99, trial, 0) * 4);
    for (int e = 0; e < edits; ++e) {
      const size_t pos = size_t(philox_uniform(99, trial, 1 + uint64_t(e), 1) * float(text.size()));
      const int kind = int(philox_uniform(99, trial, 1 + uint64_t(e), 2) * 4);
      const char c = alphabet[size_t(philox_uniform(99, trial, 1 + uint64_t(e), 3) * float(alphabet.size()))];
      if (kind == 0) text[pos] = c;
      if (kind == 1) text.insert(text.begin() + long(pos), c);
      if (kind == 2) text.erase(pos, 1 + pos % 7);
      if (kind == 3) text = text.substr(0, pos);
    }
    const std::string path = write_file(dir, "fuzz.jsonl", text);
    try {
      auto d = load_prompt_dataset(path, o, fixture_tokenizer());
      for (const auto& s : d.samples) EXPECT_FALSE(s.prompt_ids.empty());
      ++loaded;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind(path + ":", 0), 0u) << "trial " << trial << ": " << e.what();
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "trial " << trial << ": not a lockstep::Error: " << e.what() << "\n" << text;
    }
  }
  EXPECT_GT(loaded, 10);  // the mutations leave some files valid and break most
  EXPECT_GT(rejected, 100);
}

}  // namespace
}  // namespace lockstep::rl

namespace lockstep::rl {
namespace {

// A padded model vocabulary (Qwen3: 151936 rows for 151669 tokens) can sample ids with no text.
TEST(PromptDataset, SampledPaddingIdsDecodeToNothing) {
  const Tokenizer& tok = fixture_tokenizer();
  const std::vector<int32_t> ids = tok.encode("So \\boxed{4}.");
  std::vector<int32_t> padded = ids;
  padded.insert(padded.begin() + 2, tok.vocab_size() + 5);
  padded.push_back(tok.vocab_size());
  EXPECT_EQ(decode_sampled(tok, padded, true), tok.decode(ids, true));
  EXPECT_EQ(decode_sampled(tok, ids, false), tok.decode(ids, false));
  EXPECT_THROW(tok.decode(padded, true), Error);  // what the plain decoder does
}

}  // namespace
}  // namespace lockstep::rl
