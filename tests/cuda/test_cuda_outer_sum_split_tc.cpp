// The outer sums of a split g (split_hi_lo, outer_sum_split_tc: the lm_head's, q/k/v's and the
// experts' gradients) against their reference, outer_sum_chunked_tc on the fp32 g, bit for bit:
// the split itself against the host's bf16 rounding, both layouts at shapes that cut tiles,
// stages, k16 steps and chunks (empty ones included) at both tiles, grouped launches against
// single calls, and the consuming linear helper against the two plain calls; the packed bf16
// gradient against both halves of the gradient rounded to bf16.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>

#include "../error_of.h"
#include "cuda_test_util.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/outer_sum_split_tma.h"

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

constexpr cuda::SplitTile kEveryTile[] = {cuda::SplitTile::k128x128,     cuda::SplitTile::k128x256,
                                          cuda::SplitTile::k256x128,     cuda::SplitTile::wgmma128x256,
                                          cuda::SplitTile::wgmma128x128, cuda::SplitTile::tma128x256,
                                          cuda::SplitTile::tma128x128};
const char* tile_name(cuda::SplitTile tile) {
  switch (tile) {
    case cuda::SplitTile::k128x128: return "128 x 128";
    case cuda::SplitTile::k128x256: return "128 x 256";
    case cuda::SplitTile::k256x128: return "256 x 128";
    case cuda::SplitTile::wgmma128x256: return "wgmma 128 x 256";
    case cuda::SplitTile::wgmma128x128: return "wgmma 128 x 128";
    case cuda::SplitTile::tma128x256: return "TMA 128 x 256";
    case cuda::SplitTile::tma128x128: return "TMA 128 x 128";
    default: return "automatic";
  }
}

// run(tile, name) at every tile, the TMA tiles also in clusters of two CTAs (the m tile shared
// by multicast; set_outer_sum_tma_cluster) and with the input gradients' chunk pairs as one run
// of stages (set_outer_sum_input_pair_stages); the settings are restored after.
template <typename Run>
void for_every_tile(Run run) {
  const int before = cuda::outer_sum_tma_cluster();
  const bool pairs_before = cuda::outer_sum_input_pair_stages();
  for (const auto tile : kEveryTile) {
    const bool tma = tile == cuda::SplitTile::tma128x256 || tile == cuda::SplitTile::tma128x128;
    for (const int cluster : {1, 2})
      for (const bool pair_stages : {false, true}) {
        if ((cluster == 2 || pair_stages) && !tma) continue;
        cuda::set_outer_sum_tma_cluster(cluster);
        cuda::set_outer_sum_input_pair_stages(pair_stages);
        run(tile, std::string(tile_name(tile)) + (cluster == 2 ? ", cluster of 2" : "") +
                      (pair_stages ? ", pair stages" : ""));
      }
  }
  cuda::set_outer_sum_tma_cluster(before);
  cuda::set_outer_sum_input_pair_stages(pairs_before);
}

struct Shape {
  int64_t T, N, K;
};

class CudaOuterSumSplitTc : public ::testing::TestWithParam<Shape> {};

// The first n values of a [N or T, K] buffer.
std::vector<float> head(const DeviceVec<float>& v, int64_t n) {
  const auto all = v.take();
  return std::vector<float>(all.begin(), all.begin() + n);
}

