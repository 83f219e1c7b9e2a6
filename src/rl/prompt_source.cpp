#include "rl/prompt_source.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "core/json_parse.h"
#include "dist/communicator.h"
#include "rl/environment.h"
#include "rl/prompt_dataset.h"
#include "rl/rewards/command_reward.h"
#include "rl/rewards/local_reward.h"
#include "rl/rewards/remote_reward.h"
#include "rollout/request.h"
#include "tokenizer/tokenizer.h"

namespace lockstep::rl {

namespace {

class TaskSource : public PromptSource {
 public:
  explicit TaskSource(const TrainConfig& c) : task_(make_task(c.task, c.task_digits)), cfg_(c) {
    LS_CHECK(c.rollout_max_response_len >= task_->max_answer_len(), "--rollout-max-response-len ",
             c.rollout_max_response_len, " is shorter than the task's answers (", task_->max_answer_len(),
             " tokens with <eos>)");
  }
  TaskExample prompt(uint64_t data_seed, int64_t position) override {
    return task_->example(data_seed, uint64_t(position));
  }
  TaskExample demonstration(uint64_t data_seed, int64_t index) override {
    return task_->example(data_seed, uint64_t(index));
  }
  int64_t max_prompt_len() const override { return int64_t(task_->example(0, 0).prompt.size()); }
  int64_t max_sequence_len() const override { return max_prompt_len() + cfg_.rollout_max_response_len; }
  void check_model(const ModelConfig& m, const std::string& where) const override {
    LS_CHECK(m.vocab_size >= vocab::kTaskVocabSize, where, ": vocab_size ", m.vocab_size,
             " is too small for the task vocabulary (", vocab::kTaskVocabSize, " ids)");
    const int64_t longest = max_prompt_len() + cfg_.rollout_max_response_len;
    LS_CHECK(longest <= m.max_position_embeddings, where, ": prompt + --rollout-max-response-len = ", longest,
             " tokens exceeds max_position_embeddings ", m.max_position_embeddings);
  }
  void set_stops(rollout::GenerationRequest& request) const override { request.stop_token_ids = {vocab::kEos}; }
  std::string text(const std::vector<int32_t>& ids) const override { return vocab::text(ids); }
  std::vector<float> rewards(const std::vector<int64_t>&, const std::vector<TaskExample>& prompts,
                             const std::vector<std::vector<int32_t>>& responses) override {
    std::vector<float> out;
    for (size_t i = 0; i < responses.size(); ++i) out.push_back(task_->reward(prompts[i], responses[i]));
    return out;
  }

