// The outer sums of a split g (split_hi_lo, outer_sum_split_tc: the lm_head's, q/k/v's and the
// experts' gradients) against their reference, outer_sum_chunked_tc on the fp32 g, bit for bit:
// the split itself against the host's bf16 rounding, both layouts at shapes that cut tiles,
// stages, k16 steps and chunks (empty ones included) at both tiles, grouped launches against
// single calls, and the consuming linear helper against the two plain calls.
#include <cmath>
#include <random>

#include "cuda_test_util.h"
#include "kernels/cuda/backward.h"

namespace lockstep {
namespace {

using testing::DeviceVec;
using testing::same_bits_f;

const cuda::bf16_t* as_bf16(const DeviceVec<uint16_t>& v) { return reinterpret_cast<const cuda::bf16_t*>(v.get()); }
const cuda::bf16_t* as_split(const DeviceVec<float>& v) { return reinterpret_cast<const cuda::bf16_t*>(v.get()); }

TEST(CudaSplitHiLo, EachGroupOfEightBecomesItsHiThenItsLo) {
  LS_SKIP_WITHOUT_GPU();
  auto x = testing::random_gradient(8 * 1001, 1);
  x[3] = 1.0f + std::exp2(-8.0f);  // a tie: rounds to even
  x[4] = -3.0e38f;
  DeviceVec<float> D(x);
  cuda::split_hi_lo(D.get(), int64_t(x.size()), nullptr);
  const auto got = D.take();
  std::vector<uint16_t> halves(got.size() * 2);
  std::memcpy(halves.data(), got.data(), got.size() * 4);
  size_t bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const uint16_t hi = f32_to_bf16(x[i]), lo = f32_to_bf16(x[i] - bf16_to_f32(hi));
    const size_t group = i / 8 * 16, at = i % 8;
    if ((halves[group + at] != hi || halves[group + 8 + at] != lo) && bad++ < 5)
      ADD_FAILURE() << "value " << i << " (" << x[i] << "): hi " << halves[group + at] << " want " << hi << ", lo "
                    << halves[group + 8 + at] << " want " << lo;
  }
  EXPECT_EQ(bad, 0u);
}

TEST(CudaSplitHiLo, RefusesALengthNotAMultipleOfEight) {
  LS_SKIP_WITHOUT_GPU();
  DeviceVec<float> D(12);
  EXPECT_THROW(cuda::split_hi_lo(D.get(), 12, nullptr), std::exception);
}

constexpr cuda::SplitTile kEveryTile[] = {cuda::SplitTile::k128x128, cuda::SplitTile::k128x256,
                                          cuda::SplitTile::k256x128, cuda::SplitTile::wgmma128x256};
const char* tile_name(cuda::SplitTile tile) {
  switch (tile) {
    case cuda::SplitTile::k128x128: return "128 x 128";
    case cuda::SplitTile::k128x256: return "128 x 256";
    case cuda::SplitTile::k256x128: return "256 x 128";
    case cuda::SplitTile::wgmma128x256: return "wgmma 128 x 256";
    default: return "automatic";
  }
}

struct Shape {
  int64_t T, N, K;
};

class CudaOuterSumSplitTc : public ::testing::TestWithParam<Shape> {};

// The weight and input gradients of dy [T, N] against the fp32 path's bits.
TEST_P(CudaOuterSumSplitTc, TheFp32PathsBitsForWeightAndInputGradients) {
  LS_SKIP_WITHOUT_GPU();
  const auto [T, N, K] = GetParam();
  const auto dy = testing::random_gradient(T * N, 11 + T);
  const auto x = testing::random_bf16(T * K, 12 + N), w = testing::random_bf16(N * K, 13 + K);
  DeviceVec<float> Dy(dy), Split(dy), Want(std::max(N, T) * K), Got(std::max(N, T) * K);  // [N or T, K]
  DeviceVec<uint16_t> X(x), W(w);
  cuda::split_hi_lo(Split.get(), T * N, nullptr);

  const cuda::ChunkBounds tokens = cuda::token_chunk_bounds(T), over_n = cuda::token_chunk_bounds(N);
  ASSERT_TRUE(cuda::outer_sum_split_tc_supported(1, N, K, tokens, N));
  ASSERT_TRUE(cuda::outer_sum_split_tc_supported(N, 1, K, over_n, T));
  // The first n values of a [N or T, K] buffer.
  const auto head = [](const DeviceVec<float>& v, int64_t n) {
    const auto all = v.take();
    return std::vector<float>(all.begin(), all.begin() + n);
  };
  DeviceVec<float> Workspace(cuda::outer_sum_split_workspace_floats());
  Want.poison();
  cuda::outer_sum_chunked_tc(Dy.get(), 1, N, as_bf16(X), K, tokens, Want.get(), N, nullptr);
  const auto want_dw = head(Want, N * K);
  Want.poison();
  cuda::outer_sum_chunked_tc(Dy.get(), N, 1, as_bf16(W), K, over_n, Want.get(), T, nullptr);
  const auto want_dx = head(Want, T * K);
  for (const auto tile : kEveryTile) {
    const char* name = tile_name(tile);
    Workspace.poison(), Got.poison();
    cuda::outer_sum_split_tc(as_split(Split), 1, N, as_bf16(X), K, tokens, Got.get(), N, nullptr, Workspace.get(),
                             tile);
    EXPECT_TRUE(same_bits_f(head(Got, N * K), want_dw)) << "weight grad, " << name;
    Got.poison();
    cuda::outer_sum_split_tc(as_split(Split), N, 1, as_bf16(W), K, over_n, Got.get(), T, nullptr, Workspace.get(),
                             tile);
    EXPECT_TRUE(same_bits_f(head(Got, T * K), want_dx)) << "input grad, " << name;
  }

  // The helper that consumes dy: both gradients as the two plain calls give them.
  DeviceVec<float> Consumed(dy), DW(N * K), Dx(T * K), PlainDW(N * K), PlainDx(T * K);
  cuda::linear_grads_consuming_dy(Consumed.get(), as_bf16(X), as_bf16(W), DW.get(), Dx.get(), T, N, K, tokens,
                                  Workspace.get(), nullptr);
  cuda::linear_weight_grad(Dy.get(), as_bf16(X), PlainDW.get(), N, K, tokens, nullptr);
  cuda::linear_input_grad(Dy.get(), as_bf16(W), PlainDx.get(), T, N, K, nullptr);
  EXPECT_TRUE(same_bits_f(DW.take(), PlainDW.take())) << "consuming helper, weight grad";
  EXPECT_TRUE(same_bits_f(Dx.take(), PlainDx.take())) << "consuming helper, input grad";
}

// Chunks of a few rows to several stages; N and K cut 128-wide tiles and n8 fragments; N a
// multiple of 64 so that the input gradient's chunks over N start at multiples of 8.
INSTANTIATE_TEST_SUITE_P(Shapes, CudaOuterSumSplitTc,
                         ::testing::Values(Shape{1, 64, 8}, Shape{37, 64, 48}, Shape{203, 128, 136},
                                           Shape{256, 192, 96}, Shape{1000, 320, 200}, Shape{300, 1024, 72},
                                           Shape{2050, 512, 264}));

TEST(CudaOuterSumSplitTc, UnevenAndEmptyChunksGiveTheFp32PathsBits) {
  LS_SKIP_WITHOUT_GPU();
  // Experts' chunks: empty ones, one row, a step and a bit, several stages.
  const int64_t S = 203, I = 136, K = 80;
  const auto g = testing::random_gradient(S * I, 61);
  const auto m = testing::random_bf16(S * K, 62);
  DeviceVec<float> G(g), Split(g), Want(I * K), Got(I * K), Workspace(cuda::outer_sum_split_workspace_floats());
  DeviceVec<uint16_t> M(m);
  cuda::split_hi_lo(Split.get(), S * I, nullptr);
  cuda::ChunkBounds b;
  const int64_t rows[9] = {0, 0, 1, 18, 18, 51, 120, 120, 203};
  for (int c = 0; c < 9; ++c) b.rows[c] = rows[c];
  for (const int count : {8, 4, 2, 1}) {
    cuda::ChunkBounds sub;
    sub.count = count;
    for (int c = 0; c <= count; ++c) sub.rows[c] = b.rows[c * (8 / count)];
    Want.poison();
    cuda::outer_sum_chunked_tc(G.get(), 1, I, as_bf16(M), K, sub, Want.get(), I, nullptr);
    const auto want = Want.take();
    for (const auto tile : kEveryTile) {
      Got.poison();
      cuda::outer_sum_split_tc(as_split(Split), 1, I, as_bf16(M), K, sub, Got.get(), I, nullptr, Workspace.get(), tile);
      EXPECT_TRUE(same_bits_f(Got.take(), want)) << count << " chunks, tile " << tile_name(tile);
    }
    Got.poison();
    const cuda::SplitOuterSumGroup group{as_split(Split), as_bf16(M), Got.get(), I, sub};
    cuda::outer_sum_split_grouped_wgmma(&group, 1, I, 1, I, K, nullptr);
    EXPECT_TRUE(same_bits_f(Got.take(), want)) << count << " chunks, grouped wgmma";
  }
}

TEST(CudaOuterSumSplitTc, EachGroupOfAGroupedLaunchHasItsOwnCallsBits) {
  LS_SKIP_WITHOUT_GPU();
  // Experts: row blocks of different sizes (one empty) in one launch, weight and input layouts.
  const int64_t N = 64, K = 72, T = 260;
  const int64_t rows[4] = {70, 0, 5, 185};
  const auto dy = testing::random_gradient(T * N, 51);
  const auto x = testing::random_bf16(T * K, 52), w = testing::random_bf16(4 * N * K, 53);
  DeviceVec<float> Dy(dy), Split(dy), Grouped(4 * N * K + T * K), Single(N * K + T * K);
  DeviceVec<uint16_t> X(x), W(w);
  cuda::split_hi_lo(Split.get(), T * N, nullptr);
  std::vector<cuda::SplitOuterSumGroup> weight_groups, input_groups;
  int64_t first = 0, max_rows = 0;
  for (int e = 0; e < 4; ++e) {
    const cuda::ChunkBounds b = cuda::token_chunk_bounds(rows[e]);
    weight_groups.push_back({as_split(Split) + 2 * first * N, as_bf16(X) + first * K, Grouped.get() + e * N * K, N, b});
    input_groups.push_back({as_split(Split) + 2 * first * N, as_bf16(W) + e * N * K,
                            Grouped.get() + 4 * N * K + first * K, rows[e], cuda::token_chunk_bounds(N)});
    first += rows[e], max_rows = std::max(max_rows, rows[e]);
  }
  DeviceVec<cuda::SplitOuterSumGroup> Wg(weight_groups), Ig(input_groups);
  DeviceVec<float> Workspace(cuda::outer_sum_split_workspace_floats());
  std::vector<float> grouped;
  for (const auto tile : {cuda::SplitTile::k128x256, cuda::SplitTile::k256x128, cuda::SplitTile::k128x128}) {
    Grouped.poison();
    cuda::outer_sum_split_grouped_tc(Wg.get(), 4, N, 1, N, K, nullptr, Workspace.get(), tile);
    cuda::outer_sum_split_grouped_tc(Ig.get(), 4, max_rows, N, 1, K, nullptr, Workspace.get(), tile);
    const auto got = Grouped.take();
    if (!grouped.empty()) {
      EXPECT_TRUE(same_bits_f(got, grouped)) << "tile " << tile_name(tile);
    }
    grouped = got;
  }
  // The wgmma form takes the groups from host memory.
  Grouped.poison();
  cuda::outer_sum_split_grouped_wgmma(weight_groups.data(), 4, N, 1, N, K, nullptr);
  cuda::outer_sum_split_grouped_wgmma(input_groups.data(), 4, max_rows, N, 1, K, nullptr);
  EXPECT_TRUE(same_bits_f(Grouped.take(), grouped)) << "grouped wgmma";
  first = 0;
  for (int e = 0; e < 4; ++e) {
    Single.poison();
    cuda::outer_sum_chunked_tc(Dy.get() + first * N, 1, N, as_bf16(X) + first * K, K, weight_groups[size_t(e)].bounds,
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

TEST(CudaOuterSumSplitTc, SupportsOnlyShapesWhosePiecesAreWholeGroupsOfEight) {
  const cuda::ChunkBounds tokens = cuda::token_chunk_bounds(100), over_64 = cuda::token_chunk_bounds(64),
                          over_72 = cuda::token_chunk_bounds(72);  // chunks of 9 rows
  EXPECT_TRUE(cuda::outer_sum_split_tc_supported(1, 64, 16, tokens, 64));
  EXPECT_FALSE(cuda::outer_sum_split_tc_supported(1, 60, 16, tokens, 60));  // g's rows
  EXPECT_FALSE(cuda::outer_sum_split_tc_supported(1, 64, 12, tokens, 64));  // K
  EXPECT_TRUE(cuda::outer_sum_split_tc_supported(64, 1, 16, over_64, 100));
  EXPECT_FALSE(cuda::outer_sum_split_tc_supported(72, 1, 16, over_72, 100));  // a chunk starts at row 9
  EXPECT_FALSE(cuda::outer_sum_split_tc_supported(4, 2, 16, over_64, 100));   // neither layout
}

TEST(CudaOuterSumSplitTc, TheWgmmaTileRefusesADeviceGroupTableAndTheGroupedOneTooManyGroups) {
  LS_SKIP_WITHOUT_GPU();
  DeviceVec<float> Workspace(cuda::outer_sum_split_workspace_floats());
  EXPECT_THROW(cuda::outer_sum_split_grouped_tc(nullptr, 1, 64, 1, 64, 64, nullptr, Workspace.get(),
                                                cuda::SplitTile::wgmma128x256),
               std::exception);
  DeviceVec<float> G(64 * 8), Out(64 * 64);
  DeviceVec<uint16_t> M(8 * 64);
  const std::vector<cuda::SplitOuterSumGroup> groups(
      257, cuda::SplitOuterSumGroup{as_split(G), as_bf16(M), Out.get(), 64, cuda::token_chunk_bounds(8)});
  EXPECT_THROW(cuda::outer_sum_split_grouped_wgmma(groups.data(), 257, 64, 1, 64, 64, nullptr), std::exception);
}

}  // namespace
}  // namespace lockstep