// linear_grads_consuming_dy of `consumed` (dy [T, N]) with `operand`: both gradients as the two
// plain calls give them on `plain`.
void expect_consuming_helper_matches(const std::vector<float>& consumed, const std::vector<float>& plain,
                                     const DeviceVec<uint16_t>& X, const DeviceVec<uint16_t>& W, int64_t T, int64_t N,
                                     int64_t K, const cuda::ChunkBounds& tokens, const DeviceVec<float>& workspace,
                                     cuda::GradientOperand operand) {
  DeviceVec<float> Consumed(consumed), Plain(plain), DW(N * K), Dx(T * K), PlainDW(N * K), PlainDx(T * K);
  cuda::linear_grads_consuming_dy(Consumed.get(), as_bf16(X), as_bf16(W), DW.get(), Dx.get(), T, N, K, tokens,
                                  workspace.get(), nullptr, operand);
  cuda::linear_weight_grad(Plain.get(), as_bf16(X), PlainDW.get(), N, K, tokens, nullptr);
  cuda::linear_input_grad(Plain.get(), as_bf16(W), PlainDx.get(), T, N, K, nullptr);
  EXPECT_TRUE(same_bits_f(DW.take(), PlainDW.take())) << "consuming helper, weight grad";
  EXPECT_TRUE(same_bits_f(Dx.take(), PlainDx.take())) << "consuming helper, input grad";
}

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
  DeviceVec<float> Workspace(cuda::outer_sum_split_workspace_floats());
  Want.poison();
  cuda::outer_sum_chunked_tc(Dy.get(), 1, N, as_bf16(X), K, tokens, Want.get(), N, nullptr);
  const auto want_dw = head(Want, N * K);
  Want.poison();
  cuda::outer_sum_chunked_tc(Dy.get(), N, 1, as_bf16(W), K, over_n, Want.get(), T, nullptr);
  const auto want_dx = head(Want, T * K);
  // The chunks in parallel blocks (the router's weight gradient): the same bits; a workspace
  // one float short is refused.
  Workspace.poison(), Got.poison();
  cuda::outer_sum_chunk_parallel_tc(Dy.get(), 1, N, as_bf16(X), K, tokens, Got.get(), N, Workspace.get(),
                                    tokens.count * N * K, nullptr);
  EXPECT_TRUE(same_bits_f(head(Got, N * K), want_dw)) << "weight grad, chunks in parallel";
  EXPECT_THROW(cuda::outer_sum_chunk_parallel_tc(Dy.get(), 1, N, as_bf16(X), K, tokens, Got.get(), N, Workspace.get(),
                                                 tokens.count * N * K - 1, nullptr),
               std::exception);
  for_every_tile([&](cuda::SplitTile tile, const std::string& name) {
    Workspace.poison(), Got.poison();
    cuda::outer_sum_split_tc(as_split(Split), 1, N, as_bf16(X), K, tokens, Got.get(), N, nullptr, Workspace.get(),
                             tile);
    EXPECT_TRUE(same_bits_f(head(Got, N * K), want_dw)) << "weight grad, " << name;
    Got.poison();
    cuda::outer_sum_split_tc(as_split(Split), N, 1, as_bf16(W), K, over_n, Got.get(), T, nullptr, Workspace.get(),
                             tile);
    EXPECT_TRUE(same_bits_f(head(Got, T * K), want_dx)) << "input grad, " << name;
  });

  // The helper that consumes dy: both gradients as the two plain calls give them.
  expect_consuming_helper_matches(dy, dy, X, W, T, N, K, tokens, Workspace, cuda::GradientOperand::exact_hi_lo);
}

