// Linear kernels against a plain float64 reference, and the canonical row form against
// simulated tensor-parallel splits (docs/numerics.md, rule 1).
#include <gtest/gtest.h>

#include <cmath>

#include "core/thread_pool.h"
#include "kernels/canonical.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/linear.h"
#include "random.h"

namespace lockstep {
namespace {

using testing::max_rel_err;
using testing::random_vector;
using testing::same_bits;

std::vector<double> reference_linear(const std::vector<float>& x, const std::vector<float>& w, int64_t T, int64_t N,
                                     int64_t K) {
  std::vector<double> y(T * N);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(x[t * K + k]) * double(w[n * K + k]);
      y[t * N + n] = s;
    }
  return y;
}

struct Shape3 {
  int64_t T, N, K;
};

class LinearShapes : public ::testing::TestWithParam<Shape3> {};

TEST_P(LinearShapes, ColumnAndRowFormsMatchReference) {
  auto [T, N, K] = GetParam();
  auto x = random_vector(T * K, 1), w = random_vector(N * K, 2);
  auto ref = reference_linear(x, w, T, N, K);
  std::vector<float> y(T * N), yr(T * N);
  cpu::linear(x.data(), w.data(), y.data(), T, N, K);
  cpu::linear_row(x.data(), w.data(), yr.data(), T, N, K);
  EXPECT_LT(max_rel_err(y, ref), 1e-5);
  EXPECT_LT(max_rel_err(yr, ref), 1e-5);
}

TEST_P(LinearShapes, EveryRowIsIndependentOfTheBatch) {
  auto [T, N, K] = GetParam();
  auto x = random_vector(T * K, 3), w = random_vector(N * K, 4);
  std::vector<float> full(T * N), full_row(T * N);
  cpu::linear(x.data(), w.data(), full.data(), T, N, K);
  cpu::linear_row(x.data(), w.data(), full_row.data(), T, N, K);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<float> one(N), one_row(N);
    cpu::linear(x.data() + t * K, w.data(), one.data(), 1, N, K);
    cpu::linear_row(x.data() + t * K, w.data(), one_row.data(), 1, N, K);
    ASSERT_TRUE(same_bits(one, std::vector<float>(full.begin() + t * N, full.begin() + (t + 1) * N))) << "row " << t;
    ASSERT_TRUE(same_bits(one_row, std::vector<float>(full_row.begin() + t * N, full_row.begin() + (t + 1) * N)));
  }
}

TEST_P(LinearShapes, ThreadCountChangesNoBit) {
  auto [T, N, K] = GetParam();
  auto x = random_vector(T * K, 5), w = random_vector(N * K, 6);
  std::vector<std::vector<float>> outs;
  for (int threads : {1, 2, 3, 5}) {
    set_num_threads(threads);
    std::vector<float> y(T * N), yr(T * N);
    cpu::linear(x.data(), w.data(), y.data(), T, N, K);
    cpu::linear_row(x.data(), w.data(), yr.data(), T, N, K);
    y.insert(y.end(), yr.begin(), yr.end());
    outs.push_back(y);
  }
  set_num_threads(2);
  for (size_t i = 1; i < outs.size(); ++i) EXPECT_TRUE(same_bits(outs[0], outs[i]));
}

// Split K over 2, 4 and 8 simulated ranks at canonical chunk boundaries; each rank computes
// its subtree over its chunks; the cross-rank step sums the rank partials by the pairwise
// tree in rank order. The result must be the single-rank bits.
TEST_P(LinearShapes, RowFormEqualsSimulatedTensorParallelSplits) {
  auto [T, N, K] = GetParam();
  auto x = random_vector(T * K, 7), w = random_vector(N * K, 8);
  std::vector<float> single(T * N);
  cpu::linear_row(x.data(), w.data(), single.data(), T, N, K);
  const int64_t chunk = canonical_chunk(K);
  for (int ranks : {2, 4, 8}) {
    const int per_rank = kTMax / ranks;
    std::vector<std::vector<float>> partials(ranks);
    for (int r = 0; r < ranks; ++r) {
      int64_t k0 = std::min<int64_t>(K, r * per_rank * chunk);
      int64_t k1 = std::min<int64_t>(K, (r + 1) * per_rank * chunk);
      int64_t local = k1 - k0;
      // The rank's shard: columns [k0, k1) of x and w.
      std::vector<float> xs(T * std::max<int64_t>(local, 1)), ws(N * std::max<int64_t>(local, 1));
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = 0; k < local; ++k) xs[t * local + k] = x[t * K + k0 + k];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < local; ++k) ws[n * local + k] = w[n * K + k0 + k];
      partials[r].assign(T * N, 0.0f);
      if (local > 0)
        cpu::linear_row_canonical(xs.data(), ws.data(), partials[r].data(), T, N, local, chunk, per_rank);
    }
    std::vector<float> combined(T * N);
    std::vector<float> gathered(ranks);
    for (int64_t i = 0; i < T * N; ++i) {
      for (int r = 0; r < ranks; ++r) gathered[r] = partials[r][i];
      combined[i] = pairwise_tree(gathered.data(), ranks);
    }
    EXPECT_TRUE(same_bits(single, combined)) << "TP" << ranks;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, LinearShapes,
                         ::testing::Values(Shape3{1, 8, 64}, Shape3{5, 13, 37}, Shape3{9, 64, 128}, Shape3{3, 7, 6},
                                           Shape3{17, 33, 100}));

TEST(Dot, TailIsZeroPaddedLanes) {
  auto a = random_vector(13, 9), b = random_vector(13, 10);
  std::vector<float> ap(16, 0.0f), bp(16, 0.0f);
  std::copy(a.begin(), a.end(), ap.begin());
  std::copy(b.begin(), b.end(), bp.begin());
  float x = cpu::dot(a.data(), b.data(), 13), y = cpu::dot(ap.data(), bp.data(), 16);
  EXPECT_EQ(std::memcmp(&x, &y, 4), 0);
}

}  // namespace
}  // namespace lockstep