 private:
  std::unique_ptr<Task> task_;
  const TrainConfig& cfg_;
};

std::string tokenizer_dir(const TrainConfig& c) { return c.tokenizer.empty() ? c.load : c.tokenizer; }

class DataSource : public PromptSource {
 public:
  explicit DataSource(const TrainConfig& c)
      : cfg_(c), tokenizer_(load_tokenizer(c)), reward_type_(reward_type_from_name(c.rm_type)) {
    LS_CHECK(c.sft_warmup_steps == 0 || !c.sft_data.empty(), "--sft-warmup-steps ", c.sft_warmup_steps,
             ": the SFT warm start needs demonstrations: give --sft-data F.jsonl or set it to 0");
    PromptDataOptions o;
    o.input_key = c.input_key;
    o.label_key = c.label_key;
    o.metadata_key = c.metadata_key;
    o.apply_chat_template = c.apply_chat_template;
    o.enable_thinking = c.enable_thinking;
    o.tools = rollout_tool_definitions(c.rollout_tool);
    o.max_prompt_len = c.rollout_max_prompt_len;
    data_ = load_prompt_dataset(c.prompt_data, o, tokenizer_);
    for (const auto& s : data_.samples) longest_ = std::max(longest_, int64_t(s.prompt_ids.size()));
    const int64_t size = int64_t(data_.samples.size());
    LS_CHECK(c.num_epoch == 0 || c.num_rollout * c.rollout_batch_size <= c.num_epoch * size, "--num-rollout ",
             c.num_rollout, " x --rollout-batch-size ", c.rollout_batch_size, " = ",
             c.num_rollout * c.rollout_batch_size, " prompts exceeds --num-epoch ", c.num_epoch, " x ", size,
             " prompts of ", c.prompt_data);
    for (const char* end : {"<|im_end|>", "<|endoftext|>"})
      if (auto id = tokenizer_.token_id(end)) stop_ids_.push_back(*id);
    for (int32_t id : tokenizer_.eos_token_ids())
      if (std::find(stop_ids_.begin(), stop_ids_.end(), id) == stop_ids_.end()) stop_ids_.push_back(id);
    stop_strings_ = parse_rollout_stop(c.rollout_stop);
    eval_ = std::make_unique<Evaluator>(c, o, tokenizer_);
    if (!c.sft_data.empty()) load_demonstrations(o);
  }
  TaskExample prompt(uint64_t data_seed, int64_t position) override {
    TaskExample ex;
    ex.prompt = sample_at(data_seed, position).prompt_ids;
    return ex;
  }
  TaskExample demonstration(uint64_t data_seed, int64_t index) override {
    LS_CHECK(!demos_.empty(), "--sft-warmup-steps: no --sft-data demonstrations");
    if (!demo_order_)
      demo_order_ = std::make_unique<PromptOrder>(int64_t(demos_.size()), data_seed, cfg_.rollout_shuffle);
    return demos_[size_t(demo_order_->index(index))];
  }
  int64_t max_prompt_len() const override { return longest_; }
  int64_t max_sequence_len() const override {
    return std::max(longest_ + cfg_.rollout_max_response_len, eval_->max_sequence_len());
  }
  void check_model(const ModelConfig& m, const std::string& where) const override {
    LS_CHECK(m.vocab_size >= tokenizer_.vocab_size(), where, ": vocab_size ", m.vocab_size,
             " is smaller than the tokenizer's ", tokenizer_.vocab_size(), " ids (", tokenizer_dir(cfg_), ")");
    const int64_t longest = longest_ + cfg_.rollout_max_response_len;
    LS_CHECK(longest <= m.max_position_embeddings, where, ": the longest prompt of ", cfg_.prompt_data, " (", longest_,
             " tokens) + --rollout-max-response-len = ", longest, " tokens exceeds max_position_embeddings ",
             m.max_position_embeddings, " (set --rollout-max-prompt-len to skip long prompts)");
    LS_CHECK(longest_demo_ <= m.max_position_embeddings, where, ": the longest --sft-data demonstration (",
             longest_demo_, " tokens) exceeds max_position_embeddings ", m.max_position_embeddings);
    LS_CHECK(eval_->max_sequence_len() <= m.max_position_embeddings, where, ": the longest eval prompt (",
             eval_->max_prompt_len(), " tokens) + the eval response length exceeds max_position_embeddings ",
             m.max_position_embeddings, " (set --rollout-max-prompt-len to skip long prompts)");
  }
  void set_stops(rollout::GenerationRequest& request) const override {
    request.stop_token_ids = stop_ids_;
    request.stop_strings = stop_strings_;
  }
  std::string text(const std::vector<int32_t>& ids) const override { return decode_sampled(tokenizer_, ids, false); }
  std::vector<float> rewards(const std::vector<int64_t>& positions, const std::vector<TaskExample>&,
                             const std::vector<std::vector<int32_t>>& responses) override {
    std::vector<RewardRequest> requests;
    for (size_t i = 0; i < responses.size(); ++i) {
      const PromptSample& s = sample_at(data_seed_, positions[i]);
      requests.push_back({s.prompt, decode_sampled(tokenizer_, responses[i], true), s.label, s.metadata});
    }
    return score(requests);
  }
  bool eval_due(int64_t step) const override { return eval_->due(step); }
  nlohmann::json evaluate(int64_t step, uint64_t seed, const GenerateFn& generate) override {
    return eval_->run(
        step, seed, [this](rollout::GenerationRequest& r) { set_stops(r); }, generate,
        [this](const std::vector<RewardRequest>& r) { return score(r); }, world_);
  }
  void set_world(dist::Communicator* world) override { world_ = world; }
  const PromptSample* data_sample(int64_t position) override { return &sample_at(data_seed_, position); }
  const Tokenizer* tokenizer() const override { return &tokenizer_; }
  void add_metrics(nlohmann::json& m) const override {
    m["rollout/skipped_long_prompts"] = data_.skipped_too_long;
    m["rollout/epoch"] = double(last_position_ + 1) / double(data_.samples.size());
  }

