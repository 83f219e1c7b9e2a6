// The GPU backward kernels (kernels/cuda/backward.h) against their CPU references on random
// inputs: the ops without a transcendental function give the CPU's bits exactly (memcmp);
// the others agree to a few ulp of fp32. Plus the invariances the trainer relies on: a tile
// choice changes no bit, and a token's gradients do not depend on the other sequences of the
// micro-batch. The bf16 linears' tensor-core form: test_cuda_outer_sum_tc.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <random>

#include "cuda_test_util.h"
#include "kernels/canonical.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_backward.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/log_softmax_backward.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/moe_backward.h"
#include "kernels/cpu/reduce_backward.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/rope_backward.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/ops.h"

namespace lockstep {
namespace {

using testing::DeviceVec;
using testing::same_bits_f;
using bf16_bits = std::vector<uint16_t>;

std::vector<float> random_f32(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> out(static_cast<size_t>(n));
  for (auto& v : out) v = d(rng);
  return out;
}
std::vector<float> widen(const bf16_bits& b) {
  std::vector<float> out(b.size());
  for (size_t i = 0; i < b.size(); ++i) out[i] = bf16_to_f32(b[i]);
  return out;
}
const cuda::bf16_t* as_bf16(const DeviceVec<uint16_t>& v) { return reinterpret_cast<const cuda::bf16_t*>(v.get()); }

// Rows written packed (RowsOut::packed_bf16): each row's bf16 at the front of its own bytes are
// the fp32 rows rounded (what pack_bf16_rows makes of them); the count of rows that differ.
size_t packed_rows_differing(const std::vector<float>& packed, const std::vector<float>& rows_fp32, int64_t rows,
                             int64_t cols) {
  std::vector<uint16_t> halves(packed.size() * 2);
  std::memcpy(halves.data(), packed.data(), packed.size() * 4);
  size_t bad = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (halves[size_t(2 * cols * r + c)] != f32_to_bf16(rows_fp32[size_t(r * cols + c)])) {
        ++bad;
        break;
      }
  return bad;
}

// |got - want| within `ulps` fp32 ulps of the largest |want| (sums of many terms cancel, so
// an element's own magnitude is no scale for its rounding).
void expect_close(const std::vector<float>& got, const std::vector<float>& want, float ulps, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  float scale = 0.0f;
  for (float w : want) scale = std::max(scale, std::fabs(w));
  const float tol = ulps * scale * std::numeric_limits<float>::epsilon();
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(got[i] - want[i]) <= tol) && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: gpu " << got[i] << ", cpu " << want[i] << " (tolerance " << tol << ")";
  EXPECT_EQ(bad, 0u) << what;
}

struct LinearCase {
  int64_t T, N, K;
};

class CudaLinearBackward : public ::testing::TestWithParam<LinearCase> {};

TEST_P(CudaLinearBackward, CudaCoreSumsHaveTheCpuBitsAtEveryTile) {
  LS_SKIP_WITHOUT_GPU();
  const auto [T, N, K] = GetParam();
  const auto dy = random_f32(T * N, 1 + T);
  const bf16_bits x = testing::random_bf16(T * K, 2 + N), w = testing::random_bf16(N * K, 3 + K);
  DeviceVec<float> Dy(dy), DW(N * K), Dx(T * K);
  DeviceVec<uint16_t> X(x), W(w);

  std::vector<float> want_dw(N * K), want_dx(T * K);
  const cpu::TokenChunks chunks = cpu::token_chunks(T);
  cpu::linear_weight_grad(dy.data(), widen(x).data(), want_dw.data(), N, K, chunks);
  cpu::linear_input_grad(dy.data(), widen(w).data(), want_dx.data(), T, N, K);

  // The CUDA-core sums (the fp32 linears, and the reference of the tensor-core form that the
  // bf16 linears run: test_cuda_outer_sum_tc.cpp), at both tiles.
  for (const cuda::OuterTile tile : {cuda::OuterTile::k4x4, cuda::OuterTile::k1x1}) {
    DW.poison();
    cuda::outer_sum_chunked(Dy.get(), 1, N, as_bf16(X), K, cuda::token_chunk_bounds(T), DW.get(), N, nullptr, tile);
    EXPECT_TRUE(same_bits_f(DW.take(), want_dw)) << "weight grad";
    Dx.poison();
    cuda::outer_sum_chunked(Dy.get(), N, 1, as_bf16(W), K, cuda::token_chunk_bounds(N), Dx.get(), T, nullptr, tile);
    EXPECT_TRUE(same_bits_f(Dx.take(), want_dx)) << "input grad";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLinearBackward,
                         ::testing::Values(LinearCase{1, 8, 8}, LinearCase{37, 70, 45}, LinearCase{64, 128, 96},
                                           LinearCase{203, 33, 130}));

TEST(CudaBackwardOps, ChunkSubtreesAndColumnSumsHaveTheCpuBits) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 53, N = 40, K = 24, n = 300;
  const auto dy = random_f32(T * N, 4), x = random_f32(T * K, 5);
  // A sequence-parallel rank's run of two chunks: the subtree of its rows.
  const cpu::TokenChunks all = cpu::token_chunks(T);
  int64_t rows[3] = {0, all.rows[3] - all.rows[2], all.rows[4] - all.rows[2]};
  std::vector<float> want(N * K);
  cpu::linear_weight_grad_subtree(dy.data() + all.rows[2] * N, x.data() + all.rows[2] * K, want.data(), N, K, rows, 2);
  cuda::ChunkBounds b;
  b.count = 2;
  std::copy(rows, rows + 3, b.rows);
  DeviceVec<float> Dy(std::vector<float>(dy.begin() + all.rows[2] * N, dy.end())),
      X(std::vector<float>(x.begin() + all.rows[2] * K, x.end())), DW(N * K);
  cuda::linear_weight_grad(Dy.get(), X.get(), DW.get(), N, K, b, nullptr);
  EXPECT_TRUE(same_bits_f(DW.take(), want));

  const auto a = random_f32(T * n, 6), c = random_f32(T * n, 7);
  std::vector<float> want_sum(n), want_prod(n);
  cpu::column_sum_chunked(a.data(), nullptr, want_sum.data(), n, all.rows, kTMax);
  cpu::column_sum_chunked(a.data(), c.data(), want_prod.data(), n, all.rows, kTMax);
  DeviceVec<float> A(a), C(c), Out(n);
  cuda::column_sum_chunked(A.get(), nullptr, Out.get(), n, cuda::chunk_bounds(all), nullptr);
  EXPECT_TRUE(same_bits_f(Out.take(), want_sum));
  cuda::column_sum_chunked(A.get(), C.get(), Out.get(), n, cuda::chunk_bounds(all), nullptr);
  EXPECT_TRUE(same_bits_f(Out.take(), want_prod));
}

TEST(CudaBackwardOps, InverseRmsIsTheForwardsAndRmsnormBackwardMatchesTheCpu) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t rows = 29, n = 2048;
  const float eps = 1e-6f;
  const bf16_bits x = testing::random_bf16(rows * n, 8);
  const auto w = random_f32(n, 9), dout = random_f32(rows * n, 10);
  DeviceVec<uint16_t> X(x), Y(rows * n);
  DeviceVec<float> Wt(w), Inv(rows), Dout(dout), Dx(rows * n), Dw(n);
  cuda::inverse_rms_rows(as_bf16(X), Inv.get(), rows, n, eps, 256, nullptr);
  cuda::rmsnorm(as_bf16(X), Wt.get(), reinterpret_cast<cuda::bf16_t*>(Y.get()), rows, n, eps, nullptr);
  // The forward's output from the backward's inv: the same bits, so the backward
  // differentiates exactly what the forward computed.
  const auto inv = Inv.take();
  const auto y = Y.take();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[r * n + i]) * inv[r]));
      ASSERT_EQ(f32_to_bf16(w[i] * normed), y[r * n + i]) << "row " << r << " element " << i;
    }
  DeviceVec<float> Partials(8 * n);
  cuda::rmsnorm_backward(as_bf16(X), Inv.get(), Wt.get(), Dout.get(), Dx.get(), Dw.get(), Partials.get(), rows, n, true,
                         cuda::token_chunk_bounds(rows), nullptr);
  std::vector<float> want_dx(rows * n), want_dw(n);
  cpu::rmsnorm_backward(widen(x).data(), w.data(), dout.data(), want_dx.data(), want_dw.data(), rows, n, eps, true,
                        cpu::token_chunks(rows));
  expect_close(Dx.take(), want_dx, 16, "dx");
  expect_close(Dw.take(), want_dw, 16, "dw");
}