// GradientOperand::bf16 (dy packed): the products of dy rounded to bf16, i.e. the bits both
// halves give for a dy whose values are bf16 already (lo = 0), at every tile; and the consuming
// helper's.
TEST_P(CudaOuterSumSplitTc, TheHiHalfAloneIsTheRoundedGradientsSum) {
  LS_SKIP_WITHOUT_GPU();
  const auto [T, N, K] = GetParam();
  const auto dy = testing::random_gradient(T * N, 21 + T);
  std::vector<float> rounded(dy.size());
  for (size_t i = 0; i < dy.size(); ++i) rounded[i] = bf16_to_f32(f32_to_bf16(dy[i]));
  const auto x = testing::random_bf16(T * K, 22 + N), w = testing::random_bf16(N * K, 23 + K);
  DeviceVec<float> Packed(dy), SplitRounded(rounded), Want(std::max(N, T) * K), Got(std::max(N, T) * K);
  DeviceVec<uint16_t> X(x), W(w);
  cuda::pack_bf16_rows(Packed.get(), T, N, nullptr);
  cuda::split_hi_lo(SplitRounded.get(), T * N, nullptr);
  const cuda::ChunkBounds tokens = cuda::token_chunk_bounds(T), over_n = cuda::token_chunk_bounds(N);
  DeviceVec<float> Workspace(cuda::outer_sum_split_workspace_floats());
  const auto hi = cuda::GradientOperand::bf16;
  for_every_tile([&](cuda::SplitTile tile, const std::string& name) {
    Want.poison(), Got.poison();
    cuda::outer_sum_split_tc(as_split(SplitRounded), 1, N, as_bf16(X), K, tokens, Want.get(), N, nullptr,
                             Workspace.get(), tile);
    cuda::outer_sum_split_tc(as_split(Packed), 1, N, as_bf16(X), K, tokens, Got.get(), N, nullptr, Workspace.get(),
                             tile, hi);
    EXPECT_TRUE(same_bits_f(head(Got, N * K), head(Want, N * K))) << "weight grad, " << name;
    Want.poison(), Got.poison();
    cuda::outer_sum_split_tc(as_split(SplitRounded), N, 1, as_bf16(W), K, over_n, Want.get(), T, nullptr,
                             Workspace.get(), tile);
    cuda::outer_sum_split_tc(as_split(Packed), N, 1, as_bf16(W), K, over_n, Got.get(), T, nullptr, Workspace.get(),
                             tile, hi);
    EXPECT_TRUE(same_bits_f(head(Got, T * K), head(Want, T * K))) << "input grad, " << name;
  });
  expect_consuming_helper_matches(dy, rounded, X, W, T, N, K, tokens, Workspace, hi);
  // A dy that arrives packed (the head's log-softmax backward packs as it writes): the same bits.
  if (!cuda::linear_grads_take_split(T, N, K, tokens)) return;
  DeviceVec<float> Plain(rounded), DW(N * K), Dx(T * K), PlainDW(N * K), PlainDx(T * K);
  cuda::linear_grads_of_packed_dy(as_split(Packed), as_bf16(X), as_bf16(W), DW.get(), Dx.get(), T, N, K, tokens,
                                  Workspace.get(), nullptr);
  cuda::linear_weight_grad(Plain.get(), as_bf16(X), PlainDW.get(), N, K, tokens, nullptr);
  cuda::linear_input_grad(Plain.get(), as_bf16(W), PlainDx.get(), T, N, K, nullptr);
  EXPECT_TRUE(same_bits_f(DW.take(), PlainDW.take())) << "packed dy, weight grad";
  EXPECT_TRUE(same_bits_f(Dx.take(), PlainDx.take())) << "packed dy, input grad";
}

TEST(CudaPackBf16Rows, EachRowBecomesItsBf16AtTheFrontOfItsOwnBytes) {
  LS_SKIP_WITHOUT_GPU();
  // Rows longer than a block's segment (2048 values), and a short one.
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{5, 4104}, {300, 8}, {3, 2048}}) {
    auto x = testing::random_gradient(rows * cols, 4 + cols);
    x[1] = 1.0f + std::exp2(-8.0f);  // a tie: rounds to even
    DeviceVec<float> D(x);
    cuda::pack_bf16_rows(D.get(), rows, cols, nullptr);
    const auto got = D.take();
    std::vector<uint16_t> halves(got.size() * 2);
    std::memcpy(halves.data(), got.data(), got.size() * 4);
    size_t bad = 0;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        if (halves[size_t(2 * cols * r + c)] != f32_to_bf16(x[size_t(r * cols + c)]) && bad++ < 5)
          ADD_FAILURE() << rows << " x " << cols << ": row " << r << " column " << c;
    EXPECT_EQ(bad, 0u) << rows << " x " << cols;
  }
}

