// The tensor-core outer sums (outer_sum_chunked_tc: the weight and input gradients of the bf16
// linears) against their reference, the CPU's fp32 sums, within the hi + lo split's bound on
// random inputs; and the invariances the trainer relies on, bit for bit: both tiles give the
// same bits, a sequence-parallel rank's half of the chunks folds to the same root, and a
// token's input gradient does not depend on the rows around it.
#include <cmath>
#include <random>

#include "cuda_test_util.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/reduce_backward.h"
#include "kernels/cuda/backward.h"

namespace lockstep {
namespace {

using testing::DeviceVec;
using testing::same_bits_f;

std::vector<float> widen(const std::vector<uint16_t>& b) {
  std::vector<float> out(b.size());
  for (size_t i = 0; i < b.size(); ++i) out[i] = bf16_to_f32(b[i]);
  return out;
}
std::vector<float> absolute(std::vector<float> v) {
  for (auto& x : v) x = std::fabs(x);
  return v;
}
const cuda::bf16_t* as_bf16(const DeviceVec<uint16_t>& v) { return reinterpret_cast<const cuda::bf16_t*>(v.get()); }

// |got - want| <= rel * (sum of the element's |terms|): hi + lo keeps 16 significand bits of
// each g, and both sums round each addition to fp32, so 2^-13 of the terms' sum bounds both.
void expect_within_terms(const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& terms,
                         const char* what) {
  ASSERT_EQ(got.size(), want.size());
  const double rel = std::exp2(-13.0);
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(double(got[i]) - want[i]) <= rel * terms[i] + 1e-30) && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: tensor cores " << got[i] << ", cpu " << want[i] << ", terms "
                    << terms[i];
  EXPECT_EQ(bad, 0u) << what;
}

struct Shape {
  int64_t T, N, K;
};

class CudaOuterSumTc : public ::testing::TestWithParam<Shape> {};

TEST_P(CudaOuterSumTc, WithinTheSplitsBoundOfTheCpuAndTheSameBitsAtEveryTile) {
  LS_SKIP_WITHOUT_GPU();
  const auto [T, N, K] = GetParam();
  const auto dy = testing::random_gradient(T * N, 11 + T);
  const auto x = testing::random_bf16(T * K, 12 + N), w = testing::random_bf16(N * K, 13 + K);
  DeviceVec<float> Dy(dy), DW(N * K), Dx(T * K);
  DeviceVec<uint16_t> X(x), W(w);

  const cpu::TokenChunks chunks = cpu::token_chunks(T);
  std::vector<float> want_dw(N * K), want_dx(T * K), terms_dw(N * K), terms_dx(T * K);
  cpu::linear_weight_grad(dy.data(), widen(x).data(), want_dw.data(), N, K, chunks);
  cpu::linear_input_grad(dy.data(), widen(w).data(), want_dx.data(), T, N, K);
  cpu::linear_weight_grad(absolute(dy).data(), absolute(widen(x)).data(), terms_dw.data(), N, K, chunks);
  cpu::linear_input_grad(absolute(dy).data(), absolute(widen(w)).data(), terms_dx.data(), T, N, K);

  DW.poison();
  cuda::linear_weight_grad(Dy.get(), as_bf16(X), DW.get(), N, K, cuda::token_chunk_bounds(T), nullptr);
  const auto dw = DW.take();
  expect_within_terms(dw, want_dw, terms_dw, "weight grad");
  Dx.poison();
  cuda::linear_input_grad(Dy.get(), as_bf16(W), Dx.get(), T, N, K, nullptr);
  const auto dx = Dx.take();
  expect_within_terms(dx, want_dx, terms_dx, "input grad");

  // The other tile: the same procedure per element.
  DW.poison();
  cuda::outer_sum_chunked_tc(Dy.get(), 1, N, as_bf16(X), K, cuda::token_chunk_bounds(T), DW.get(), N, nullptr,
                             cuda::TcTile::k128x64);
  EXPECT_TRUE(same_bits_f(DW.take(), dw)) << "weight grad, 128 x 64 tile";
  Dx.poison();
  cuda::outer_sum_chunked_tc(Dy.get(), N, 1, as_bf16(W), K, cuda::token_chunk_bounds(N), Dx.get(), T, nullptr,
                             cuda::TcTile::k128x64);
  EXPECT_TRUE(same_bits_f(Dx.take(), dx)) << "input grad, 128 x 64 tile";
}

// Rows of one chunk: none, fewer than a k16 step, exactly one and two steps, a stage and a
// bit, several stages; the N and K edges cut tiles and fragments.
INSTANTIATE_TEST_SUITE_P(Shapes, CudaOuterSumTc,
                         ::testing::Values(Shape{1, 8, 8}, Shape{37, 70, 45}, Shape{128, 128, 96}, Shape{256, 64, 64},
                                           Shape{203, 33, 130}, Shape{1000, 96, 200}, Shape{300, 1000, 72}));

TEST(CudaOuterSumTc, HalvesOfTheChunksFoldToTheSameRoot) {
  LS_SKIP_WITHOUT_GPU();
  // A sequence-parallel rank holds 4 of the 8 token chunks: its subtree over them, added to the
  // other rank's, is the single rank's root (the top of the pairwise tree).
  const int64_t T = 777, N = 72, K = 136;
  const auto dy = testing::random_gradient(T * N, 21);
  const auto x = testing::random_bf16(T * K, 22);
  DeviceVec<float> Dy(dy), Whole(N * K);
  DeviceVec<uint16_t> X(x);
  const cuda::ChunkBounds all = cuda::token_chunk_bounds(T);
  cuda::linear_weight_grad(Dy.get(), as_bf16(X), Whole.get(), N, K, all, nullptr);
  const auto whole = Whole.take();

  std::vector<float> halves[2];
  for (int h = 0; h < 2; ++h) {
    const int64_t first = all.rows[4 * h], rows = all.rows[4 * h + 4] - first;
    cuda::ChunkBounds b;
    b.count = 4;
    for (int c = 0; c <= 4; ++c) b.rows[c] = all.rows[4 * h + c] - first;
    DeviceVec<float> DyHalf(std::vector<float>(dy.begin() + first * N, dy.begin() + (first + rows) * N)), Out(N * K);
    DeviceVec<uint16_t> XHalf(std::vector<uint16_t>(x.begin() + first * K, x.begin() + (first + rows) * K));
    cuda::linear_weight_grad(DyHalf.get(), as_bf16(XHalf), Out.get(), N, K, b, nullptr);
    halves[h] = Out.take();
  }
  std::vector<float> root(whole.size());
  for (size_t i = 0; i < root.size(); ++i) root[i] = halves[0][i] + halves[1][i];
  EXPECT_TRUE(same_bits_f(root, whole));
}

TEST(CudaOuterSumTc, ATokensInputGradIgnoresTheOtherRows) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t N = 1000, K = 72, small = 7, big = 300;
  const auto dy = testing::random_gradient(big * N, 31);
  const auto w = testing::random_bf16(N * K, 32);
  DeviceVec<uint16_t> W(w);
  DeviceVec<float> DyBig(dy), DySmall(std::vector<float>(dy.end() - small * N, dy.end())), DxBig(big * K),
      DxSmall(small * K);
  cuda::linear_input_grad(DyBig.get(), as_bf16(W), DxBig.get(), big, N, K, nullptr);
  cuda::linear_input_grad(DySmall.get(), as_bf16(W), DxSmall.get(), small, N, K, nullptr);
  const auto all = DxBig.take();
  EXPECT_TRUE(same_bits_f(DxSmall.take(), std::vector<float>(all.end() - small * K, all.end())));
}