 private:
  // The run's reward of decoded samples: the reward server, the custom program or --rm-type.
  std::vector<float> score(const std::vector<RewardRequest>& requests) const {
    const bool outside = !cfg_.rm_url.empty() || !cfg_.custom_rm_cmd.empty();
    if (!outside || !world_ || world_->size() == 1) return score_here(requests);
    // Rank 0 asks the outside reward once; every rank gets its rewards, or its error.
    std::vector<float> rewards(requests.size(), 0.0f);
    std::string error;
    if (world_->rank() == 0) {
      try {
        rewards = score_here(requests);
      } catch (const Error& e) {
        error = e.what();
      }
    }
    uint64_t size = error.size();
    world_->broadcast_n(&size, 1, 0);
    error.resize(size);
    world_->broadcast(error.data(), size, 0);
    if (!error.empty()) fail(error);
    world_->broadcast_n(rewards.data(), rewards.size(), 0);
    return rewards;
  }
  std::vector<float> score_here(const std::vector<RewardRequest>& requests) const {
    if (!cfg_.rm_url.empty()) {
      RemoteRewardOptions o;
      o.url = cfg_.rm_url;
      o.concurrency = cfg_.rm_concurrency;
      o.timeout_s = cfg_.rm_timeout;
      o.retries = cfg_.rm_retries;
      return remote_rewards(requests, o);
    }
    if (!cfg_.custom_rm_cmd.empty()) return command_rewards(requests, cfg_.custom_rm_cmd);
    std::vector<float> out;
    for (const auto& r : requests) out.push_back(local_reward(reward_type_, r.response, r.label));
    return out;
  }
  static Tokenizer load_tokenizer(const TrainConfig& c) {
    const std::string dir = tokenizer_dir(c);
    LS_CHECK(!dir.empty() && Tokenizer::available(dir),
             "--prompt-data needs a tokenizer: --tokenizer DIR or --load DIR with tokenizer.json (",
             dir.empty() ? std::string("neither is set") : dir + "/tokenizer.json not found", ")");
    return Tokenizer::load(dir);
  }
  // --sft-data: the prompt under --input-key (templated like the prompts), the response to imitate
  // under "response", ended by <|im_end|> (chat) or the tokenizer's first end token.
  void load_demonstrations(PromptDataOptions o) {
    o.label_key = "response";
    o.max_prompt_len = 0;
    const PromptDataset d = load_prompt_dataset(cfg_.sft_data, o, tokenizer_);
    const auto end = cfg_.apply_chat_template ? tokenizer_.token_id("<|im_end|>") : std::optional<int32_t>();
    const int32_t end_id = end ? *end : tokenizer_.eos_token_ids().at(0);
    for (const auto& s : d.samples) {
      TaskExample ex;
      ex.prompt = s.prompt_ids;
      ex.answer = tokenizer_.encode(s.label);
      ex.answer.push_back(end_id);
      longest_demo_ = std::max(longest_demo_, int64_t(ex.prompt.size() + ex.answer.size()));
      demos_.push_back(std::move(ex));
    }
  }
  const PromptSample& sample_at(uint64_t data_seed, int64_t position) {
    if (!order_ || data_seed != data_seed_) {
      order_ = std::make_unique<PromptOrder>(int64_t(data_.samples.size()), data_seed, cfg_.rollout_shuffle);
      data_seed_ = data_seed;
    }
    last_position_ = std::max(last_position_, position);
    return data_.samples[size_t(order_->index(position))];
  }