TEST(CudaRoundToBf16, EachValueBecomesItsBf16) {
  LS_SKIP_WITHOUT_GPU();
  auto x = testing::random_gradient(1003, 3);
  x[3] = 1.0f + std::exp2(-8.0f);  // a tie: rounds to even
  DeviceVec<float> D(x);
  cuda::round_to_bf16(D.get(), int64_t(x.size()), nullptr);
  std::vector<float> want(x.size());
  for (size_t i = 0; i < x.size(); ++i) want[i] = bf16_to_f32(f32_to_bf16(x[i]));
  EXPECT_TRUE(same_bits_f(D.take(), want));
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
  std::vector<float> rounded(g.size());
  for (size_t i = 0; i < g.size(); ++i) rounded[i] = bf16_to_f32(f32_to_bf16(g[i]));
  DeviceVec<float> G(g), Split(g), Want(I * K), Got(I * K), Workspace(cuda::outer_sum_split_workspace_floats());
  DeviceVec<float> SplitRounded(rounded), Packed(g);
  DeviceVec<uint16_t> M(m);
  cuda::split_hi_lo(Split.get(), S * I, nullptr);
  cuda::split_hi_lo(SplitRounded.get(), S * I, nullptr);
  cuda::pack_bf16_rows(Packed.get(), S, I, nullptr);
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
    for_every_tile([&](cuda::SplitTile tile, const std::string& name) {
      Got.poison();
      cuda::outer_sum_split_tc(as_split(Split), 1, I, as_bf16(M), K, sub, Got.get(), I, nullptr, Workspace.get(), tile);
      EXPECT_TRUE(same_bits_f(Got.take(), want)) << count << " chunks, tile " << name;
    });
    Got.poison();
    const cuda::SplitOuterSumGroup group{as_split(Split), as_bf16(M), Got.get(), I, sub};
    cuda::outer_sum_split_grouped_wgmma(&group, 1, I, 1, I, K, nullptr);
    EXPECT_TRUE(same_bits_f(Got.take(), want)) << count << " chunks, grouped wgmma";

    // The bf16 operand: chunk ends inside a k16 step are the TMA tiles' masked rows.
    Want.poison();
    cuda::outer_sum_split_tc(as_split(SplitRounded), 1, I, as_bf16(M), K, sub, Want.get(), I, nullptr, nullptr,
                             cuda::SplitTile::k128x128);
    const auto want_bf16 = Want.take();
    for_every_tile([&](cuda::SplitTile tile, const std::string& name) {
      Got.poison();
      cuda::outer_sum_split_tc(as_split(Packed), 1, I, as_bf16(M), K, sub, Got.get(), I, nullptr, Workspace.get(), tile,
                               cuda::GradientOperand::bf16);
      EXPECT_TRUE(same_bits_f(Got.take(), want_bf16)) << count << " chunks, bf16, tile " << name;
    });
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

TEST(CudaOuterSumSplitTc, AGroupedLaunchOnTheHiHalfAloneIsTheRoundedGradientsSum) {
  LS_SKIP_WITHOUT_GPU();
  // The experts' launches with GradientOperand::bf16: both halves' bits for the rounded gradient.
  // (N = 128: the input gradients' chunks over N are whole k16 steps, as the TMA tile needs.)
  const int64_t N = 128, K = 72, T = 260;
  const int64_t rows[3] = {70, 5, 185};
  auto dy = testing::random_gradient(T * N, 71);
  std::vector<float> rounded(dy.size());
  for (size_t i = 0; i < dy.size(); ++i) rounded[i] = bf16_to_f32(f32_to_bf16(dy[i]));
  const auto x = testing::random_bf16(T * K, 72), w = testing::random_bf16(3 * N * K, 73);
  DeviceVec<float> Packed(dy), SplitRounded(rounded), Got(3 * N * K + T * K), Want(3 * N * K + T * K);
  DeviceVec<uint16_t> X(x), W(w);
  cuda::pack_bf16_rows(Packed.get(), T, N, nullptr);
  cuda::split_hi_lo(SplitRounded.get(), T * N, nullptr);
  const auto groups_of = [&](const DeviceVec<float>& g, float* out) {
    std::vector<cuda::SplitOuterSumGroup> weight, input;
    int64_t first = 0;
    for (int e = 0; e < 3; ++e) {
      weight.push_back(
          {as_split(g) + 2 * first * N, as_bf16(X) + first * K, out + e * N * K, N, cuda::token_chunk_bounds(rows[e])});
      input.push_back({as_split(g) + 2 * first * N, as_bf16(W) + e * N * K, out + 3 * N * K + first * K, rows[e],
                       cuda::token_chunk_bounds(N)});
      first += rows[e];
    }
    weight.insert(weight.end(), input.begin(), input.end());
    return weight;
  };
  DeviceVec<cuda::SplitOuterSumGroup> HiGroups(groups_of(Packed, Got.get())),
      BothGroups(groups_of(SplitRounded, Want.get()));
  Got.poison(), Want.poison();
  cuda::outer_sum_split_grouped_tc(BothGroups.get(), 3, N, 1, N, K, nullptr);
  cuda::outer_sum_split_grouped_tc(BothGroups.get() + 3, 3, 185, N, 1, K, nullptr);
  cuda::outer_sum_split_grouped_tc(HiGroups.get(), 3, N, 1, N, K, nullptr, nullptr, cuda::SplitTile::automatic,
                                   cuda::GradientOperand::bf16);
  cuda::outer_sum_split_grouped_tc(HiGroups.get() + 3, 3, 185, N, 1, K, nullptr, nullptr, cuda::SplitTile::automatic,
                                   cuda::GradientOperand::bf16);
  const auto want = Want.take();
  EXPECT_TRUE(same_bits_f(Got.take(), want)) << "mma.sync 128 x 128";
  // The grouped wgmma tile, its groups from host memory.
  Got.poison();
  const auto host = groups_of(Packed, Got.get());
  cuda::outer_sum_split_grouped_wgmma(host.data(), 3, N, 1, N, K, nullptr, cuda::GradientOperand::bf16);
  cuda::outer_sum_split_grouped_wgmma(host.data() + 3, 3, 185, N, 1, K, nullptr, cuda::GradientOperand::bf16);
  EXPECT_TRUE(same_bits_f(Got.take(), want)) << "wgmma 128 x 128";
  // The grouped TMA tiles read the groups as rows of dy, x and the three experts' w.
  DeviceVec<float> Workspace(cuda::outer_sum_split_workspace_floats());
  cuda::SplitSpans weight_spans, input_spans;
  weight_spans.g[0] = input_spans.g[0] = as_split(Packed);
  weight_spans.g_rows[0] = input_spans.g_rows[0] = T;
  weight_spans.m[0] = as_bf16(X), weight_spans.m_rows[0] = T;
  input_spans.m[0] = as_bf16(W), input_spans.m_rows[0] = 3 * N;
  const int before = cuda::outer_sum_tma_cluster();
  const bool pairs_before = cuda::outer_sum_input_pair_stages();
  for (const int cluster : {1, 2})
    for (const bool pair_stages : {false, true})
      for (const int columns : {128, 256}) {
        cuda::set_outer_sum_tma_cluster(cluster);
        cuda::set_outer_sum_input_pair_stages(pair_stages);
        Got.poison();
        cuda::outer_sum_split_tma_grouped(host.data(), 3, N, true, N, K, weight_spans, Workspace.get(), nullptr,
                                          columns);
        cuda::outer_sum_split_tma_grouped(host.data() + 3, 3, 185, false, N, K, input_spans, Workspace.get(), nullptr,
                                          columns);
        EXPECT_TRUE(same_bits_f(Got.take(), want))
            << "TMA, " << columns << " columns, clusters of " << cluster << ", pair stages " << pair_stages;
      }
  cuda::set_outer_sum_tma_cluster(before);
  cuda::set_outer_sum_input_pair_stages(pairs_before);
}

// The experts' input gradient in two parts (gate's and up's g, each over its own N, each its
// expert's w) summed in one output (parts 2): the bits of the two outputs added afterwards
// (add_rows_in_order's rows[r] + second_rows[r]), at both cluster sizes and pair-stage settings,
// with experts of one row tile, of two (one cut), and of a few rows; and with more groups than
// one launch holds (kMaxWgmmaGroups), which goes in slices of both runs.
TEST(CudaOuterSumSplitTma, InputGradientPartsSumInOneOutputAsTwoOutputsAdded) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t N = 128, K = 72;
  for (const int experts : {3, 130}) {
    std::vector<int64_t> rows;
    for (int e = 0; e < experts; ++e)
      rows.push_back(experts == 3 ? std::vector<int64_t>{70, 5, 185}[size_t(e)] : e % 3 + 1);
    int64_t T = 0, max_rows = 0;
    for (const int64_t n : rows) T += n, max_rows = std::max(max_rows, n);
    const auto gate = testing::random_gradient(T * N, 81), up = testing::random_gradient(T * N, 82);
    const auto w = testing::random_bf16(int64_t(experts) * 2 * N * K, 83);
    DeviceVec<float> Gate(gate), Up(up), Parts(2 * T * K), Summed(T * K);
    DeviceVec<uint16_t> W(w);
    cuda::pack_bf16_rows(Gate.get(), T, N, nullptr);
    cuda::pack_bf16_rows(Up.get(), T, N, nullptr);
    // Each expert's gate groups, then its up groups: into Parts (gate's rows, then up's), or
    // both into Summed.
    const auto groups = [&](float* gate_out, float* up_out) {
      std::vector<cuda::SplitOuterSumGroup> gate_groups, up_groups;
      int64_t first = 0;
      for (int e = 0; e < experts; ++e) {
        const auto* w_gate = as_bf16(W) + int64_t(e) * 2 * N * K;
        gate_groups.push_back({as_split(Gate) + 2 * first * N, w_gate, gate_out + first * K, rows[size_t(e)],
                               cuda::token_chunk_bounds(N)});
        up_groups.push_back({as_split(Up) + 2 * first * N, w_gate + N * K, up_out + first * K, rows[size_t(e)],
                             cuda::token_chunk_bounds(N)});
        first += rows[size_t(e)];
      }
      gate_groups.insert(gate_groups.end(), up_groups.begin(), up_groups.end());
      return gate_groups;
    };
    cuda::SplitSpans spans;
    spans.g[0] = as_split(Gate), spans.g[1] = as_split(Up), spans.g_rows[0] = spans.g_rows[1] = T;
    spans.m[0] = as_bf16(W), spans.m_rows[0] = int64_t(experts) * 2 * N;
    const int count = 2 * experts;
    const auto separate = groups(Parts.get(), Parts.get() + T * K);
    Parts.poison();
    cuda::outer_sum_split_grouped_wgmma(separate.data(), count, max_rows, N, 1, K, nullptr, cuda::GradientOperand::bf16,
                                        &spans);
    const auto parts = Parts.take();
    std::vector<float> want(size_t(T * K));
    for (size_t i = 0; i < want.size(); ++i) want[i] = parts[i] + parts[i + want.size()];
    const auto summed = groups(Summed.get(), Summed.get());
    const int cluster_before = cuda::outer_sum_tma_cluster();
    const bool pairs_before = cuda::outer_sum_input_pair_stages();
    for (const int cluster : {1, 2})
      for (const bool pair_stages : {false, true}) {
        cuda::set_outer_sum_tma_cluster(cluster);
        cuda::set_outer_sum_input_pair_stages(pair_stages);
        Summed.poison();
        cuda::outer_sum_split_grouped_wgmma(summed.data(), count, max_rows, N, 1, K, nullptr,
                                            cuda::GradientOperand::bf16, &spans, 2);
        EXPECT_TRUE(same_bits_f(Summed.take(), want))
            << experts << " experts, clusters of " << cluster << ", pair stages " << pair_stages;
      }
    cuda::set_outer_sum_tma_cluster(cluster_before);
    cuda::set_outer_sum_input_pair_stages(pairs_before);
  }
}

