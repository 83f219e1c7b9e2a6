// RMSNorm, RoPE, SwiGLU, log-softmax and sampling against plain references.
#include <gtest/gtest.h>

#include <cmath>
#include <map>

#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/sampling.h"
#include "random.h"

namespace lockstep {
namespace {

using testing::max_rel_err;
using testing::random_vector;
using testing::same_bits;

TEST(RmsNorm, MatchesReference) {
  const int64_t rows = 7, n = 45;
  auto x = random_vector(rows * n, 1, 3.0f), w = random_vector(n, 2);
  std::vector<float> out(rows * n);
  cpu::rmsnorm(x.data(), w.data(), out.data(), rows, n, 1e-6f, false);
  std::vector<double> ref(rows * n);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[r * n + i]) * x[r * n + i];
    double inv = 1.0 / std::sqrt(ss / n + 1e-6);
    for (int64_t i = 0; i < n; ++i) ref[r * n + i] = w[i] * x[r * n + i] * inv;
  }
  EXPECT_LT(max_rel_err(out, ref), 1e-6);
}

TEST(RmsNorm, Bf16RecipeRoundsTheNormalisedRow) {
  const int64_t n = 16;
  auto x = random_vector(n, 3), w = random_vector(n, 4);
  std::vector<float> a(n), b(n);
  cpu::rmsnorm(x.data(), w.data(), a.data(), 1, n, 1e-6f, true);
  cpu::rmsnorm(x.data(), w.data(), b.data(), 1, n, 1e-6f, false);
  EXPECT_FALSE(same_bits(a, b));
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(a[i], b[i], 1e-2 * std::abs(b[i]) + 1e-6);
}

TEST(Rope, MatchesRotateHalfReference) {
  const int64_t T = 5, heads = 3, d = 8;
  auto table = cpu::RopeTable::build(d, 1000, 10000.0);
  auto x = random_vector(T * heads * d, 5);
  std::vector<int32_t> pos = {0, 1, 17, 500, 999};
  auto y = x;
  cpu::rope(y.data(), pos.data(), T, heads, table);
  std::vector<double> ref(x.size());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < d / 2; ++i) {
        double ang = pos[t] * std::pow(10000.0, -2.0 * i / d);
        const float* v = x.data() + (t * heads + h) * d;
        ref[(t * heads + h) * d + i] = v[i] * std::cos(ang) - v[i + d / 2] * std::sin(ang);
        ref[(t * heads + h) * d + i + d / 2] = v[i + d / 2] * std::cos(ang) + v[i] * std::sin(ang);
      }
  EXPECT_LT(max_rel_err(y, ref), 1e-6);
  EXPECT_TRUE(same_bits(std::vector<float>(y.begin(), y.begin() + heads * d),
                        std::vector<float>(x.begin(), x.begin() + heads * d)));  // position 0 is identity
}

TEST(SwiGlu, MatchesReference) {
  auto g = random_vector(33, 6, 4.0f), u = random_vector(33, 7);
  std::vector<float> out(33);
  cpu::swiglu(g.data(), u.data(), out.data(), 33);
  std::vector<double> ref(33);
  for (int i = 0; i < 33; ++i) ref[i] = g[i] / (1.0 + std::exp(-double(g[i]))) * u[i];
  EXPECT_LT(max_rel_err(out, ref), 1e-6);
}

TEST(LogSoftmax, MatchesReferenceAndHandlesPaddedVocab) {
  for (int64_t V : {1, 5, 64, 509}) {
    auto x = random_vector(2 * V, 8, 10.0f);
    std::vector<int32_t> targets = {0, int32_t(V - 1)};
    std::vector<float> out(2);
    cpu::log_softmax_gather(x.data(), targets.data(), out.data(), 2, V);
    for (int r = 0; r < 2; ++r) {
      double m = -1e30, s = 0;
      for (int64_t v = 0; v < V; ++v) m = std::max(m, double(x[r * V + v]));
      for (int64_t v = 0; v < V; ++v) s += std::exp(double(x[r * V + v]) - m);
      double ref = x[r * V + targets[r]] - m - std::log(s);
      EXPECT_NEAR(out[r], ref, 1e-5) << "V=" << V;
    }
  }
}

// A vocab-parallel split: each of R ranks holds 8/R canonical chunks and computes its
// subtree; combining the rank partials by the pairwise tree gives the single-rank bits.
TEST(LogSoftmax, VocabParallelSubtreesGiveTheSameBits) {
  const int64_t V = 1003;
  auto x = random_vector(V, 9, 8.0f);
  float single = cpu::log_normalizer(x.data(), V);
  const int64_t chunk = canonical_chunk(V);
  for (int ranks : {2, 4, 8}) {
    int per = kTMax / ranks;
    std::vector<MaxSum> parts;
    for (int r = 0; r < ranks; ++r) {
      int64_t v0 = std::min(V, r * per * chunk), v1 = std::min(V, (r + 1) * per * chunk);
      parts.push_back(cpu::vocab_subtree(x.data() + v0, v1 - v0, chunk, per));
    }
    MaxSum all = pairwise_tree_maxsum(parts.data(), ranks);
    float z = all.max + std::log(all.sum);
    EXPECT_EQ(std::memcmp(&z, &single, 4), 0) << ranks << " ranks";
  }
}

TEST(Sampling, GreedyTakesArgmaxWithTiesToLowerId) {
  std::vector<float> logits = {0.5f, 2.0f, 2.0f, -1.0f};
  auto c = cpu::sample_row(logits.data(), 4, 0.0f, 0, 1.0f, 0.99f);
  EXPECT_EQ(c.token, 1);
  EXPECT_NEAR(c.logprob, 2.0 - std::log(std::exp(0.5) + 2 * std::exp(2.0) + std::exp(-1.0)), 1e-6);
}

TEST(Sampling, TopKAndTopPRestrictTheSupportAndLogprobIsUntruncated) {
  auto logits = random_vector(50, 10, 3.0f);
  std::map<int32_t, int> seen;
  for (int i = 0; i < 400; ++i) {
    float u = philox_uniform(42, 0, uint64_t(i));
    auto c = cpu::sample_row(logits.data(), 50, 1.0f, 3, 1.0f, u);
    seen[c.token]++;
    float z = cpu::log_normalizer(logits.data(), 50);
    EXPECT_EQ(c.logprob, logits[c.token] - z);
  }
  EXPECT_EQ(seen.size(), 3u);
  // top_p tiny keeps only the most likely token.
  auto c = cpu::sample_row(logits.data(), 50, 1.0f, 0, 1e-6f, 0.7f);
  int best = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  EXPECT_EQ(c.token, best);
}

TEST(Sampling, FrequenciesFollowTheDistribution) {
  std::vector<float> logits = {0.0f, std::log(3.0f)};  // p = 0.25, 0.75
  int ones = 0, n = 4000;
  for (int i = 0; i < n; ++i) ones += cpu::sample_row(logits.data(), 2, 1.0f, 0, 1.0f, philox_uniform(1, 2, i)).token;
  EXPECT_NEAR(double(ones) / n, 0.75, 0.03);
}

}  // namespace
}  // namespace lockstep