// rmsnorm_backward's procedure written out on the host from the GPU's own inv, bit for bit: dx
// by the CPU's dot procedure (8 lanes, tree8), dw by each chunk's ascending sum of
// dout * bf16(x * inv) and the chunk tree. q_norm's shape (many short rows, chunks of heads) and
// the hidden norm's (few long rows, some chunks empty), the fixture's head size.
TEST(CudaBackwardOps, RmsnormBackwardIsItsProcedureBitForBit) {
  LS_SKIP_WITHOUT_GPU();
  struct Case {
    int64_t tokens, heads, n;
  };
  // (n 16: a block's columns past n; n 20: not whole 16-byte pieces, the unstreamed kernel;
  // 2100 x 4 heads: chunks of several whole tiles of the 8-column blocks; 2000 x 1024: the
  // 32-column blocks, chunks of several tiles.)
  for (const Case cs : {Case{777, 4, 128}, Case{2100, 4, 128}, Case{5, 1, 2048}, Case{2000, 1, 1024}, Case{300, 1, 96},
                        Case{9, 2, 16}, Case{40, 1, 20}}) {
    const int64_t rows = cs.tokens * cs.heads, n = cs.n;
    const bf16_bits x = testing::random_bf16(rows * n, 21 + n);
    const auto w = random_f32(n, 22), dout = random_f32(rows * n, 23);
    DeviceVec<uint16_t> X(x);
    DeviceVec<float> Wt(w), Inv(rows), Dout(dout), Dx(rows * n), Dw(n);
    cuda::inverse_rms_rows(as_bf16(X), Inv.get(), rows, n, 1e-6f, n == 128 ? 32 : 256, nullptr);
    const cuda::ChunkBounds chunks = cuda::token_chunk_bounds(cs.tokens, cs.heads);
    DeviceVec<float> Partials(8 * n);
    cuda::rmsnorm_backward(as_bf16(X), Inv.get(), Wt.get(), Dout.get(), Dx.get(), Dw.get(), Partials.get(), rows, n,
                           true, chunks, nullptr);
    const auto inv = Inv.take();
    std::vector<float> want_dx(rows * n), want_dw(n), partial(8);
    for (int64_t r = 0; r < rows; ++r) {
      float lanes[8] = {};
      for (int64_t i = 0; i < n; ++i) lanes[i % 8] += (w[i] * dout[r * n + i]) * bf16_to_f32(x[r * n + i]);
      const float sum =
          ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      const float coef = inv[r] * inv[r] * inv[r] * sum / float(n);
      for (int64_t i = 0; i < n; ++i)
        want_dx[r * n + i] = inv[r] * (w[i] * dout[r * n + i]) - bf16_to_f32(x[r * n + i]) * coef;
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int c = 0; c < chunks.count; ++c) {
        float acc = 0.0f;
        for (int64_t r = chunks.rows[c]; r < chunks.rows[c + 1]; ++r)
          acc += dout[r * n + i] * bf16_to_f32(f32_to_bf16(bf16_to_f32(x[r * n + i]) * inv[r]));
        partial[c] = acc;
      }
      want_dw[i] = pairwise_tree(partial.data(), chunks.count);
    }
    EXPECT_TRUE(same_bits_f(Dx.take(), want_dx)) << rows << " rows of " << n << ": dx";
    EXPECT_TRUE(same_bits_f(Dw.take(), want_dw)) << rows << " rows of " << n << ": dw";
    // add_to_dx: the gradient added to what dx held (a residual stream's), one fp32 addition.
    const auto held = random_f32(rows * n, 24);
    DeviceVec<float> Sum(held);
    cuda::rmsnorm_backward(as_bf16(X), Inv.get(), Wt.get(), Dout.get(), Sum.get(), Dw.get(), Partials.get(), rows, n,
                           true, chunks, nullptr, true);
    std::vector<float> want_sum(held.size());
    for (size_t i = 0; i < held.size(); ++i) want_sum[i] = held[i] + want_dx[i];
    EXPECT_TRUE(same_bits_f(Sum.take(), want_sum)) << rows << " rows of " << n << ": dx added";
    // The weight gradient in 8-column blocks (where the 32-column ones leave SMs idle): its bits.
    const bool before = cuda::rmsnorm_narrow_dw_blocks();
    cuda::set_rmsnorm_narrow_dw_blocks(!before);
    DeviceVec<float> Dw2(n);
    cuda::rmsnorm_weight_grad(as_bf16(X), 1, n, Inv.get(), Dout.get(), Dw2.get(), Partials.get(), n, true, chunks,
                              nullptr);
    cuda::set_rmsnorm_narrow_dw_blocks(before);
    EXPECT_TRUE(same_bits_f(Dw2.take(), want_dw)) << rows << " rows of " << n << ": dw, narrow blocks " << !before;
  }
}