// Outputs summed over parts: refused before any work where a part's group writes another output
// or has another I, where the groups are not whole runs, or on the 128 x 256 tile (its tree
// keeps level 2 in the output).
TEST(CudaOuterSumSplitTma, RefusesPartsThatDoNotShareTheirOutputsBeforeAnyWork) {
  std::vector<uint16_t> g(2 * 128 * 8), m(128 * 64);
  float out[2];
  const auto* gp = reinterpret_cast<const cuda::bf16_t*>(g.data());
  const auto* mp = reinterpret_cast<const cuda::bf16_t*>(m.data());
  const auto over_n = cuda::token_chunk_bounds(128);
  cuda::SplitSpans spans;
  spans.g[0] = gp, spans.g_rows[0] = 8, spans.m[0] = mp, spans.m_rows[0] = 128;
  const cuda::SplitOuterSumGroup first{gp, mp, out, 8, over_n};
  const cuda::SplitOuterSumGroup other_out[2] = {first, {gp, mp, out + 1, 8, over_n}};
  const cuda::SplitOuterSumGroup other_rows[2] = {first, {gp, mp, out, 4, over_n}};
  const cuda::SplitOuterSumGroup three[3] = {first, first, first};
  const cuda::SplitOuterSumGroup same[2] = {first, first};
  // Each refusal for its own reason: the message names it.
  const auto refused_for = [](const std::function<void()>& call, const std::string& reason) {
    const std::string e = testing::error_of(call);
    return e.find(reason) != std::string::npos ? std::string() : "refused for another reason or not at all: " + e;
  };
  const auto tma = [&](const cuda::SplitOuterSumGroup* groups, int count, int columns) {
    // (A workspace, so the 128 x 256 tile is refused for its parts, not for the workspace.)
    return [=, &spans, &out] {
      cuda::outer_sum_split_tma_grouped(groups, count, 8, false, 128, 64, spans, out, nullptr, columns, 2);
    };
  };
  EXPECT_EQ(refused_for(tma(other_out, 2, 128), "must write the output of group 0"), "");
  EXPECT_EQ(refused_for(tma(other_rows, 2, 128), "with its I 8 (I 4)"), "");
  EXPECT_EQ(refused_for(tma(three, 3, 128), "2 parts, 3 groups"), "");
  EXPECT_EQ(refused_for(tma(same, 2, 256), "256 columns"), "");
  EXPECT_EQ(
      refused_for([&] { cuda::outer_sum_split_tma_grouped(same, 2, 8, true, 128, 64, spans, out, nullptr, 128, 2); },
                  "weight gradients"),
      "");
  EXPECT_EQ(refused_for(
                [&] {
                  cuda::outer_sum_split_grouped_wgmma(same, 2, 8, 128, 1, 64, nullptr, cuda::GradientOperand::bf16,
                                                      nullptr, 2);
                },
                "need the TMA tile"),
            "");
}

