#include "rl/eval.h"

#include <filesystem>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/philox.h"
#include "rl/environment.h"

namespace lockstep::rl {

namespace {

constexpr uint64_t kEvalSamplingKey = 0x6576616c;  // separates eval sampling from the rollout's

// The eval sets as an environment sees them: an episode's position indexes the eval prompts
// (every set's, in order), and final answers get the run's reward with that prompt's label.
class EvalSetData : public EpisodeData {
 public:
  EvalSetData(const Tokenizer& tokenizer, const ScoreFn& score) : tokenizer_(tokenizer), score_(score) {}
  int64_t add(const PromptSample& sample) {
    samples_.push_back(&sample);
    return int64_t(samples_.size()) - 1;
  }
  std::vector<float> rewards(const std::vector<int64_t>& positions, const std::vector<TaskExample>&,
                             const std::vector<std::vector<int32_t>>& responses) override {
    std::vector<RewardRequest> requests;
    for (size_t i = 0; i < responses.size(); ++i) {
      const PromptSample& s = *data_sample(positions[i]);
      requests.push_back({s.prompt, decode_sampled(tokenizer_, responses[i], true), s.label, s.metadata});
    }
    return score_(requests);
  }
  const PromptSample* data_sample(int64_t position) override { return samples_.at(size_t(position)); }
  const Tokenizer* tokenizer() const override { return &tokenizer_; }

 private:
  const Tokenizer& tokenizer_;
  const ScoreFn& score_;
  std::vector<const PromptSample*> samples_;
};

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
                              const ScoreFn& score, dist::Communicator* world) const {
  const int64_t n = cfg_.n_samples_per_eval_prompt;
  const int64_t budget = cfg_.eval_max_response_len > 0 ? cfg_.eval_max_response_len : cfg_.rollout_max_response_len;
  EvalSetData data(tokenizer_, score);
  std::vector<rollout::GenerationRequest> requests;
  std::vector<Episode> episodes;
  for (const auto& set : sets_)
    for (const auto& s : set.data.samples) {
      const int64_t position = data.add(s);
      for (int64_t k = 0; k < n; ++k) {
        rollout::GenerationRequest req;
        req.prompt = s.prompt_ids;
        req.max_new_tokens = budget;
        set_stops(req);
        req.sampling.temperature = float(cfg_.eval_temperature);
        req.sampling.top_k = int32_t(cfg_.rollout_top_k);
        req.sampling.top_p = float(cfg_.eval_top_p);
        req.sampling.seed = mix_seed(mix_seed(seed ^ kEvalSamplingKey, uint64_t(step)), uint64_t(requests.size()));
        requests.push_back(std::move(req));
        Episode e;
        e.position = position;
        e.example.prompt = s.prompt_ids;
        episodes.push_back(std::move(e));
      }
    }
  const std::unique_ptr<Environment> env = make_environment(cfg_, data, world);
  EpisodeLimits limits;
  limits.max_turns = cfg_.rollout_max_turns;
  limits.max_response_len = budget;
  limits.max_turn_len = cfg_.rollout_max_turn_len;
  run_episodes(episodes, requests, *env, generate, limits, step, "evaluation at step");

  const bool multi_turn = !cfg_.rollout_tool.empty() || !cfg_.rollout_env_url.empty();
  nlohmann::json m = {{"step", step}};
  size_t i = 0;
  for (const auto& set : sets_) {
    double reward_sum = 0, pass1 = 0, pass_n = 0, length_sum = 0, truncated_sum = 0, turns_sum = 0;
    for (size_t p = 0; p < set.data.samples.size(); ++p) {
      int64_t passed = 0;
      for (int64_t k = 0; k < n; ++k, ++i) {
        const Episode& e = episodes[i];
        reward_sum += e.reward;
        passed += e.reward > 0;
        length_sum += double(e.response.size());
        truncated_sum += e.truncated;
        turns_sum += double(e.policy_turns);
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
    if (multi_turn) m[key + "/turns"] = turns_sum / samples;
    m[key + "/skipped_long_prompts"] = set.data.skipped_too_long;
  }
  return m;
}

}  // namespace lockstep::rl