TEST(CudaBackwardOps, HeadNormInverseRmsIsTheForwards) {
  LS_SKIP_WITHOUT_GPU();
  // q_norm/k_norm run per head by one warp (qk_norm_rope_store); rebuild q from inv and
  // compare with the forward's q at position 0 (where RoPE is the identity).
  const int64_t T = 5, nq = 4, nkv = 2, D = 128;
  const float eps = 1e-6f;
  const bf16_bits qkv = testing::random_bf16(T * (nq + 2 * nkv) * D, 11);
  const auto qn = random_f32(D, 12), kn = random_f32(D, 13);
  cpu::RopeTable rope = cpu::RopeTable::build(D, 8, 10000.0);
  DeviceVec<uint16_t> Qkv(qkv), Q(T * nq * D), K(8 * nkv * D), V(8 * nkv * D), Heads(T * nq * D);
  DeviceVec<float> Qn(qn), Kn(kn), Cos(rope.cos), Sin(rope.sin), Inv(T * nq);
  std::vector<int32_t> pos(T, 0), seq(T), table(T);
  std::iota(seq.begin(), seq.end(), 0);
  std::iota(table.begin(), table.end(), 0);
  DeviceVec<int32_t> Pos(pos), Seq(seq), Table(table), Stride(std::vector<int32_t>{1});
  cuda::DeviceKvLayer kv{reinterpret_cast<cuda::bf16_t*>(K.get()), reinterpret_cast<cuda::bf16_t*>(V.get()), 1, nkv, D};
  cuda::DeviceSlots slots;
  slots.positions = Pos.get();
  slots.seq_of_token = Seq.get();
  slots.page_tables = Table.get();
  slots.table_stride = Stride.get();
  cuda::qk_norm_rope_store(as_bf16(Qkv), Qn.get(), Kn.get(), Cos.get(), Sin.get(),
                           reinterpret_cast<cuda::bf16_t*>(Q.get()), kv, slots, T, nq, nkv, D, eps, nullptr);
  // The q heads as rows [T * nq, D].
  bf16_bits heads(T * nq * D);
  for (int64_t t = 0; t < T; ++t) std::copy_n(qkv.begin() + t * (nq + 2 * nkv) * D, nq * D, heads.begin() + t * nq * D);
  Heads.put(heads);
  cuda::inverse_rms_rows(as_bf16(Heads), Inv.get(), T * nq, D, eps, 32, nullptr);
  const auto inv = Inv.take();
  const auto q = Q.take();
  for (int64_t r = 0; r < T * nq; ++r)
    for (int64_t i = 0; i < D; ++i) {
      const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(heads[r * D + i]) * inv[r]));
      const float weighted = bf16_to_f32(f32_to_bf16(qn[i] * normed));
      ASSERT_EQ(f32_to_bf16(weighted * 1.0f - 0.0f), q[r * D + i]) << "head row " << r << " element " << i;
    }
}

// The fused q/k-norm + RoPE backward against the passes it replaces (rope_backward, a
// contiguous copy of the heads, inverse_rms_rows, rmsnorm_backward), bit for bit: dq after
// RoPE's backward, inv, d proj and the weight gradient read in place from the qkv rows.
TEST(CudaBackwardOps, QkNormRopeBackwardIsThePassesItFuses) {
  LS_SKIP_WITHOUT_GPU();
  struct Case {
    int64_t tokens, heads, other, D;
  };
  for (const Case cs : {Case{301, 4, 2, 128}, Case{37, 2, 3, 64}, Case{9, 1, 1, 256}}) {
    const int64_t T = cs.tokens, D = cs.D, rows = T * cs.heads;
    const int64_t pitch = (cs.heads + cs.other) * D, first = cs.other * D / 2;  // the heads after other values
    const bf16_bits qkv = testing::random_bf16(T * pitch, 31 + D, 3.0f);
    const auto w = random_f32(D, 32), dq = random_f32(rows * D, 33);
    const cpu::RopeTable rope = cpu::RopeTable::build(D, 512, 1000000.0);
    std::vector<int32_t> pos(T);
    for (int64_t t = 0; t < T; ++t) pos[t] = int32_t((t * 37 + 5) % 512);
    bf16_bits heads(rows * D);
    for (int64_t t = 0; t < T; ++t)
      std::copy_n(qkv.begin() + t * pitch + first, cs.heads * D, heads.begin() + t * cs.heads * D);
    const cuda::ChunkBounds chunks = cuda::token_chunk_bounds(T, cs.heads);
    DeviceVec<uint16_t> Qkv(qkv), Heads(heads);
    DeviceVec<float> Wt(w), Cos(rope.cos), Sin(rope.sin), Partials(8 * D);
    DeviceVec<int32_t> Pos(pos);
    DeviceVec<float> WantDq(dq), WantInv(rows), WantDx(rows * D), WantDw(D);
    cuda::rope_backward(WantDq.get(), Pos.get(), Cos.get(), Sin.get(), T, cs.heads, D, nullptr);
    cuda::inverse_rms_rows(as_bf16(Heads), WantInv.get(), rows, D, 1e-6f, 32, nullptr);
    cuda::rmsnorm_backward(as_bf16(Heads), WantInv.get(), Wt.get(), WantDq.get(), WantDx.get(), WantDw.get(),
                           Partials.get(), rows, D, true, chunks, nullptr);
    DeviceVec<float> Dq(dq), Inv(rows), Dx(rows * D), Dw(D);
    cuda::qk_norm_rope_backward(Dq.get(), as_bf16(Qkv) + first, pitch, Pos.get(), Cos.get(), Sin.get(), Wt.get(),
                                Inv.get(), Dx.get(), T, cs.heads, D, 1e-6f, nullptr);
    cuda::rmsnorm_weight_grad(as_bf16(Qkv) + first, cs.heads, pitch, Inv.get(), Dq.get(), Dw.get(), Partials.get(), D,
                              true, chunks, nullptr);
    const std::string at = std::to_string(rows) + " rows of " + std::to_string(D) + ": ";
    EXPECT_TRUE(same_bits_f(Dq.take(), WantDq.take())) << at << "dq after RoPE";
    EXPECT_TRUE(same_bits_f(Inv.take(), WantInv.take())) << at << "inv";
    EXPECT_TRUE(same_bits_f(Dx.take(), WantDx.take())) << at << "d proj";
    EXPECT_TRUE(same_bits_f(Dw.take(), WantDw.take())) << at << "dw";
  }
}