  const TrainConfig& cfg_;
  Tokenizer tokenizer_;
  RewardType reward_type_;
  PromptDataset data_;
  int64_t longest_ = 0, last_position_ = -1;
  std::vector<int32_t> stop_ids_;
  std::vector<std::string> stop_strings_;
  std::unique_ptr<PromptOrder> order_;
  std::unique_ptr<Evaluator> eval_;
  dist::Communicator* world_ = nullptr;
  std::vector<TaskExample> demos_;
  std::unique_ptr<PromptOrder> demo_order_;
  int64_t longest_demo_ = 0;
  uint64_t data_seed_ = 0;
};

}  // namespace

std::vector<std::string> parse_rollout_stop(const std::string& value) {
  if (value.empty()) return {};
  if (value.front() != '[') return {value};
  nlohmann::json j;
  try {
    j = parse_json(value, "--rollout-stop");
  } catch (const Error& e) {
    fail("--rollout-stop: expected a JSON array of strings or one plain string, got '", value, "' (", e.what(), ")");
  }
  LS_CHECK(j.is_array(), "--rollout-stop: expected a JSON array of strings, got '", value, "'");
  std::vector<std::string> out;
  for (size_t i = 0; i < j.size(); ++i) {
    LS_CHECK(j[i].is_string() && !j[i].get<std::string>().empty(), "--rollout-stop: element ", i,
             " must be a non-empty string, got ", j[i].dump());
    out.push_back(j[i].get<std::string>());
  }
  return out;
}

void validate_prompt_source_options(const TrainConfig& c) {
  reward_type_from_name(c.rm_type);
  LS_CHECK(c.num_epoch >= 0, "--num-epoch: expected >= 0, got ", c.num_epoch);
  LS_CHECK(c.rollout_max_prompt_len >= 0, "--rollout-max-prompt-len: expected >= 0, got ", c.rollout_max_prompt_len);
  LS_CHECK(!c.input_key.empty(), "--input-key: expected a key name, got ''");
  LS_CHECK(!c.label_key.empty(), "--label-key: expected a key name, got ''");
  parse_rollout_stop(c.rollout_stop);
  LS_CHECK(c.tokenizer.empty() || Tokenizer::available(c.tokenizer), "--tokenizer ", c.tokenizer,
           ": tokenizer.json not found");
  LS_CHECK(c.rm_url.empty() || c.custom_rm_cmd.empty(), "--rm-url and --custom-rm-cmd: give one reward, not both");
  if (!c.rm_url.empty()) parse_http_url(c.rm_url);
  LS_CHECK(c.rm_concurrency >= 1, "--rm-concurrency: expected >= 1, got ", c.rm_concurrency);
  LS_CHECK(c.rm_timeout > 0 && std::isfinite(c.rm_timeout), "--rm-timeout: expected seconds > 0, got ", c.rm_timeout);
  LS_CHECK(c.rm_retries >= 0, "--rm-retries: expected >= 0, got ", c.rm_retries);
  LS_CHECK(c.eval_interval >= 0, "--eval-interval: expected >= 0, got ", c.eval_interval);
  LS_CHECK(c.n_samples_per_eval_prompt >= 1, "--n-samples-per-eval-prompt: expected >= 1, got ",
           c.n_samples_per_eval_prompt);
  LS_CHECK(rollout::valid_temperature(c.eval_temperature),
           "--eval-temperature: expected 0 (greedy) or a finite value >= ", rollout::kMinTemperature, ", got ",
           c.eval_temperature);
  LS_CHECK(c.eval_top_p > 0 && c.eval_top_p <= 1, "--eval-top-p: expected (0, 1], got ", c.eval_top_p);
  LS_CHECK(c.eval_max_response_len >= 0, "--eval-max-response-len: expected >= 0, got ", c.eval_max_response_len);
  for (const auto& [name, path] : parse_eval_prompt_data(c.eval_prompt_data))
    LS_CHECK(std::filesystem::is_regular_file(path), "--eval-prompt-data ", name, " ", path, ": file not found");
  LS_CHECK(c.sft_data.empty() || std::filesystem::is_regular_file(c.sft_data), "--sft-data ", c.sft_data,
           ": file not found");
  if (c.prompt_data.empty()) {
    LS_CHECK(c.sft_data.empty(), "--sft-data needs --prompt-data (the built-in tasks make their own demonstrations)");
    LS_CHECK(c.rollout_stop.empty(), "--rollout-stop needs --prompt-data (the built-in tasks have no text)");
    LS_CHECK(c.eval_prompt_data.empty(), "--eval-prompt-data needs --prompt-data (the built-in tasks have no text)");
    LS_CHECK(c.rm_url.empty() && c.custom_rm_cmd.empty(),
             "--rm-url and --custom-rm-cmd need --prompt-data (the built-in tasks score themselves)");
    return;
  }
  LS_CHECK(std::filesystem::is_regular_file(c.prompt_data), "--prompt-data ", c.prompt_data, ": file not found");
}

std::unique_ptr<PromptSource> make_prompt_source(const TrainConfig& config) {
  if (config.prompt_data.empty()) return std::make_unique<TaskSource>(config);
  return std::make_unique<DataSource>(config);
}

}  // namespace lockstep::rl
