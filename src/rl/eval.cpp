#include "rl/eval.h"

#include <filesystem>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/philox.h"

namespace lockstep::rl {

namespace {
constexpr uint64_t kEvalSamplingKey = 0x6576616c;  // separates eval sampling from the rollout's
}  // namespace

std::vector<std::pair<std::string, std::string>> parse_eval_prompt_data(const std::string& value) {
  std::istringstream in(value);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  LS_CHECK(words.size() % 2 == 0, "--eval-prompt-data: expected pairs NAME FILE, got ", words.size(), " words in '",
           value, "'");
  std::vector<std::pair<std::string, std::string>> out;
  std::set<std::string> names;
  for (size_t i = 0; i < words.size(); i += 2) {
    LS_CHECK(names.insert(words[i]).second, "--eval-prompt-data: the name '", words[i], "' is given twice");
    LS_CHECK(words[i].find('/') == std::string::npos, "--eval-prompt-data: the name '", words[i],
             "' must not contain '/' (it becomes the metric eval/NAME)");
    out.emplace_back(words[i], words[i + 1]);
  }
  return out;
}

double pass_at_k(int64_t n, int64_t c, int64_t k) {
  if (n - c < k) return 1.0;
  double fail = 1.0;  // C(n-c, k) / C(n, k) as a product, exact enough and overflow-free
  for (int64_t i = n - c + 1; i <= n; ++i) fail *= 1.0 - double(k) / double(i);
  return 1.0 - fail;
}

Evaluator::Evaluator(const TrainConfig& config, const PromptDataOptions& options, const Tokenizer& tokenizer)
    : cfg_(config), tokenizer_(tokenizer) {
  for (const auto& [name, path] : parse_eval_prompt_data(config.eval_prompt_data))
    sets_.push_back({name, load_prompt_dataset(path, options, tokenizer)});
}

bool Evaluator::due(int64_t step) const {
  if (!enabled()) return false;
  return step == 0 || step == cfg_.num_rollout || (cfg_.eval_interval > 0 && step % cfg_.eval_interval == 0);
}

int64_t Evaluator::max_prompt_len() const {
  int64_t longest = 0;
  for (const auto& set : sets_)
    for (const auto& s : set.data.samples) longest = std::max(longest, int64_t(s.prompt_ids.size()));
  return longest;
}

int64_t Evaluator::max_sequence_len() const {
  if (!enabled()) return 0;
  return max_prompt_len() +
         (cfg_.eval_max_response_len > 0 ? cfg_.eval_max_response_len : cfg_.rollout_max_response_len);
}

nlohmann::json Evaluator::run(int64_t step, uint64_t seed, const StopsFn& set_stops, const GenerateFn& generate,
                              const ScoreFn& score) const {
  const int64_t n = cfg_.n_samples_per_eval_prompt;
  std::vector<std::optional<rollout::GenerationRequest>> requests;
  std::vector<RewardRequest> scored;
  for (const auto& set : sets_)
    for (const auto& s : set.data.samples)
      for (int64_t k = 0; k < n; ++k) {
        rollout::GenerationRequest req;
        req.prompt = s.prompt_ids;
        req.max_new_tokens =
            cfg_.eval_max_response_len > 0 ? cfg_.eval_max_response_len : cfg_.rollout_max_response_len;
        set_stops(req);
        req.sampling.temperature = float(cfg_.eval_temperature);
        req.sampling.top_k = int32_t(cfg_.rollout_top_k);
        req.sampling.top_p = float(cfg_.eval_top_p);
        req.sampling.seed = mix_seed(mix_seed(seed ^ kEvalSamplingKey, uint64_t(step)), uint64_t(requests.size()));
        requests.push_back(std::move(req));
        scored.push_back({s.prompt, "", s.label, s.metadata});
      }
  auto outcomes = generate(requests);
  std::vector<int64_t> lengths;
  std::vector<bool> truncated;
  for (size_t i = 0; i < outcomes.size(); ++i) {
    LS_CHECK(outcomes[i].error.empty(), "evaluation at step ", step, ": request ", i,
             " was refused: ", outcomes[i].error);
    scored[i].response = decode_sampled(tokenizer_, outcomes[i].result.output_ids, true);
    lengths.push_back(int64_t(outcomes[i].result.output_ids.size()));
    truncated.push_back(outcomes[i].result.finish_reason == rollout::FinishReason::length);
  }
  const std::vector<float> rewards = score(scored);
  nlohmann::json m = {{"step", step}};
  size_t i = 0;
  for (const auto& set : sets_) {
    double reward_sum = 0, pass1 = 0, pass_n = 0, length_sum = 0, truncated_sum = 0;
    for (size_t p = 0; p < set.data.samples.size(); ++p) {
      int64_t passed = 0;
      for (int64_t k = 0; k < n; ++k, ++i) {
        reward_sum += rewards[i];
        passed += rewards[i] > 0;
        length_sum += double(lengths[i]);
        truncated_sum += truncated[i];
      }
      pass1 += pass_at_k(n, passed, 1);
      pass_n += pass_at_k(n, passed, n);
    }
    const double prompts = double(set.data.samples.size()), samples = prompts * double(n);
    const std::string key = "eval/" + set.name;
    m[key] = reward_sum / samples;
    m[key + "/pass@1"] = pass1 / prompts;
    if (n > 1) m[key + "/pass@" + std::to_string(n)] = pass_n / prompts;
    m[key + "/response_lengths"] = length_sum / samples;
    m[key + "/truncated"] = truncated_sum / samples;
    m[key + "/skipped_long_prompts"] = set.data.skipped_too_long;
  }
  return m;
}

}  // namespace lockstep::rl
