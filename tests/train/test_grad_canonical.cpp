// The canonical trees of the backward under simulated splits (docs/numerics.md, rule 1
// and 9): sequence-parallel ranks that each hold a power-of-two run of the 8 token chunks
// compute their subtree, and finishing the tree over ranks gives the single-rank bits; the
// same for tensor-parallel ranks splitting the N of a column-form linear's input gradient.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>

#include "core/thread_pool.h"
#include "kernels/canonical.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/reduce_backward.h"
#include "test_grad_helpers.h"

namespace lockstep {
namespace {

using testing::random_vector;
using testing::same_bits;

// Elementwise pairwise tree over the ranks' partials.
std::vector<float> finish_tree(const std::vector<std::vector<float>>& partials) {
  std::vector<float> out(partials[0].size());
  float parts[kTMax];
  for (size_t i = 0; i < out.size(); ++i) {
    for (size_t r = 0; r < partials.size(); ++r) parts[r] = partials[r][i];
    out[i] = pairwise_tree(parts, int(partials.size()));
  }
  return out;
}

// Weight gradient over `rows` rows whose chunk offsets are `chunks`, split over `ranks`
// sequence-parallel ranks: each rank sees only its own rows.
std::vector<float> weight_grad_split(const std::vector<float>& dy, const std::vector<float>& x, int64_t N, int64_t K,
                                     const cpu::TokenChunks& chunks, int ranks) {
  const int per = kTMax / ranks;
  std::vector<std::vector<float>> partials;
  for (int r = 0; r < ranks; ++r) {
    const int64_t first = chunks.rows[r * per], last = chunks.rows[(r + 1) * per];
    std::vector<float> my_dy(dy.begin() + first * N, dy.begin() + last * N);
    std::vector<float> my_x(x.begin() + first * K, x.begin() + last * K);
    int64_t local[kTMax + 1];
    for (int c = 0; c <= per; ++c) local[c] = chunks.rows[r * per + c] - first;
    std::vector<float> dW(N * K);
    cpu::linear_weight_grad_subtree(my_dy.data(), my_x.data(), dW.data(), N, K, local, per);
    partials.push_back(std::move(dW));
  }
  return finish_tree(partials);
}

TEST(GradCanonical, WeightGradSequenceParallelSplits) {
  const int64_t N = 12, K = 20;
  for (int64_t T : {101, 64, 13, 5}) {
    auto dy = random_vector(T * N, 60), x = random_vector(T * K, 61);
    std::vector<float> full(N * K);
    cpu::linear_weight_grad(dy.data(), x.data(), full.data(), N, K, cpu::token_chunks(T));
    for (int ranks : {1, 2, 4, 8})
      EXPECT_TRUE(same_bits(weight_grad_split(dy, x, N, K, cpu::token_chunks(T), ranks), full))
          << "T " << T << " ranks " << ranks;
  }
}

TEST(GradCanonical, ExpertWeightGradUsesStreamPositions) {
  // An expert's rows: a sorted subset of a 101-token stream. Each row's contribution lands in
  // the chunk of its token's stream position, so an SP split of the stream splits it too.
  const int64_t T = 101, N = 8, K = 16;
  std::vector<int32_t> tokens;
  for (int32_t t = 0; t < T; ++t)
    if ((t * 37) % 5 < 2) tokens.push_back(t);
  const int64_t R = int64_t(tokens.size());
  auto dy = random_vector(R * N, 62), x = random_vector(R * K, 63);
  cpu::TokenChunks chunks = cpu::token_chunks_of(tokens.data(), R, T);
  for (int c = 0; c < kTMax; ++c)
    for (int64_t i = chunks.rows[c]; i < chunks.rows[c + 1]; ++i) EXPECT_EQ(tokens[i] / canonical_chunk(T), c);
  std::vector<float> full(N * K);
  cpu::linear_weight_grad(dy.data(), x.data(), full.data(), N, K, chunks);
  for (int ranks : {2, 4, 8}) EXPECT_TRUE(same_bits(weight_grad_split(dy, x, N, K, chunks, ranks), full));
}

TEST(GradCanonical, ColumnSumSequenceParallelSplits) {
  // The norm weight gradient (sum over tokens of dy * normed), 3 rows (heads) per token.
  const int64_t T = 37, heads = 3, n = 16;
  auto a = random_vector(T * heads * n, 64), b = random_vector(T * heads * n, 65);
  cpu::TokenChunks chunks = cpu::token_chunks(T, heads);
  std::vector<float> full(n);
  cpu::column_sum_chunked(a.data(), b.data(), full.data(), n, chunks.rows, kTMax);
  for (int ranks : {2, 4, 8}) {
    const int per = kTMax / ranks;
    std::vector<std::vector<float>> partials;
    for (int r = 0; r < ranks; ++r) {
      const int64_t first = chunks.rows[r * per];
      int64_t local[kTMax + 1];
      for (int c = 0; c <= per; ++c) local[c] = chunks.rows[r * per + c] - first;
      std::vector<float> p(n);
      cpu::column_sum_chunked(a.data() + first * n, b.data() + first * n, p.data(), n, local, per);
      partials.push_back(p);
    }
    EXPECT_TRUE(same_bits(finish_tree(partials), full)) << ranks;
  }
}

TEST(GradCanonical, ColumnLinearInputGradTensorParallelSplits) {
  const int64_t T = 9, K = 24;
  for (int64_t N : {64, 50, 7}) {
    auto dy = random_vector(T * N, 66), w = random_vector(N * K, 67);
    std::vector<float> full(T * K);
    cpu::linear_input_grad(dy.data(), w.data(), full.data(), T, N, K);
    const int64_t chunk = canonical_chunk(N);
    for (int ranks : {2, 4, 8}) {
      const int per = kTMax / ranks;
      std::vector<std::vector<float>> partials;
      for (int r = 0; r < ranks; ++r) {
        const int64_t n0 = std::min(N, r * per * chunk), n1 = std::min(N, (r + 1) * per * chunk), nl = n1 - n0;
        std::vector<float> my_dy(T * nl), my_w(w.begin() + n0 * K, w.begin() + n1 * K), dx(T * K);
        for (int64_t t = 0; t < T; ++t)
          std::copy(dy.begin() + t * N + n0, dy.begin() + t * N + n1, my_dy.begin() + t * nl);
        cpu::linear_input_grad_canonical(my_dy.data(), my_w.data(), dx.data(), T, nl, K, chunk, per);
        partials.push_back(dx);
      }
      EXPECT_TRUE(same_bits(finish_tree(partials), full)) << "N " << N << " ranks " << ranks;
    }
  }
}

TEST(GradCanonical, KernelsBitwiseAcrossThreadCounts) {
  const int64_t T = 77, N = 40, K = 33;
  auto dy = random_vector(T * N, 68), x = random_vector(T * K, 69), w = random_vector(N * K, 70);
  std::vector<float> dW1(N * K), dx1(T * K);
  set_num_threads(1);
  cpu::linear_weight_grad(dy.data(), x.data(), dW1.data(), N, K, cpu::token_chunks(T));
  cpu::linear_input_grad(dy.data(), w.data(), dx1.data(), T, N, K);
  for (int threads : {2, 3}) {
    set_num_threads(threads);
    std::vector<float> dW(N * K), dx(T * K);
    cpu::linear_weight_grad(dy.data(), x.data(), dW.data(), N, K, cpu::token_chunks(T));
    cpu::linear_input_grad(dy.data(), w.data(), dx.data(), T, N, K);
    EXPECT_TRUE(same_bits(dW, dW1)) << threads;
    EXPECT_TRUE(same_bits(dx, dx1)) << threads;
  }
  set_num_threads(2);
}

}  // namespace
}  // namespace lockstep
