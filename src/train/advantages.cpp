#include "train/advantages.h"

#include <cmath>

#include "core/error.h"

namespace lockstep {

AdvantageEstimator advantage_estimator_from_name(const std::string& name) {
  if (name == "grpo") return AdvantageEstimator::grpo;
  if (name == "dr_grpo") return AdvantageEstimator::dr_grpo;
  if (name == "reinforce_plus_plus") return AdvantageEstimator::reinforce_plus_plus;
  if (name == "gspo") return AdvantageEstimator::gspo;
  fail("--advantage-estimator: expected 'grpo', 'dr_grpo', 'reinforce_plus_plus' or 'gspo', got '", name, "'");
}

const char* advantage_estimator_name(AdvantageEstimator e) {
  switch (e) {
    case AdvantageEstimator::grpo: return "grpo";
    case AdvantageEstimator::dr_grpo: return "dr_grpo";
    case AdvantageEstimator::reinforce_plus_plus: return "reinforce_plus_plus";
    case AdvantageEstimator::gspo: return "gspo";
  }
  return "?";
}

namespace {

struct MeanStd {
  double mean, std;
};

// Mean and sample standard deviation (n - 1 in the denominator; 0 when n < 2).
MeanStd mean_std(const std::vector<double>& x) {
  double sum = 0;
  for (double v : x) sum += v;
  const double mean = x.empty() ? 0.0 : sum / double(x.size());
  double sq = 0;
  for (double v : x) sq += (v - mean) * (v - mean);
  return {mean, x.size() < 2 ? 0.0 : std::sqrt(sq / double(x.size() - 1))};
}

}  // namespace

std::vector<std::vector<float>> compute_advantages(AdvantageEstimator e, const std::vector<float>& rewards,
                                                   const std::vector<int64_t>& lengths, int64_t group_size) {
  const int64_t n = int64_t(rewards.size());
  LS_CHECK(int64_t(lengths.size()) == n, "advantages: ", n, " rewards but ", lengths.size(), " response lengths");
  LS_CHECK(group_size > 0 && n % group_size == 0, "advantages: ", n, " samples do not form groups of ", group_size);
  std::vector<double> per_sample(n);
  if (e == AdvantageEstimator::reinforce_plus_plus) {
    std::vector<double> tokens;
    for (int64_t i = 0; i < n; ++i) tokens.insert(tokens.end(), size_t(lengths[i]), double(rewards[i]));
    MeanStd s = mean_std(tokens);
    for (int64_t i = 0; i < n; ++i) per_sample[i] = (double(rewards[i]) - s.mean) / (s.std + 1e-6);
  } else {
    for (int64_t g = 0; g < n; g += group_size) {
      std::vector<double> group(rewards.begin() + g, rewards.begin() + g + group_size);
      MeanStd s = mean_std(group);
      for (int64_t i = g; i < g + group_size; ++i) {
        double centred = double(rewards[i]) - s.mean;
        per_sample[i] = e == AdvantageEstimator::dr_grpo ? centred : centred / (s.std + 1e-6);
      }
    }
  }
  std::vector<std::vector<float>> out(n);
  for (int64_t i = 0; i < n; ++i) out[i].assign(size_t(lengths[i]), float(per_sample[i]));
  return out;
}

}  // namespace lockstep