TEST(CudaBackwardOps, SwigluRopeAndEmbeddingBackward) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t R = 41, I = 96;
  const bf16_bits gu = testing::random_bf16(R * 2 * I, 14, 4.0f);
  const auto dout = random_f32(R * I, 15);
  DeviceVec<uint16_t> Gu(gu);
  DeviceVec<float> Dout(dout), Dg(R * I), Du(R * I);
  cuda::swiglu_backward(as_bf16(Gu), Dout.get(), Dg.get(), Du.get(), R, I, nullptr);
  std::vector<float> gate(R * I), up(R * I), want_dg(R * I), want_du(R * I);
  const auto guf = widen(gu);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < I; ++i) gate[r * I + i] = guf[r * 2 * I + i], up[r * I + i] = guf[r * 2 * I + I + i];
  cpu::swiglu_backward(gate.data(), up.data(), dout.data(), want_dg.data(), want_du.data(), R * I);
  const auto dg = Dg.take(), du = Du.take();
  expect_close(dg, want_dg, 8, "dgate");
  expect_close(du, want_du, 8, "dup");
  DeviceVec<float> PackedDg(R * I), PackedDu(R * I);
  cuda::swiglu_backward(as_bf16(Gu), Dout.get(), PackedDg.get(), PackedDu.get(), R, I, nullptr,
                        cuda::RowsOut::packed_bf16);
  EXPECT_EQ(packed_rows_differing(PackedDg.take(), dg, R, I), 0u) << "dgate packed";
  EXPECT_EQ(packed_rows_differing(PackedDu.take(), du, R, I), 0u) << "dup packed";

  const int64_t T = 19, heads = 3, D = 64;
  cpu::RopeTable rope = cpu::RopeTable::build(D, 64, 1000000.0);
  std::vector<int32_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = int32_t((t * 7) % 64);
  auto dx = random_f32(T * heads * D, 16);
  DeviceVec<float> Dx(dx), Cos(rope.cos), Sin(rope.sin);
  DeviceVec<int32_t> Pos(pos);
  cuda::rope_backward(Dx.get(), Pos.get(), Cos.get(), Sin.get(), T, heads, D, nullptr);
  cpu::rope_backward(dx.data(), pos.data(), T, heads, rope);
  EXPECT_TRUE(same_bits_f(Dx.take(), dx)) << "rope";

  const int64_t V = 50, H = 70, N = 45;
  std::vector<int32_t> ids(N);
  std::mt19937_64 rng(17);
  for (auto& id : ids) id = int32_t(rng() % 12 * 4);  // some ids repeat, most rows unused
  const auto demb = random_f32(N * H, 18);
  std::map<int32_t, std::vector<int32_t>> by_id;
  for (int64_t t = 0; t < N; ++t) by_id[ids[t]].push_back(int32_t(t));
  std::vector<int32_t> used, starts{0}, toks;
  for (const auto& [id, list] : by_id) {
    used.push_back(id);
    toks.insert(toks.end(), list.begin(), list.end());
    starts.push_back(int32_t(toks.size()));
  }
  DeviceVec<int32_t> Used(used), Starts(starts), Toks(toks);
  DeviceVec<float> Demb(demb), Table(V * H);
  Table.poison();
  cuda::embedding_backward(Used.get(), Starts.get(), Toks.get(), int64_t(used.size()), Demb.get(), Table.get(), N, V, H,
                           nullptr);
  std::vector<float> want(V * H);
  cpu::embedding_backward(ids.data(), demb.data(), want.data(), N, V, H);
  EXPECT_TRUE(same_bits_f(Table.take(), want)) << "embedding";
}

// The MoE block's row kernels around the experts' GEMMs, bit for bit against the host: the
// gather (16-byte pieces when the rows allow, else elements), the combine's backward (its dot
// the CPU's procedure) and the in-order sum of a token's rows; widths with and without a
// multiple of 8.
TEST(CudaBackwardOps, ExpertRowKernelsHaveTheHostsBits) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 37, k = 3;
  for (const int64_t H : {int64_t(2048), int64_t(1536), int64_t(70), int64_t(12)}) {
    const int64_t rows = T * k;
    std::mt19937_64 rng{static_cast<uint64_t>(H)};
    std::vector<int32_t> row_pair(rows), row_token(rows), index(rows);
    std::iota(row_pair.begin(), row_pair.end(), 0);
    std::shuffle(row_pair.begin(), row_pair.end(), rng);
    for (int64_t r = 0; r < rows; ++r) row_token[r] = row_pair[r] / int32_t(k), index[r] = int32_t(rng() % rows);
    const bf16_bits src = testing::random_bf16(rows * H, 40 + H, 3.0f), y = testing::random_bf16(rows * H, 41 + H);
    const auto dout = random_f32(T * H, 42 + H), weights = random_f32(rows, 43 + H);
    DeviceVec<uint16_t> Src(src), Dst(rows * H), Y(y);
    DeviceVec<int32_t> Index(index), RowToken(row_token), RowPair(row_pair);
    DeviceVec<float> Dout(dout), Weights(weights), Dweights(rows), DyRows(rows * H);
    Dst.poison(), Dweights.poison(), DyRows.poison();
    cuda::gather_rows(as_bf16(Src), Index.get(), reinterpret_cast<cuda::bf16_t*>(Dst.get()), rows, H, nullptr);
    cuda::expert_output_backward(Dout.get(), as_bf16(Y), Weights.get(), RowToken.get(), RowPair.get(), Dweights.get(),
                                 DyRows.get(), rows, H, nullptr);
    bf16_bits want_dst(rows * H);
    std::vector<float> want_dw(rows), want_dy(rows * H);
    const auto yf = widen(y);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(src.begin() + index[r] * H, H, want_dst.begin() + r * H);
      const int64_t t = row_token[r], pair = row_pair[r];
      want_dw[pair] = cpu::dot(dout.data() + t * H, yf.data() + pair * H, H);
      for (int64_t h = 0; h < H; ++h) want_dy[r * H + h] = weights[pair] * dout[t * H + h];
    }
    EXPECT_EQ(Dst.take(), want_dst) << "gather_rows, H " << H;
    EXPECT_TRUE(same_bits_f(Dweights.take(), want_dw)) << "expert_output_backward dweights, H " << H;
    EXPECT_TRUE(same_bits_f(DyRows.take(), want_dy)) << "expert_output_backward dy rows, H " << H;
    DeviceVec<float> PackedRows(rows * H);
    cuda::expert_output_backward(Dout.get(), as_bf16(Y), Weights.get(), RowToken.get(), RowPair.get(), Dweights.get(),
                                 PackedRows.get(), rows, H, nullptr, cuda::RowsOut::packed_bf16);
    EXPECT_EQ(packed_rows_differing(PackedRows.take(), want_dy, rows, H), 0u) << "dy rows packed, H " << H;

    // A token's k rows, each slot's row at order[t k + j], added to dh in j order.
    std::vector<int32_t> order(rows);
    for (int64_t r = 0; r < rows; ++r) order[row_pair[r]] = int32_t(r);
    // The combine's backward token by token (its rows through `order`): the same bits.
    DeviceVec<int32_t> ByToken(order);
    Dweights.poison(), DyRows.poison(), PackedRows.poison();
    cuda::expert_output_backward(Dout.get(), as_bf16(Y), Weights.get(), RowToken.get(), RowPair.get(), Dweights.get(),
                                 DyRows.get(), rows, H, nullptr, cuda::RowsOut::fp32, ByToken.get(), k);
    EXPECT_TRUE(same_bits_f(Dweights.take(), want_dw)) << "by token: dweights, H " << H;
    EXPECT_TRUE(same_bits_f(DyRows.take(), want_dy)) << "by token: dy rows, H " << H;
    cuda::expert_output_backward(Dout.get(), as_bf16(Y), Weights.get(), RowToken.get(), RowPair.get(), Dweights.get(),
                                 PackedRows.get(), rows, H, nullptr, cuda::RowsOut::packed_bf16, ByToken.get(), k);
    EXPECT_EQ(packed_rows_differing(PackedRows.take(), want_dy, rows, H), 0u) << "by token: dy rows packed, H " << H;
    EXPECT_THROW(cuda::expert_output_backward(Dout.get(), as_bf16(Y), Weights.get(), RowToken.get(), RowPair.get(),
                                              Dweights.get(), DyRows.get(), rows, H, nullptr, cuda::RowsOut::fp32,
                                              ByToken.get(), 2),
                 std::exception)
        << "k 2 does not divide " << rows << " rows";
    // With a second part, each row is the sum of its parts first (add_inplace's additions).
    const auto dh = random_f32(T * H, 44 + H), part = random_f32(rows * H, 45 + H),
               second = random_f32(rows * H, 46 + H);
    DeviceVec<float> Dh(dh), Part(part), Second(second), Dh2(dh);
    DeviceVec<int32_t> Order(order);
    cuda::add_rows_in_order(Dh.get(), Part.get(), nullptr, Order.get(), T, k, H, nullptr);
    cuda::add_rows_in_order(Dh2.get(), Part.get(), Second.get(), Order.get(), T, k, H, nullptr);
    std::vector<float> want_dh = dh, want_dh2 = dh;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        float acc = want_dh[t * H + h], acc2 = acc;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t at = order[t * k + j] * H + h;
          acc = acc + part[at];
          acc2 = acc2 + (part[at] + second[at]);
        }
        want_dh[t * H + h] = acc, want_dh2[t * H + h] = acc2;
      }
    EXPECT_TRUE(same_bits_f(Dh2.take(), want_dh2)) << "add_rows_in_order of two parts, H " << H;
    EXPECT_TRUE(same_bits_f(Dh.take(), want_dh)) << "add_rows_in_order, H " << H;
  }
}