TEST(CudaOuterSumTc, AChunksPartialDependsOnlyOnItsRows) {
  LS_SKIP_WITHOUT_GPU();
  // One chunk of rows at another offset in memory (after other rows) gives the same bits: the
  // k16 steps start at the chunk's first row, wherever it lies.
  const int64_t rows = 45, N = 40, K = 64, before = 19;
  const auto dy = testing::random_gradient((before + rows) * N, 41);
  const auto x = testing::random_bf16((before + rows) * K, 42);
  DeviceVec<float> Dy(dy), A(N * K), B(N * K);
  DeviceVec<uint16_t> X(x);
  cuda::ChunkBounds at_offset, alone;
  at_offset.count = alone.count = 1;
  at_offset.rows[0] = before, at_offset.rows[1] = before + rows;
  alone.rows[0] = 0, alone.rows[1] = rows;
  cuda::linear_weight_grad(Dy.get(), as_bf16(X), A.get(), N, K, at_offset, nullptr);
  DeviceVec<float> DyAlone(std::vector<float>(dy.begin() + before * N, dy.end()));
  DeviceVec<uint16_t> XAlone(std::vector<uint16_t>(x.begin() + before * K, x.end()));
  cuda::linear_weight_grad(DyAlone.get(), as_bf16(XAlone), B.get(), N, K, alone, nullptr);
  EXPECT_TRUE(same_bits_f(A.take(), B.take()));
}

