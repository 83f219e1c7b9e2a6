// Policy / KL / entropy / SFT losses: hand-checked cases and finite differences of the
// returned d loss / d logp.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "train/losses.h"

namespace lockstep {
namespace {

struct Case {
  std::vector<float> logp, old_logp, ref_logp, entropy, adv;
  SampleLossInput input(const std::vector<float>* lp) const {
    SampleLossInput in;
    in.logp = lp;
    in.old_logp = &old_logp;
    in.ref_logp = ref_logp.empty() ? nullptr : &ref_logp;
    in.entropy = entropy.empty() ? nullptr : &entropy;
    in.advantages = &adv;
    return in;
  }
};

// Central differences of metrics.loss against the analytic dlogp, token by token.
void check_finite_difference(const LossConfig& c, const LossNormalizer& n, const Case& k) {
  SampleLossResult r = sample_loss(c, n, k.input(&k.logp));
  for (size_t t = 0; t < k.logp.size(); ++t) {
    std::vector<float> up = k.logp, down = k.logp;
    up[t] += 1e-3f;
    down[t] -= 1e-3f;
    double step = double(up[t]) - double(down[t]);
    double fd = (sample_loss(c, n, k.input(&up)).metrics.loss - sample_loss(c, n, k.input(&down)).metrics.loss) / step;
    EXPECT_NEAR(r.dlogp[t], fd, 1e-4 + 1e-3 * std::fabs(fd)) << "token " << t;
  }
}

Case sample_case() {
  Case k;
  k.logp = {-1.0f, -0.5f, -2.0f, -0.1f, -3.0f};
  k.old_logp = {-1.1f, -0.45f, -2.5f, -0.1f, -2.0f};  // ratios ~1.105, 0.951, 1.65, 1, 2.7
  k.ref_logp = {-0.9f, -0.7f, -2.2f, -0.3f, -2.8f};
  k.entropy = {0.5f, 0.7f, 1.2f, 0.1f, 2.0f};
  k.adv = {0.8f, 0.8f, 0.8f, 0.8f, 0.8f};
  return k;
}

TEST(LossPolicy, HandCheckedClippedSurrogate) {
  LossConfig c;
  c.eps_clip = 0.2;
  c.eps_clip_high = 0.3;
  LossNormalizer n{1, 2};
  Case k;
  k.logp = {std::log(1.5f), std::log(0.9f)};
  k.old_logp = {0.0f, 0.0f};
  k.adv = {2.0f, -1.0f};
  SampleLossResult r = sample_loss(c, n, k.input(&k.logp));
  // Token 0: ratio 1.5 > 1.3 and A > 0: clipped, loss -2 * 1.3, no gradient.
  // Token 1: ratio 0.9 inside [0.8, 1.3]: loss 0.9, d/dlogp = -A * r = 0.9, weight 1/2.
  EXPECT_NEAR(r.metrics.pg_loss, 0.5 * (-2.6 + 0.9), 1e-6);
  EXPECT_NEAR(r.metrics.pg_clipfrac, 0.5, 1e-12);
  EXPECT_EQ(r.dlogp[0], 0.0f);
  EXPECT_NEAR(r.dlogp[1], 0.5 * 0.9, 1e-6);
  EXPECT_NEAR(r.metrics.ppo_kl, 0.5 * (-std::log(1.5) - std::log(0.9)), 1e-6);
}

TEST(LossPolicy, DualClipCapsNegativeAdvantageLoss) {
  LossConfig c;
  c.eps_clip_c = 3.0;
  LossNormalizer n{1, 1};
  Case k;
  k.logp = {std::log(5.0f)};
  k.old_logp = {0.0f};
  k.adv = {-1.0f};
  SampleLossResult r = sample_loss(c, n, k.input(&k.logp));
  EXPECT_NEAR(r.metrics.pg_loss, 3.0, 1e-6);  // min(-A * c, max(5, 1.2)) = 3
  EXPECT_EQ(r.dlogp[0], 0.0f);
  c.eps_clip_c = 0;
  r = sample_loss(c, n, k.input(&k.logp));
  EXPECT_NEAR(r.metrics.pg_loss, 5.0, 1e-5);
  EXPECT_NEAR(r.dlogp[0], 5.0, 1e-5);
}

TEST(LossPolicy, FiniteDifferencesEveryVariant) {
  for (auto agg : {LossAgg::token_mean, LossAgg::seq_mean_token_mean, LossAgg::seq_mean_token_sum})
    for (bool seq : {false, true})
      for (auto kl : {KlType::k1, KlType::k2, KlType::k3, KlType::low_var_kl}) {
        LossConfig c;
        c.agg = agg;
        c.sequence_ratio = seq;
        c.eps_clip = 0.2;
        c.eps_clip_high = 0.28;
        c.eps_clip_c = 3.0;
        c.kl_coef = 0.3;
        c.kl_type = kl;
        c.entropy_coef = 0.01;
        SCOPED_TRACE(testing::Message() << int(agg) << " seq=" << seq << " kl=" << int(kl));
        Case k = sample_case();
        check_finite_difference(c, {3, 12}, k);
        k.adv = {-0.5f, -0.5f, -0.5f, -0.5f, -0.5f};
        check_finite_difference(c, {3, 12}, k);
      }
}

TEST(LossPolicy, GspoUsesOneSequenceRatio) {
  LossConfig c;
  c.sequence_ratio = true;
  c.eps_clip = 10;  // no clipping
  c.eps_clip_high = 10;
  LossNormalizer n{1, 2};
  Case k;
  k.logp = {-1.0f, -3.0f};
  k.old_logp = {-1.5f, -2.5f};  // mean log ratio 0: ratio 1
  k.adv = {1.0f, 1.0f};
  SampleLossResult r = sample_loss(c, n, k.input(&k.logp));
  EXPECT_NEAR(r.metrics.pg_loss, -1.0, 1e-6);
  EXPECT_NEAR(r.dlogp[0], -0.5, 1e-6);  // d(-exp(mean))/dlogp_t = -1/2
  EXPECT_EQ(r.dlogp[0], r.dlogp[1]);
}

TEST(LossPolicy, KlEstimatorsHandChecked) {
  double x = 0.3;
  EXPECT_NEAR(kl_estimate(KlType::k1, x, 0).kl, 0.3, 1e-12);
  EXPECT_NEAR(kl_estimate(KlType::k2, x, 0).kl, 0.045, 1e-12);
  EXPECT_NEAR(kl_estimate(KlType::k3, x, 0).kl, std::exp(-0.3) - 1 + 0.3, 1e-12);
  EXPECT_EQ(kl_estimate(KlType::k3, 0.0, 0.0).kl, 0.0);
  auto clamped = kl_estimate(KlType::low_var_kl, -20.0, 0.0);
  EXPECT_EQ(clamped.kl, 10.0);
  EXPECT_EQ(clamped.dkl_dlogp, 0.0);
}

TEST(LossPolicy, EntropyBonusAndAggregationWeights) {
  LossConfig c;
  c.entropy_coef = 0.5;
  c.agg = LossAgg::seq_mean_token_mean;
  LossNormalizer n{2, 10};
  Case k = sample_case();
  SampleLossResult r = sample_loss(c, n, k.input(&k.logp));
  ASSERT_EQ(r.dentropy.size(), 5u);
  EXPECT_NEAR(r.dentropy[0], -0.5 / (2 * 5), 1e-9);
  EXPECT_NEAR(r.metrics.entropy_loss, (0.5 + 0.7 + 1.2 + 0.1 + 2.0) / 10.0, 1e-6);
  EXPECT_DOUBLE_EQ(token_weight(LossAgg::token_mean, n, 5), 0.1);
  EXPECT_DOUBLE_EQ(token_weight(LossAgg::seq_mean_token_sum, n, 5), 0.5);
}

TEST(LossSft, NegativeMeanLogLikelihood) {
  LossConfig c;
  c.type = LossType::sft_loss;
  LossNormalizer n{1, 4};
  std::vector<float> lp = {-1, -2, -3, -4};
  SampleLossInput in;
  in.logp = &lp;
  SampleLossResult r = sample_loss(c, n, in);
  EXPECT_NEAR(r.metrics.loss, 2.5, 1e-12);
  for (float d : r.dlogp) EXPECT_EQ(d, -0.25f);
}

TEST(LossPolicy, BadInputIsAnError) {
  LossConfig c;
  c.kl_coef = 0.1;
  Case k = sample_case();
  k.ref_logp.clear();
  EXPECT_THROW(sample_loss(c, {1, 5}, k.input(&k.logp)), Error);
  EXPECT_THROW(loss_agg_from_name("mean"), Error);
  EXPECT_THROW(kl_type_from_name("k4"), Error);
}

}  // namespace
}  // namespace lockstep