TEST(CudaBackwardOps, RouterAndLogSoftmaxBackward) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 23, E = 128, k = 8;
  const auto logits = random_f32(T * E, 19, 3.0f), dweights = random_f32(T * k, 20);
  for (bool normalize : {true, false}) {
    std::vector<int32_t> ids(T * k);
    std::vector<float> weights(T * k), want(T * E);
    cpu::route_topk(logits.data(), T, E, k, normalize, ids.data(), weights.data());
    cpu::route_topk_backward(logits.data(), ids.data(), weights.data(), dweights.data(), want.data(), T, E, k,
                             normalize);
    DeviceVec<float> L(logits), W(weights), Dw(dweights), Out(T * E);
    DeviceVec<int32_t> Ids(ids);
    cuda::route_topk_backward(L.get(), Ids.get(), W.get(), Dw.get(), Out.get(), T, E, k, normalize, nullptr);
    expect_close(Out.take(), want, 16, normalize ? "router (normalized)" : "router");
  }

  const int64_t R = 7, Vocab = 1001;
  const auto z = random_f32(R * Vocab, 21, 8.0f), dlogp = random_f32(R, 22), dent = random_f32(R, 23);
  std::vector<int32_t> targets(R);
  for (int64_t r = 0; r < R; ++r) targets[r] = int32_t((r * 137) % Vocab);
  DeviceVec<float> Z(z), Lse(R), Dlogp(dlogp), Dent(dent), Ent(R), Dz(R * Vocab);
  DeviceVec<int32_t> Tg(targets);
  cuda::log_normalizer_rows(Z.get(), Lse.get(), R, Vocab, nullptr);
  // The backward's normaliser is the score path's: logits[target] - lse = log_softmax_gather.
  DeviceVec<float> Logp(R);
  cuda::log_softmax_gather(Z.get(), Tg.get(), Logp.get(), R, Vocab, nullptr);
  const auto lse = Lse.take(), logp = Logp.take();
  for (int64_t r = 0; r < R; ++r) EXPECT_EQ(z[r * Vocab + targets[r]] - lse[r], logp[r]) << "row " << r;
  // The trainer's gather from that lse: the same bits, NaN where a row has no target.
  std::vector<int32_t> some_targets = targets;
  some_targets[2] = -1;
  DeviceVec<int32_t> SomeTg(some_targets);
  DeviceVec<float> Gathered(R), Scored(R);
  cuda::gather_log_probs(Z.get(), Lse.get(), SomeTg.get(), Gathered.get(), R, Vocab, nullptr);
  cuda::log_softmax_gather(Z.get(), SomeTg.get(), Scored.get(), R, Vocab, nullptr);
  const auto gathered = Gathered.take(), scored = Scored.take();
  EXPECT_EQ(std::memcmp(gathered.data(), scored.data(), size_t(R) * 4), 0);
  EXPECT_TRUE(std::isnan(gathered[2]));
  cuda::softmax_entropy(Z.get(), Lse.get(), Ent.get(), R, Vocab, nullptr);
  std::vector<float> want_ent(R), want_dz(R * Vocab);
  cpu::softmax_entropy(z.data(), want_ent.data(), R, Vocab);
  const auto ent = Ent.take();
  expect_close(ent, want_ent, 16, "entropy");
  cuda::log_softmax_gather_backward(Z.get(), Lse.get(), Tg.get(), Dlogp.get(), Dent.get(), Ent.get(), Dz.get(), R,
                                    Vocab, nullptr);
  cpu::log_softmax_gather_backward(z.data(), targets.data(), dlogp.data(), dent.data(), ent.data(), want_dz.data(), R,
                                   Vocab);
  expect_close(Dz.take(), want_dz, 16, "dlogits");
}

