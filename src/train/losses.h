// RL and SFT losses over response tokens. Each loss returns, per token, d loss / d logp and
// d loss / d entropy: the upstream gradient the model backward consumes. Loss normalisers
// (token counts, sample counts) are those of the whole global batch, so cutting the batch
// into micro-batches never changes a number (docs/numerics.md, rules 8 and 11).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace lockstep {

enum class LossType { policy_loss, sft_loss };
enum class LossAgg { token_mean, seq_mean_token_mean, seq_mean_token_sum };
enum class KlType { k1, k2, k3, low_var_kl };

LossType loss_type_from_name(const std::string& name);  // policy_loss | sft_loss
LossAgg loss_agg_from_name(const std::string& name);    // token_mean | seq_mean_token_mean | seq_mean_token_sum
KlType kl_type_from_name(const std::string& name);      // k1 | k2 | k3 | low_var_kl

struct LossConfig {
  LossType type = LossType::policy_loss;
  LossAgg agg = LossAgg::token_mean;
  double eps_clip = 0.2;       // ratio lower bound 1 - eps_clip
  double eps_clip_high = 0.2;  // ratio upper bound 1 + eps_clip_high
  double eps_clip_c = 0.0;     // dual clip (> 1 enables): negative-advantage loss capped at -A * c
  bool sequence_ratio = false;  // GSPO: one ratio per sample, exp(mean over tokens of logp - old_logp)
  double kl_coef = 0.0;
  KlType kl_type = KlType::low_var_kl;
  double entropy_coef = 0.0;
};

// Counts over the global batch that define the aggregation weights.
struct LossNormalizer {
  int64_t num_samples = 0;
  int64_t num_tokens = 0;  // response tokens over all samples
};

// The aggregation weight of each token of a sample with `length` response tokens.
double token_weight(LossAgg agg, const LossNormalizer& n, int64_t length);

// One sample's inputs, all over its response tokens (same length).
struct SampleLossInput {
  const std::vector<float>* logp = nullptr;        // current policy
  const std::vector<float>* old_logp = nullptr;    // behaviour policy (policy loss)
  const std::vector<float>* ref_logp = nullptr;    // reference model (needed when kl_coef != 0)
  const std::vector<float>* entropy = nullptr;     // per-token entropy (optional: metric / bonus)
  const std::vector<float>* advantages = nullptr;  // per token (policy loss)
};

// This sample's weighted share of each metric: summing over the samples of the global batch
// gives the batch value (e.g. pg_loss = sum over samples and tokens of weight * token loss).
struct LossMetrics {
  double loss = 0, pg_loss = 0, pg_clipfrac = 0, ppo_kl = 0, kl_loss = 0, entropy_loss = 0;
  void add(const LossMetrics& o);
};

struct SampleLossResult {
  std::vector<float> dlogp;     // d loss / d logp per response token
  std::vector<float> dentropy;  // d loss / d entropy per token (empty when entropy_coef == 0)
  LossMetrics metrics;
};

SampleLossResult sample_loss(const LossConfig& config, const LossNormalizer& norm, const SampleLossInput& in);

// The per-token KL estimate and its derivative with respect to logp (x = logp - ref_logp).
struct KlValue {
  double kl, dkl_dlogp;
};
KlValue kl_estimate(KlType type, double logp, double ref_logp);

}  // namespace lockstep