TEST(CudaOuterSumSplitTma, TakesTheBf16OperandAndInputChunksOfWholeSteps) {
  const auto bf16 = cuda::GradientOperand::bf16;
  const cuda::ChunkBounds tokens = cuda::token_chunk_bounds(100), over_128 = cuda::token_chunk_bounds(128),
                          over_192 = cuda::token_chunk_bounds(192);            // chunks of 24 rows
  EXPECT_TRUE(cuda::outer_sum_split_tma_applies(true, 64, 16, tokens, bf16));  // rows past a chunk are masked
  EXPECT_FALSE(cuda::outer_sum_split_tma_applies(true, 64, 16, tokens, cuda::GradientOperand::exact_hi_lo));
  EXPECT_FALSE(cuda::outer_sum_split_tma_applies(true, 60, 16, tokens, bf16));  // g's rows
  EXPECT_FALSE(cuda::outer_sum_split_tma_applies(true, 64, 12, tokens, bf16));  // K
  EXPECT_TRUE(cuda::outer_sum_split_tma_applies(false, 128, 16, over_128, bf16));
  EXPECT_FALSE(cuda::outer_sum_split_tma_applies(false, 192, 16, over_192, bf16));
}

TEST(CudaOuterSumSplitTma, RefusesGroupsOutsideTheSpansBeforeAnyWork) {
  // Host checks only: nothing reaches the device.
  std::vector<uint16_t> g(2 * 64 * 40), m(40 * 64);
  float out[1];
  const auto* gp = reinterpret_cast<const cuda::bf16_t*>(g.data());
  const auto* mp = reinterpret_cast<const cuda::bf16_t*>(m.data());
  const cuda::SplitOuterSumGroup inside{gp, mp, out, 64, cuda::token_chunk_bounds(40)};
  cuda::SplitSpans spans;
  spans.g[0] = gp, spans.g_rows[0] = 40, spans.m[0] = mp + 1, spans.m_rows[0] = 40;  // m starts before its span
  EXPECT_THROW(cuda::outer_sum_split_tma_grouped(&inside, 1, 64, true, 64, 64, spans, nullptr, nullptr),
               std::exception);
  spans.m[0] = mp;
  const cuda::SplitOuterSumGroup odd_row{gp + 3, mp, out, 64, cuda::token_chunk_bounds(8)};  // not a whole g row
  EXPECT_THROW(cuda::outer_sum_split_tma_grouped(&odd_row, 1, 64, true, 64, 64, spans, nullptr, nullptr),
               std::exception);
  EXPECT_THROW(cuda::outer_sum_split_tma_grouped(&inside, 1, 64, true, 64, 64, spans, nullptr, nullptr, 256),
               std::exception);  // the 128 x 256 tile without a workspace
  EXPECT_THROW(cuda::set_outer_sum_tma_cluster(4), std::exception);
  EXPECT_THROW(cuda::set_outer_sum_tma_cluster(0), std::exception);
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

// The wgmma tile refuses a device group table; the grouped form takes more groups than one
// launch holds (kMaxWgmmaGroups) in parts, each group's output the bits of its own call.
TEST(CudaOuterSumSplitTc, TheWgmmaTileRefusesADeviceGroupTableAndLaunchesManyGroupsInParts) {
  LS_SKIP_WITHOUT_GPU();
  DeviceVec<float> Workspace(cuda::outer_sum_split_workspace_floats());
  EXPECT_THROW(cuda::outer_sum_split_grouped_tc(nullptr, 1, 64, 1, 64, 64, nullptr, Workspace.get(),
                                                cuda::SplitTile::wgmma128x256),
               std::exception);
  const int count = cuda::kMaxWgmmaGroups + 1;
  const std::vector<uint16_t> g_bits = testing::random_bf16(64 * 8 * 2, 61), m_bits = testing::random_bf16(8 * 64, 62);
  std::vector<float> g_words(64 * 8);
  std::memcpy(g_words.data(), g_bits.data(), g_words.size() * 4);
  DeviceVec<float> G(g_words), Out(int64_t(count) * 64 * 64), One(64 * 64);
  DeviceVec<uint16_t> M(m_bits);
  std::vector<cuda::SplitOuterSumGroup> groups;
  for (int p = 0; p < count; ++p)
    groups.push_back({as_split(G), as_bf16(M), Out.get() + int64_t(p) * 64 * 64, 64, cuda::token_chunk_bounds(8)});
  cuda::outer_sum_split_grouped_wgmma(groups.data(), count, 64, 1, 64, 64, nullptr);
  const cuda::SplitOuterSumGroup single{as_split(G), as_bf16(M), One.get(), 64, cuda::token_chunk_bounds(8)};
  cuda::outer_sum_split_grouped_wgmma(&single, 1, 64, 1, 64, 64, nullptr);
  const auto all = Out.take(), one = One.take();
  for (int p = 0; p < count; ++p)
    EXPECT_EQ(std::memcmp(all.data() + size_t(p) * 64 * 64, one.data(), one.size() * 4), 0) << "group " << p;
}

}  // namespace
}  // namespace lockstep