// The packed form of the log-softmax backward (the trainer's head): each row's bf16 d logits
// at the front of its bytes are those of the fp32 kernel then pack_bf16_rows, with and without
// the entropy term, over rows longer than a block's segment and rows without a target.
TEST(CudaBackwardOps, LogSoftmaxBackwardPackedIsTheTwoCallsBitForBit) {
  LS_SKIP_WITHOUT_GPU();
  struct Case {
    int64_t R, V;
    bool entropy;
  };
  for (const Case c : {Case{7, 1000, false}, Case{7, 1000, true}, Case{3, 4104, true}, Case{300, 8, false}}) {
    const auto z = random_f32(c.R * c.V, 31 + c.V, 8.0f), dlogp = random_f32(c.R, 32), dent = random_f32(c.R, 33);
    std::vector<int32_t> targets(c.R);
    for (int64_t r = 0; r < c.R; ++r) targets[r] = r % 3 == 2 ? -1 : int32_t((r * 137 + 5) % c.V);
    DeviceVec<float> Z(z), Lse(c.R), Ent(c.R), Dlogp(dlogp), Dent(dent), TwoCalls(c.R * c.V), Packed(z);
    DeviceVec<int32_t> Tg(targets);
    cuda::log_normalizer_rows(Z.get(), Lse.get(), c.R, c.V, nullptr);
    cuda::softmax_entropy(Z.get(), Lse.get(), Ent.get(), c.R, c.V, nullptr);
    const float* de = c.entropy ? Dent.get() : nullptr;
    const float* ent = c.entropy ? Ent.get() : nullptr;
    cuda::log_softmax_gather_backward(Z.get(), Lse.get(), Tg.get(), Dlogp.get(), de, ent, TwoCalls.get(), c.R, c.V,
                                      nullptr);
    cuda::pack_bf16_rows(TwoCalls.get(), c.R, c.V, nullptr);
    cuda::log_softmax_gather_backward_packed(Packed.get(), Lse.get(), Tg.get(), Dlogp.get(), de, ent, c.R, c.V,
                                             nullptr);
    const auto want = TwoCalls.take(), got = Packed.take();
    size_t bad = 0;
    for (int64_t r = 0; r < c.R; ++r)  // the packed halves only: the rest of a row is left as it was
      if (std::memcmp(&got[size_t(r * c.V)], &want[size_t(r * c.V)], size_t(c.V) * 2) != 0 && bad++ < 5)
        ADD_FAILURE() << c.R << " x " << c.V << (c.entropy ? " with" : " without") << " entropy: row " << r;
    EXPECT_EQ(bad, 0u);
  }
  DeviceVec<float> Odd(12), Lse(1), Dlogp(1);
  DeviceVec<int32_t> Tg(std::vector<int32_t>{0});
  EXPECT_THROW(cuda::log_softmax_gather_backward_packed(Odd.get(), Lse.get(), Tg.get(), Dlogp.get(), nullptr, nullptr,
                                                        1, 12, nullptr),
               std::exception);
}

// Whole sequences in a shuffled page pool; the CPU reference reads a widened copy.
struct AttentionStep {
  int64_t D = 64, nq = 4, nkv = 2, page = 16;
  std::vector<int64_t> lens;
  std::vector<int32_t> pos, seq, tables, seq_first, seq_tokens;
  int64_t stride = 0, pages = 0;
  bf16_bits k, v;

  AttentionStep(std::vector<int64_t> l, uint64_t seed, int64_t head_dim = 64) : D(head_dim), lens(std::move(l)) {
    const int64_t S = int64_t(lens.size());
    for (int64_t n : lens) stride = std::max(stride, (n + page - 1) / page);
    pages = S * stride;
    tables.resize(size_t(pages));
    std::iota(tables.begin(), tables.end(), 0);
    std::mt19937_64 rng(seed);
    std::shuffle(tables.begin(), tables.end(), rng);
    seq_first.push_back(0);
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t p = 0; p < lens[s]; ++p) {
        seq_tokens.push_back(int32_t(pos.size()));
        pos.push_back(int32_t(p));
        seq.push_back(int32_t(s));
      }
      seq_first.push_back(int32_t(pos.size()));
    }
    k = testing::random_bf16(pages * page * nkv * D, seed + 1, 2.0f);
    v = testing::random_bf16(pages * page * nkv * D, seed + 2);
  }
  int64_t T() const { return int64_t(pos.size()); }
};

struct AttentionGrads {
  std::vector<float> dq, dk, dv, lse;
};

// The CUDA-core kernels, or (tensor_cores) those of attention_backward_tc.cu, `kernel` choosing
// between mma.sync and warpgroup MMA; with given_lse, the tensor-core kernels take it as the
// rows' log-sum-exp instead of computing it; ds_elems > 0: a dS scratch of that many elements.
AttentionGrads gpu_attention_backward(const AttentionStep& a, const bf16_bits& q, const bf16_bits& out,
                                      const std::vector<float>& dout, bool tensor_cores = false,
                                      cuda::AttentionKernel kernel = cuda::AttentionKernel::automatic,
                                      const std::vector<float>* given_lse = nullptr, int64_t ds_elems = 0) {
  const int64_t T = a.T();
  DeviceVec<uint16_t> K(a.k), V(a.v), Q(q), O(out);
  DeviceVec<float> Dout(dout), Lse(given_lse ? *given_lse : std::vector<float>(size_t(T * a.nq))), Delta(T * a.nq),
      Dq(T * a.nq * a.D), Dk(T * a.nkv * a.D), Dv(T * a.nkv * a.D);
  DeviceVec<uint16_t> DoutBf16(T * a.nq * a.D);
  DeviceVec<int32_t> Pos(a.pos), Seq(a.seq), Tables(a.tables), Stride(std::vector<int32_t>{int32_t(a.stride)}),
      First(a.seq_first), Toks(a.seq_tokens);
  cuda::DeviceKvLayer kv{reinterpret_cast<cuda::bf16_t*>(K.get()), reinterpret_cast<cuda::bf16_t*>(V.get()), a.page,
                         a.nkv, a.D};
  cuda::DeviceSlots slots;
  slots.positions = Pos.get();
  slots.seq_of_token = Seq.get();
  slots.page_tables = Tables.get();
  slots.table_stride = Stride.get();
  const float scale = 1.0f / std::sqrt(float(a.D));
  DeviceVec<uint16_t> Ds(std::max<int64_t>(ds_elems, 1));
  Ds.poison();  // every tile the dq kernel reads is written first
  const cuda::AttentionDsScratch ds{ds_elems > 0 ? reinterpret_cast<cuda::bf16_t*>(Ds.get()) : nullptr, ds_elems};
  if (tensor_cores)
    cuda::paged_attention_backward_tc(as_bf16(Q), as_bf16(O), Dout.get(), kv, slots, First.get(), Toks.get(), T, a.nq,
                                      int64_t(a.lens.size()), *std::max_element(a.lens.begin(), a.lens.end()), scale,
                                      Lse.get(), Delta.get(), reinterpret_cast<cuda::bf16_t*>(DoutBf16.get()), Dq.get(),
                                      Dk.get(), Dv.get(), nullptr, kernel, given_lse != nullptr, ds);
  else
    cuda::paged_attention_backward(as_bf16(Q), as_bf16(O), Dout.get(), kv, slots, First.get(), Toks.get(), T, a.nq,
                                   scale, Lse.get(), Delta.get(), Dq.get(), Dk.get(), Dv.get(), nullptr);
  return {Dq.take(), Dk.take(), Dv.take(), Lse.take()};
}

