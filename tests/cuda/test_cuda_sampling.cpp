// Sampling on the GPU (several blocks per row): the log-prob has the bits of the score
// path's canonical log-softmax, a row's draw does not depend on the other rows, the greedy
// token is the first arg max, and the drawn token is where the cumulative probability
// crosses u (checked against float64). The log-softmax of the draw (what top log-probs are
// picked from) against its plain reference.
#include <algorithm>
#include <cmath>

#include "cuda_test_util.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/ops.h"

namespace lockstep {
namespace {

using testing::DeviceVec;

struct Drawn {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
};

Drawn sample(const std::vector<float>& logits, const std::vector<cuda::DeviceSampleParams>& params, int64_t V) {
  const int64_t R = int64_t(params.size());
  DeviceVec<float> L(logits), lp(R), ws(cuda::sample_workspace_floats(R));
  DeviceVec<int32_t> tok(R);
  DeviceVec<cuda::DeviceSampleParams> P(params);
  tok.poison();
  lp.poison();
  ws.poison();
  cuda::sample_rows(L.get(), P.get(), tok.get(), lp.get(), R, V, ws.get(), nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return {tok.take(), lp.take()};
}

std::vector<float> score(const std::vector<float>& logits, const std::vector<int32_t>& targets, int64_t V) {
  const int64_t R = int64_t(targets.size());
  DeviceVec<float> L(logits), out(R);
  DeviceVec<int32_t> T(targets);
  cuda::log_softmax_gather(L.get(), T.get(), out.get(), R, V, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return out.take();
}

std::vector<float> random_logits(int64_t R, int64_t V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> x(size_t(R * V));
  for (auto& v : x) v = d(rng);
  return x;
}

void check_vocab(int64_t V) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t R = 6;
  auto logits = random_logits(R, V, uint64_t(V));
  // Row 1: a tie at the maximum (the lower id must win the greedy pick).
  float top = -1e30f;
  for (int64_t v = 0; v < V; ++v) top = std::max(top, logits[size_t(V + v)]);
  logits[size_t(V + V / 3)] = top + 1.0f;
  logits[size_t(V + V / 2)] = top + 1.0f;
  std::vector<cuda::DeviceSampleParams> params = {
      {1.0f, 0.25f, -1}, {0.0f, 0.5f, -1}, {0.7f, 0.9f, -1}, {1.0f, 0.999f, -1}, {1.3f, 0.0f, -1}, {0.8f, 0.5f, 17}};
  auto all = sample(logits, params, V);

  // Each row alone gives the same bits.
  for (int64_t r = 0; r < R; ++r) {
    std::vector<float> row(logits.begin() + r * V, logits.begin() + (r + 1) * V);
    auto one = sample(row, {params[size_t(r)]}, V);
    EXPECT_EQ(one.tokens[0], all.tokens[size_t(r)]) << "row " << r;
    EXPECT_EQ(std::memcmp(&one.logprobs[0], &all.logprobs[size_t(r)], 4), 0) << "row " << r;
  }
  // Temperature 1 and greedy: the log-prob is the score path's, bit for bit.
  auto scored = score(logits, all.tokens, V);
  for (int64_t r : {0, 1, 3}) EXPECT_EQ(std::memcmp(&scored[size_t(r)], &all.logprobs[size_t(r)], 4), 0) << "row " << r;
  EXPECT_EQ(all.tokens[1], int32_t(V / 3));
  EXPECT_EQ(all.tokens[5], 17);

  // The draw against float64: the picked token's cumulative interval holds u (up to rounding).
  for (int64_t r : {0, 2, 3, 4, 5}) {
    const float temp = params[size_t(r)].temperature;
    const float* x = &logits[size_t(r * V)];
    double m = -1e300, mass = 0;
    for (int64_t v = 0; v < V; ++v) m = std::max(m, double(x[v]) / temp);
    for (int64_t v = 0; v < V; ++v) mass += std::exp(double(x[v]) / temp - m);
    const int32_t t = all.tokens[size_t(r)];
    ASSERT_GE(t, 0);
    ASSERT_LT(t, V);
    const double want_lp = double(x[t]) / temp - m - std::log(mass);
    EXPECT_NEAR(all.logprobs[size_t(r)], want_lp, 1e-4 * (1 + std::abs(want_lp))) << "row " << r;
    if (params[size_t(r)].forced >= 0) continue;
    double before = 0;
    for (int64_t v = 0; v < t; ++v) before += std::exp(double(x[v]) / temp - m) / mass;
    const double after = before + std::exp(double(x[t]) / temp - m) / mass;
    const double u = params[size_t(r)].u;
    EXPECT_LE(before, u + 1e-4) << "row " << r << " token " << t;
    EXPECT_GE(after, u - 1e-4) << "row " << r << " token " << t;
  }
}

// sampled_log_softmax_rows against its plain reference: x / T - log_z on the host, with log_z the
// canonical log-normaliser (log_normalizer_rows) of the row divided by T on the host; the drawn
// token's entry is its log-prob and, at T = 1 and greedy, every entry is the score path's.
void check_sampled_log_softmax(int64_t V) {
  LS_SKIP_WITHOUT_GPU();
  auto logits = random_logits(4, V, uint64_t(V) + 1);
  std::vector<cuda::DeviceSampleParams> params = {{1.0f, 0.3f, -1}, {0.0f, 0.5f, -1}, {0.7f, 0.6f, -1}, {1.3f, 0.1f, 5}};
  const int64_t R = int64_t(params.size());
  DeviceVec<float> L(logits), lp(R), ws(cuda::sample_workspace_floats(R));
  DeviceVec<int32_t> tok(R);
  DeviceVec<cuda::DeviceSampleParams> P(params);
  cuda::sample_rows(L.get(), P.get(), tok.get(), lp.get(), R, V, ws.get(), nullptr);
  cuda::sampled_log_softmax_rows(L.get(), P.get(), ws.get(), R, V, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto got = L.take(), drawn = lp.take();
  const auto tokens = tok.take();

  std::vector<float> divided = logits;
  for (int64_t r = 0; r < R; ++r)
    if (params[size_t(r)].temperature != 0.0f)
      for (int64_t v = 0; v < V; ++v) divided[size_t(r * V + v)] = logits[size_t(r * V + v)] / params[size_t(r)].temperature;
  DeviceVec<float> D(divided), lse(R);
  cuda::log_normalizer_rows(D.get(), lse.get(), R, V, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto log_z = lse.take();
  std::vector<float> want(got.size());
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < V; ++v) want[size_t(r * V + v)] = divided[size_t(r * V + v)] - log_z[size_t(r)];
  EXPECT_TRUE(testing::same_bits_f(got, want));

  for (int64_t r = 0; r < R; ++r)
    EXPECT_EQ(std::memcmp(&got[size_t(r * V + tokens[size_t(r)])], &drawn[size_t(r)], 4), 0) << "row " << r;
  EXPECT_EQ(tokens[3], 5);
  for (int64_t r : {0, 1}) {  // T = 1 and greedy: about 64 entries of the row against the score path
    std::vector<int32_t> targets;
    for (int64_t v = 0; v < V; v += std::max<int64_t>(1, V / 61)) targets.push_back(int32_t(v));
    std::vector<float> rows, want_row;
    for (int32_t v : targets) {
      rows.insert(rows.end(), logits.begin() + r * V, logits.begin() + (r + 1) * V);
      want_row.push_back(got[size_t(r * V + v)]);
    }
    EXPECT_TRUE(testing::same_bits_f(score(rows, targets, V), want_row)) << "row " << r;
  }
}

TEST(CudaSampling, LogSoftmaxOfTheDrawLargeVocabulary) { check_sampled_log_softmax(151936); }
TEST(CudaSampling, LogSoftmaxOfTheDrawSmallVocabulary) { check_sampled_log_softmax(37); }

TEST(CudaSampling, LargeVocabulary) { check_vocab(151936); }
TEST(CudaSampling, SmallVocabulary) { check_vocab(512); }
TEST(CudaSampling, TinyVocabulary) { check_vocab(37); }

}  // namespace
}  // namespace lockstep
