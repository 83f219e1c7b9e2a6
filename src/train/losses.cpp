#include "train/losses.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace lockstep {

LossType loss_type_from_name(const std::string& name) {
  if (name == "policy_loss") return LossType::policy_loss;
  if (name == "sft_loss") return LossType::sft_loss;
  fail("--loss-type: expected 'policy_loss' or 'sft_loss', got '", name, "'");
}

LossAgg loss_agg_from_name(const std::string& name) {
  if (name == "token_mean") return LossAgg::token_mean;
  if (name == "seq_mean_token_mean") return LossAgg::seq_mean_token_mean;
  if (name == "seq_mean_token_sum") return LossAgg::seq_mean_token_sum;
  fail("--loss-agg: expected 'token_mean', 'seq_mean_token_mean' or 'seq_mean_token_sum', got '", name, "'");
}

KlType kl_type_from_name(const std::string& name) {
  if (name == "k1") return KlType::k1;
  if (name == "k2") return KlType::k2;
  if (name == "k3") return KlType::k3;
  if (name == "low_var_kl") return KlType::low_var_kl;
  fail("--kl-loss-type: expected 'k1', 'k2', 'k3' or 'low_var_kl', got '", name, "'");
}

void LossMetrics::add(const LossMetrics& o) {
  loss += o.loss;
  pg_loss += o.pg_loss;
  pg_clipfrac += o.pg_clipfrac;
  ppo_kl += o.ppo_kl;
  kl_loss += o.kl_loss;
  entropy_loss += o.entropy_loss;
}

double token_weight(LossAgg agg, const LossNormalizer& n, int64_t length) {
  LS_CHECK(n.num_samples > 0 && n.num_tokens > 0, "loss: the global batch has no response tokens");
  switch (agg) {
    case LossAgg::token_mean: return 1.0 / double(n.num_tokens);
    case LossAgg::seq_mean_token_mean: return 1.0 / (double(n.num_samples) * double(std::max<int64_t>(length, 1)));
    case LossAgg::seq_mean_token_sum: return 1.0 / double(n.num_samples);
  }
  return 0;
}

KlValue kl_estimate(KlType type, double logp, double ref_logp) {
  const double x = logp - ref_logp;
  switch (type) {
    case KlType::k1: return {x, 1.0};
    case KlType::k2: return {0.5 * x * x, x};
    case KlType::k3: return {std::exp(-x) - 1.0 + x, 1.0 - std::exp(-x)};
    case KlType::low_var_kl: {
      // k3 clamped to [-10, 10] (bounded variance); no gradient where the clamp is active.
      double kl = std::exp(-x) - 1.0 + x;
      if (kl > 10.0) return {10.0, 0.0};
      return {kl, 1.0 - std::exp(-x)};
    }
  }
  return {0, 0};
}

namespace {

// Clipped surrogate of one token given log ratio `log_ratio` and advantage `a`: the loss and
// d loss / d log_ratio, and whether the first clip was active.
struct Surrogate {
  double loss, dloss_dlogratio;
  bool clipped;
};

Surrogate clipped_surrogate(const LossConfig& c, double log_ratio, double a) {
  const double r = std::exp(log_ratio);
  const double r_clip = std::clamp(r, 1.0 - c.eps_clip, 1.0 + c.eps_clip_high);
  const double unclipped = -a * r, clipped = -a * r_clip;
  Surrogate s;
  s.clipped = clipped > unclipped;
  s.loss = s.clipped ? clipped : unclipped;
  // The clipped branch is constant in r (when it wins, r is outside the range).
  s.dloss_dlogratio = s.clipped ? 0.0 : -a * r;
  if (c.eps_clip_c > 1.0 && a < 0) {
    const double cap = -a * c.eps_clip_c;
    if (cap < s.loss) {
      s.loss = cap;
      s.dloss_dlogratio = 0.0;
    }
  }
  return s;
}

}  // namespace

SampleLossResult sample_loss(const LossConfig& c, const LossNormalizer& norm, const SampleLossInput& in) {
  LS_CHECK(in.logp, "loss: logp is required");
  const std::vector<float>& logp = *in.logp;
  const int64_t n = int64_t(logp.size());
  auto check_len = [&](const std::vector<float>* v, const char* what) {
    LS_CHECK(v && int64_t(v->size()) == n, "loss: ", what, " must have one value per response token (", n, "), got ",
             v ? int64_t(v->size()) : int64_t(-1));
  };
  SampleLossResult out;
  out.dlogp.assign(n, 0.0f);
  if (n == 0) return out;
  const double w = token_weight(c.agg, norm, n);
  LossMetrics& m = out.metrics;
  std::vector<double> dlogp(n, 0.0);

  if (c.type == LossType::sft_loss) {
    for (int64_t t = 0; t < n; ++t) {
      m.pg_loss += w * -double(logp[t]);
      dlogp[t] = -w;
    }
  } else {
    check_len(in.old_logp, "old_logp");
    check_len(in.advantages, "advantages");
    const auto& old = *in.old_logp;
    const auto& adv = *in.advantages;
    for (int64_t t = 0; t < n; ++t) m.ppo_kl += w * (double(old[t]) - double(logp[t]));
    if (c.sequence_ratio) {
      // GSPO: the sample's log ratio is the mean of its token log ratios, so each token's
      // log-prob reaches every token's surrogate through that mean (a 1/n share).
      double sum = 0;
      for (int64_t t = 0; t < n; ++t) sum += double(logp[t]) - double(old[t]);
      const double seq_log_ratio = sum / double(n);
      double dseq = 0;
      for (int64_t t = 0; t < n; ++t) {
        Surrogate s = clipped_surrogate(c, seq_log_ratio, adv[t]);
        m.pg_loss += w * s.loss;
        m.pg_clipfrac += w * (s.clipped ? 1.0 : 0.0);
        dseq += w * s.dloss_dlogratio;
      }
      for (int64_t t = 0; t < n; ++t) dlogp[t] = dseq / double(n);
    } else {
      for (int64_t t = 0; t < n; ++t) {
        Surrogate s = clipped_surrogate(c, double(logp[t]) - double(old[t]), adv[t]);
        m.pg_loss += w * s.loss;
        m.pg_clipfrac += w * (s.clipped ? 1.0 : 0.0);
        dlogp[t] = w * s.dloss_dlogratio;
      }
    }
    if (c.kl_coef != 0.0) {
      check_len(in.ref_logp, "ref_logp");
      for (int64_t t = 0; t < n; ++t) {
        KlValue k = kl_estimate(c.kl_type, logp[t], (*in.ref_logp)[t]);
        m.kl_loss += w * k.kl;
        dlogp[t] += c.kl_coef * w * k.dkl_dlogp;
      }
    }
  }
  if (in.entropy) {
    check_len(in.entropy, "entropy");
    for (int64_t t = 0; t < n; ++t) m.entropy_loss += w * double((*in.entropy)[t]);
  }
  if (c.entropy_coef != 0.0) {
    LS_CHECK(in.entropy, "loss: --entropy-coef is set but no entropy was computed");
    out.dentropy.assign(n, float(-c.entropy_coef * w));
  }
  m.loss = m.pg_loss + c.kl_coef * m.kl_loss - c.entropy_coef * m.entropy_loss;
  for (int64_t t = 0; t < n; ++t) out.dlogp[t] = float(dlogp[t]);
  return out;
}

}  // namespace lockstep