AttentionGrads cpu_attention_backward(const AttentionStep& a, const bf16_bits& q, const bf16_bits& out,
                                      const std::vector<float>& dout) {
  const int64_t T = a.T();
  std::vector<float> kf = widen(a.k), vf = widen(a.v);
  PagedKvLayer kv{kf.data(), vf.data(), a.pages, a.page, a.nkv, a.D};
  std::vector<const int32_t*> table_of(T);
  for (int64_t t = 0; t < T; ++t) table_of[t] = a.tables.data() + a.seq[t] * a.stride;
  TokenSlots slots{a.pos.data(), table_of.data()};
  AttentionGrads want{
      std::vector<float>(T * a.nq * a.D), std::vector<float>(T * a.nkv * a.D), std::vector<float>(T * a.nkv * a.D), {}};
  cpu::paged_attention_backward(widen(q).data(), widen(out).data(), dout.data(), kv, slots, T, a.nq,
                                1.0f / std::sqrt(float(a.D)), want.dq.data(), want.dk.data(), want.dv.data());
  return want;
}

TEST(CudaBackwardOps, AttentionBackwardMatchesTheCpu) {
  LS_SKIP_WITHOUT_GPU();
  AttentionStep a({70, 5, 130}, 24);
  const int64_t T = a.T();
  const bf16_bits q = testing::random_bf16(T * a.nq * a.D, 25), out = testing::random_bf16(T * a.nq * a.D, 26);
  const auto dout = random_f32(T * a.nq * a.D, 27);
  const AttentionGrads got = gpu_attention_backward(a, q, out, dout);
  const AttentionGrads want = cpu_attention_backward(a, q, out, dout);
  expect_close(got.dq, want.dq, 64, "dq");
  expect_close(got.dk, want.dk, 64, "dk");
  expect_close(got.dv, want.dv, 64, "dv");
}

// The tensor-core form: P, dS and dout rounded to bf16 (2^-9 each) put each gradient within a
// few 2^-9 of the fp32 value; an error in a fragment's layout or a mask is of order 1.
void expect_bf16_close(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  double err = 0.0, norm = 0.0, scale = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    err += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    norm += double(want[i]) * want[i];
    scale = std::max(scale, std::fabs(double(want[i])));
  }
  EXPECT_LE(std::sqrt(err / norm), 1e-2) << what << ": relative error of the whole tensor";
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    if (!(std::fabs(double(got[i]) - want[i]) <= scale / 32) && bad++ < 5)
      ADD_FAILURE() << what << "[" << i << "]: tensor cores " << got[i] << ", cpu " << want[i];
  EXPECT_EQ(bad, 0u) << what;
}

TEST(CudaBackwardOps, AttentionBackwardOnTensorCoresIsTheCpusWithinBf16) {
  LS_SKIP_WITHOUT_GPU();
  for (const int64_t D : {16, 64, 128}) {
    SCOPED_TRACE(D);
    AttentionStep a({70, 5, 130, 64}, 24 + D, D);
    const int64_t T = a.T();
    const bf16_bits q = testing::random_bf16(T * a.nq * a.D, 25), out = testing::random_bf16(T * a.nq * a.D, 26);
    const auto dout = random_f32(T * a.nq * a.D, 27);
    const AttentionGrads got = gpu_attention_backward(a, q, out, dout, true);
    const AttentionGrads want = cpu_attention_backward(a, q, out, dout);
    expect_bf16_close(got.dq, want.dq, "dq");
    expect_bf16_close(got.dk, want.dk, "dk");
    expect_bf16_close(got.dv, want.dv, "dv");
  }
}

// The warpgroup-MMA kernels (head_dim 64 and 128) give the mma.sync kernels' bits: one k16
// step of either rounds alike. Sequences with partial tiles, one shorter than a tile, GQA groups
// of 2 and 8 heads.
TEST(CudaBackwardOps, AttentionBackwardOnWgmmaIsMmaSyncBitForBit) {
  LS_SKIP_WITHOUT_GPU();
  for (const int64_t D : {64, 128})
    for (const int64_t nq : {4, 16}) {
      SCOPED_TRACE(::testing::Message() << "head_dim " << D << ", " << nq << " query heads");
      AttentionStep a({70, 5, 130, 64, 257}, 50 + D + nq, D);
      a.nq = nq;
      const int64_t T = a.T();
      const bf16_bits q = testing::random_bf16(T * a.nq * D, 51, 2.0f), out = testing::random_bf16(T * a.nq * D, 52);
      const auto dout = random_f32(T * a.nq * D, 53);
      const AttentionGrads sync = gpu_attention_backward(a, q, out, dout, true, cuda::AttentionKernel::mma_sync);
      const bool overlap_before = cuda::attention_dkv_overlap();
      // The dk/dv kernel with and without its softmax overlapping its MMAs: the same bits.
      for (const bool overlap : {false, true}) {
        cuda::set_attention_dkv_overlap(overlap);
        SCOPED_TRACE(overlap ? "dkv overlap" : "dkv in turn");
        const AttentionGrads group = gpu_attention_backward(a, q, out, dout, true, cuda::AttentionKernel::wgmma);
        EXPECT_TRUE(same_bits_f(group.dq, sync.dq)) << "dq";
        EXPECT_TRUE(same_bits_f(group.dk, sync.dk)) << "dk";
        EXPECT_TRUE(same_bits_f(group.dv, sync.dv)) << "dv";
        // The log-sum-exp given (the forward's, in training) instead of computed: with the
        // values the first pass computed, the same bits, for both kernels.
        for (const auto kernel : {cuda::AttentionKernel::mma_sync, cuda::AttentionKernel::wgmma}) {
          const AttentionGrads given = gpu_attention_backward(a, q, out, dout, true, kernel, &sync.lse);
          EXPECT_TRUE(same_bits_f(given.dq, sync.dq) && same_bits_f(given.dk, sync.dk) &&
                      same_bits_f(given.dv, sync.dv))
              << "lse given, " << (kernel == cuda::AttentionKernel::wgmma ? "wgmma" : "mma.sync");
        }
        // With a dS scratch: dk and dv first, dq from the dS tiles they kept; a scratch one
        // element short is not used. The same bits either way.
        const int64_t lens_max = *std::max_element(a.lens.begin(), a.lens.end());
        const int64_t need = cuda::attention_ds_elems(int64_t(a.lens.size()), lens_max, a.nq);
        for (const int64_t elems : {need, need - 1}) {
          const AttentionGrads kept =
              gpu_attention_backward(a, q, out, dout, true, cuda::AttentionKernel::wgmma, &sync.lse, elems);
          EXPECT_TRUE(same_bits_f(kept.dq, sync.dq)) << "dq, dS scratch of " << elems << " of " << need;
          EXPECT_TRUE(same_bits_f(kept.dk, sync.dk) && same_bits_f(kept.dv, sync.dv))
              << "dk, dv, dS scratch of " << elems << " of " << need;
        }
      }
      cuda::set_attention_dkv_overlap(overlap_before);
    }
  AttentionStep a({10}, 60, 16);
  const bf16_bits q = testing::random_bf16(10 * a.nq * 16, 61), out = testing::random_bf16(10 * a.nq * 16, 62);
  EXPECT_THROW(gpu_attention_backward(a, q, out, random_f32(10 * a.nq * 16, 63), true, cuda::AttentionKernel::wgmma),
               std::exception);
}

