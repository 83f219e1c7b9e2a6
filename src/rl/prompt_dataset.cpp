#include "rl/prompt_dataset.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "core/json_parse.h"
#include "core/philox.h"
#include "rl/rewards/local_reward.h"
#include "rl/text_lines.h"
#include "tokenizer/chat_json.h"

namespace lockstep::rl {

namespace {

using nlohmann::ordered_json;

// Separates the shuffle's random stream from the run's other uses of the seed.
constexpr uint64_t kShuffleKey = 0x73687566;

std::string render(const Tokenizer& tokenizer, const std::vector<ChatMessage>& messages, const ChatOptions& options,
                   const std::string& where) {
  try {
    return tokenizer.render_chat(messages, options);
  } catch (const Error& e) {
    fail(where, ": --apply-chat-template: ", e.what());
  }
}

PromptSample parse_line(const std::string& text, const std::string& where, const PromptDataOptions& o,
                        const Tokenizer& tokenizer) {
  const ordered_json j = parse_ordered_json(text, where);
  LS_CHECK(j.is_object(), where, ": expected a JSON object, found ", j.type_name());
  PromptSample s;
  LS_CHECK(j.contains(o.input_key), where, ": missing key '", o.input_key, "' (the prompt; see --input-key)");
  const ordered_json& input = j[o.input_key];
  const std::string key_where = where + ": key '" + o.input_key + "'";
  bool thinking = o.enable_thinking;
  if (auto it = j.find("enable_thinking"); it != j.end()) {
    LS_CHECK(it->is_boolean(), where, ": key 'enable_thinking': expected true or false, found ", it->type_name());
    thinking = it->get<bool>();
  }
  s.enable_thinking = thinking;
  ChatOptions co;
  co.enable_thinking = thinking;
  co.tools = o.tools;
  if (input.is_string()) {
    s.prompt = input.get<std::string>();
    if (o.apply_chat_template) s.prompt = render(tokenizer, {ChatMessage("user", s.prompt)}, co, key_where);
  } else if (input.is_array()) {
    LS_CHECK(o.apply_chat_template, key_where, ": a list of chat messages needs --apply-chat-template");
    s.prompt = render(tokenizer, chat_messages_from_json(input, key_where + ": "), co, key_where);
  } else {
    fail(key_where, ": expected a string or a list of chat messages, found ", input.type_name());
  }
  LS_CHECK(!s.prompt.empty(), key_where, ": the prompt is empty");
  LS_CHECK(j.contains(o.label_key), where, ": missing key '", o.label_key, "' (the answer; see --label-key)");
  s.label = label_text(parse_json(j[o.label_key].dump(), where), where + ": key '" + o.label_key + "'");
  if (!o.metadata_key.empty()) {
    LS_CHECK(j.contains(o.metadata_key), where, ": missing key '", o.metadata_key, "' (see --metadata-key)");
    s.metadata = parse_json(j[o.metadata_key].dump(), where);
  }
  try {
    s.prompt_ids = tokenizer.encode(s.prompt);
  } catch (const Error& e) {
    fail(key_where, ": ", e.what());
  }
  return s;
}

}  // namespace

PromptDataset load_prompt_dataset(const std::string& path, const PromptDataOptions& options,
                                  const Tokenizer& tokenizer) {
  PromptDataset d;
  d.path = path;
  const std::vector<std::string> lines = read_text_lines(path);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(i + 1);
    PromptSample s = parse_line(lines[i], where, options, tokenizer);
    s.line = int64_t(i + 1);
    if (options.max_prompt_len > 0 && int64_t(s.prompt_ids.size()) > options.max_prompt_len) {
      ++d.skipped_too_long;
      continue;
    }
    d.samples.push_back(std::move(s));
  }
  LS_CHECK(!d.samples.empty(), path, ": no prompts (", d.skipped_too_long,
           " longer than --rollout-max-prompt-len were skipped)");
  return d;
}

std::string decode_sampled(const Tokenizer& tokenizer, const std::vector<int32_t>& ids, bool skip_special) {
  const int32_t known = tokenizer.vocab_size();
  if (std::all_of(ids.begin(), ids.end(), [&](int32_t id) { return id >= 0 && id < known; }))
    return tokenizer.decode(ids, skip_special);
  std::vector<int32_t> kept;
  for (int32_t id : ids)
    if (id >= 0 && id < known) kept.push_back(id);
  return tokenizer.decode(kept, skip_special);
}

PromptOrder::PromptOrder(int64_t size, uint64_t seed, bool shuffle) : size_(size), seed_(seed), shuffle_(shuffle) {
  LS_CHECK(size > 0, "PromptOrder: empty data set");
}

int64_t PromptOrder::index(int64_t position) {
  const int64_t epoch = position / size_, within = position % size_;
  if (!shuffle_) return within;
  if (epoch != epoch_) {
    // Fisher-Yates with draws keyed by (seed, epoch, slot): any epoch's order without the others.
    order_.resize(size_t(size_));
    std::iota(order_.begin(), order_.end(), int64_t(0));
    const uint64_t key = mix_seed(seed_ ^ kShuffleKey, uint64_t(epoch));
    for (int64_t i = size_ - 1; i > 0; --i) {
      PhiloxCounter ctr = {uint32_t(i), uint32_t(uint64_t(i) >> 32), 0, 0};
      PhiloxCounter r = philox4x32_10(ctr, {uint32_t(key), uint32_t(key >> 32)});
      const uint64_t draw = (uint64_t(r[0]) << 32) | r[1];
      std::swap(order_[size_t(i)], order_[size_t(draw % uint64_t(i + 1))]);
    }
    epoch_ = epoch;
  }
  return order_[size_t(within)];
}

}  // namespace lockstep::rl