TEST(CudaOuterSumTc, EachGroupOfAGroupedLaunchHasItsOwnCallsBits) {
  LS_SKIP_WITHOUT_GPU();
  // Experts: groups of different row counts (one empty of output rows) in one launch, each
  // the bits of its own call, for the weight-gradient layout and the input-gradient layout.
  const int64_t N = 48, K = 80, T = 200;
  const int64_t rows[4] = {70, 0, 5, 125};
  const auto dy = testing::random_gradient(T * N, 51);
  const auto x = testing::random_bf16(T * K, 52), w = testing::random_bf16(4 * N * K, 53);
  DeviceVec<float> Dy(dy), Grouped(4 * N * K + T * K), Single(N * K + T * K);
  DeviceVec<uint16_t> X(x), W(w);
  std::vector<cuda::OuterSumGroup> weight_groups, input_groups;
  int64_t first = 0, max_rows = 0;
  for (int e = 0; e < 4; ++e) {
    cuda::ChunkBounds b = cuda::token_chunk_bounds(rows[e]);
    weight_groups.push_back({Dy.get() + first * N, as_bf16(X) + first * K, Grouped.get() + e * N * K, N, b});
    input_groups.push_back({Dy.get() + first * N, as_bf16(W) + e * N * K, Grouped.get() + 4 * N * K + first * K,
                            rows[e], cuda::token_chunk_bounds(N)});
    first += rows[e], max_rows = std::max(max_rows, rows[e]);
  }
  DeviceVec<cuda::OuterSumGroup> Wg(weight_groups), Ig(input_groups);
  Grouped.poison();
  cuda::outer_sum_grouped_tc(Wg.get(), 4, N, 1, N, K, nullptr);
  cuda::outer_sum_grouped_tc(Ig.get(), 4, max_rows, N, 1, K, nullptr);
  const auto grouped = Grouped.take();
  first = 0;
  for (int e = 0; e < 4; ++e) {
    Single.poison();
    cuda::outer_sum_chunked_tc(Dy.get() + first * N, 1, N, as_bf16(X) + first * K, K, weight_groups[e].bounds,
                               Single.get(), N, nullptr);
    cuda::outer_sum_chunked_tc(Dy.get() + first * N, N, 1, as_bf16(W) + e * N * K, K, cuda::token_chunk_bounds(N),
                               Single.get() + N * K, rows[e], nullptr);
    const auto single = Single.take();
    EXPECT_TRUE(same_bits_f(std::vector<float>(single.begin(), single.begin() + N * K),
                            std::vector<float>(grouped.begin() + e * N * K, grouped.begin() + (e + 1) * N * K)))
        << "expert " << e << " weight grad";
    EXPECT_TRUE(same_bits_f(std::vector<float>(single.begin() + N * K, single.begin() + N * K + rows[e] * K),
                            std::vector<float>(grouped.begin() + 4 * N * K + first * K,
                                               grouped.begin() + 4 * N * K + (first + rows[e]) * K)))
        << "expert " << e << " input grad";
    first += rows[e];
  }
}

}  // namespace
}  // namespace lockstep