// The backward's delta (dout . out per query row, left in its workspace) is the CPU's dot
// procedure bit for bit, at every head size (a warp a row from 32 up, a thread a row below),
// and its bf16 copy of dout is dout rounded.
TEST(CudaBackwardOps, AttentionBackwardDeltaIsTheDotProcedure) {
  LS_SKIP_WITHOUT_GPU();
  for (const int64_t D : {16, 32, 64, 128}) {
    SCOPED_TRACE(D);
    AttentionStep a({70, 5, 130}, 40 + D, D);
    const int64_t T = a.T(), items = T * a.nq;
    const bf16_bits q = testing::random_bf16(items * D, 41), out = testing::random_bf16(items * D, 42);
    const auto dout = random_f32(items * D, 43);
    DeviceVec<uint16_t> K(a.k), V(a.v), Q(q), O(out), DoutBf16(items * D);
    DeviceVec<float> Dout(dout), Lse(items), Delta(items), Dq(items * D), Dk(T * a.nkv * D), Dv(T * a.nkv * D);
    DeviceVec<int32_t> Pos(a.pos), Seq(a.seq), Tables(a.tables), Stride(std::vector<int32_t>{int32_t(a.stride)}),
        First(a.seq_first), Toks(a.seq_tokens);
    cuda::DeviceKvLayer kv{reinterpret_cast<cuda::bf16_t*>(K.get()), reinterpret_cast<cuda::bf16_t*>(V.get()), a.page,
                           a.nkv, D};
    cuda::DeviceSlots slots;
    slots.positions = Pos.get();
    slots.seq_of_token = Seq.get();
    slots.page_tables = Tables.get();
    slots.table_stride = Stride.get();
    cuda::paged_attention_backward_tc(as_bf16(Q), as_bf16(O), Dout.get(), kv, slots, First.get(), Toks.get(), T, a.nq,
                                      3, 130, 1.0f / std::sqrt(float(D)), Lse.get(), Delta.get(),
                                      reinterpret_cast<cuda::bf16_t*>(DoutBf16.get()), Dq.get(), Dk.get(), Dv.get(),
                                      nullptr);
    std::vector<float> want(items);
    for (int64_t i = 0; i < items; ++i) {
      float lanes[8] = {};
      for (int64_t d = 0; d < D; ++d) lanes[d % 8] += dout[i * D + d] * bf16_to_f32(out[i * D + d]);
      want[i] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    }
    EXPECT_TRUE(same_bits_f(Delta.take(), want));
    const auto rounded = DoutBf16.take();
    size_t bad = 0;
    for (int64_t i = 0; i < items * D; ++i) bad += rounded[size_t(i)] != f32_to_bf16(dout[size_t(i)]);
    EXPECT_EQ(bad, 0u) << "dout rounded to bf16";
  }
}

TEST(CudaBackwardOps, AttentionBackwardOfASequenceIgnoresItsNeighbours) {
  LS_SKIP_WITHOUT_GPU();
  // Sequence of 90 tokens alone, then after two other sequences in other pages: its dq, dk,
  // dv rows have the same bits (batch composition, packing place, page placement).
  const int64_t len = 90;
  AttentionStep alone({len}, 28), among({33, 7, len}, 29);
  const int64_t row = alone.nkv * alone.D, qrow = alone.nq * alone.D, first = 40;
  // The sequence's K/V into `among`'s pages.
  for (int64_t p = 0; p < len; ++p) {
    const int64_t src = int64_t(alone.tables[p / alone.page]) * alone.page + p % alone.page;
    const int64_t dst = int64_t(among.tables[2 * among.stride + p / among.page]) * among.page + p % among.page;
    std::copy_n(alone.k.begin() + src * row, row, among.k.begin() + dst * row);
    std::copy_n(alone.v.begin() + src * row, row, among.v.begin() + dst * row);
  }
  const bf16_bits q = testing::random_bf16(len * qrow, 30), out = testing::random_bf16(len * qrow, 31);
  const auto dout = random_f32(len * qrow, 32);
  bf16_bits q2 = testing::random_bf16(among.T() * qrow, 33), out2 = testing::random_bf16(among.T() * qrow, 34);
  auto dout2 = random_f32(among.T() * qrow, 35);
  std::copy(q.begin(), q.end(), q2.begin() + first * qrow);
  std::copy(out.begin(), out.end(), out2.begin() + first * qrow);
  std::copy(dout.begin(), dout.end(), dout2.begin() + first * qrow);
  for (const bool tensor_cores : {false, true}) {
    SCOPED_TRACE(tensor_cores ? "tensor cores" : "CUDA cores");
    const AttentionGrads g1 = gpu_attention_backward(alone, q, out, dout, tensor_cores);
    const AttentionGrads g2 = gpu_attention_backward(among, q2, out2, dout2, tensor_cores);
    auto rows = [&](const std::vector<float>& v, int64_t width) {
      return std::vector<float>(v.begin() + first * width, v.begin() + (first + len) * width);
    };
    EXPECT_TRUE(same_bits_f(g1.dq, rows(g2.dq, qrow)));
    EXPECT_TRUE(same_bits_f(g1.dk, rows(g2.dk, row)));
    EXPECT_TRUE(same_bits_f(g1.dv, rows(g2.dv, row)));
  }
}

}  // namespace
}  // namespace lockstep
