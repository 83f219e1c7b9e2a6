// The fused small-step routing + expert assignment equals the separate kernels bit for bit, and
// both group the pairs as the selected ids say (one block, or many at large steps, there in
// pair order);
// the large-step SwiGLU and expert combine (8 columns per thread) equal the small-step kernels;
// the per-head RMSNorm and rotary embedding and the row RMSNorm follow their thread-order
// procedures bit for bit.
#include <algorithm>
#include <cmath>
#include <utility>

#include "core/dtype.h"
#include "cuda_test_util.h"
#include "kernels/cuda/ops.h"

namespace lockstep {
namespace {

using testing::DeviceVec;
using testing::random_bf16;

std::vector<float> random_f32(int64_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> out(static_cast<size_t>(n));
  for (auto& v : out) v = d(rng);
  return out;
}

void check_route_assign(int64_t T, int64_t E, int64_t k) {
  LS_SKIP_WITHOUT_GPU();
  auto logits_h = random_f32(T * E, uint64_t(T * 31 + E), -4.0f, 4.0f);
  if (T > 1) logits_h[size_t(E + 3)] = logits_h[size_t(E + 5)];  // a tie: the lower id first
  DeviceVec<float> logits(logits_h);
  struct Out {
    std::vector<int32_t> ids, rows;
    std::vector<float> weights;
    std::vector<std::vector<std::pair<int32_t, int32_t>>> groups;  // sorted (gather, scatter) per group
    bool placed_in_pair_order = true;  // every group's rows in ascending pair order as placed
  };
  auto run = [&](bool fused) {
    DeviceVec<int32_t> ids(T * k), counts(cuda::assign_workspace_ints(T * k, E)), rows(E + 1), gather(T * k),
        scatter(T * k);
    DeviceVec<float> weights(T * k);
    ids.poison();
    rows.poison();
    if (fused) {
      cuda::route_and_assign(logits.get(), ids.get(), weights.get(), T, E, k, true, counts.get(), rows.get(),
                             gather.get(), scatter.get(), nullptr);
    } else {
      cuda::route_topk(logits.get(), ids.get(), weights.get(), T, E, k, true, nullptr);
      cuda::assign_experts(ids.get(), T, k, E, counts.get(), rows.get(), gather.get(), scatter.get(), nullptr);
    }
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    Out o{ids.take(), rows.take(), weights.take(), {}};
    auto g = gather.take(), sc = scatter.take();
    for (int64_t e = 0; e < E; ++e) {
      std::vector<std::pair<int32_t, int32_t>> members;
      for (int32_t r = o.rows[size_t(e)]; r < o.rows[size_t(e + 1)]; ++r)
        members.push_back({g[size_t(r)], sc[size_t(r)]});
      o.placed_in_pair_order = o.placed_in_pair_order && std::is_sorted(members.begin(), members.end());
      std::sort(members.begin(), members.end());
      o.groups.push_back(members);
    }
    return o;
  };
  Out a = run(false), b = run(true);
  // The grouping itself, from the selected ids: each expert's (token, pair) rows, in order of
  // expert id.
  std::vector<int32_t> want_rows{0};
  for (int64_t e = 0; e < E; ++e) {
    std::vector<std::pair<int32_t, int32_t>> members;
    for (int64_t i = 0; i < T * k; ++i)
      if (a.ids[size_t(i)] == e) members.push_back({int32_t(i / k), int32_t(i)});
    EXPECT_EQ(a.groups[size_t(e)], members) << "expert " << e;
    want_rows.push_back(want_rows.back() + int32_t(members.size()));
  }
  EXPECT_EQ(a.rows, want_rows);
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4), 0);
  EXPECT_EQ(a.rows, b.rows);
  EXPECT_EQ(a.groups, b.groups);
  EXPECT_EQ(b.rows.back(), int32_t(T * k));
  // Large steps place each group's rows in pair order (tokens ascending): the trainer's
  // backward reads a kept layer's rows in place then.
  if (T * k >= 8192) {
    EXPECT_TRUE(a.placed_in_pair_order) << T << " tokens, " << E << " experts";
    EXPECT_TRUE(b.placed_in_pair_order) << T << " tokens, " << E << " experts";
  }
}

TEST(CudaOps, RouteAndAssignEqualsSeparate) {
  // 33: past the one-launch limit (the separate kernels); 1100 and 3000: the many-block grouping
  for (int64_t T : {1, 5, 32, 33, 1100, 3000}) {
    check_route_assign(T, 128, 8);
    check_route_assign(T, 16, 4);
  }
}

cuda::bf16_t* bf(const DeviceVec<uint16_t>& v) { return reinterpret_cast<cuda::bf16_t*>(v.get()); }

// The per-head RMSNorm + rotary embedding of qk_norm_rope_store, emulated on the CPU with the
// kernel's order of operations (lane l sums elements l, l + 32, ..., then the xor butterfly
// 16, 8, 4, 2, 1), for head sizes of the register path (64, 128) and of the general loop (16).
void check_qk_norm_rope(int64_t D) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 3, nq = 4, nkv = 2, heads = nq + 2 * nkv, page = 16, half = D / 2, max_pos = 64;
  const std::vector<int32_t> pos{17, 18, 40}, seq{0, 0, 0}, table{3, 0, 1, 2};  // page 1 -> 0, 2 -> 1
  auto qkv_h = random_bf16(T * heads * D, 40 + D, 3.0f);
  auto qn = random_f32(D, 50 + D, 0.5f, 1.5f), kn = random_f32(D, 60 + D, 0.5f, 1.5f);
  auto cos_h = random_f32(max_pos * half, 70, -1.0f, 1.0f), sin_h = random_f32(max_pos * half, 71, -1.0f, 1.0f);
  const float eps = 1e-6f;
  DeviceVec<uint16_t> qkv(qkv_h), q_out(T * nq * D), kc(4 * page * nkv * D), vc(4 * page * nkv * D);
  q_out.poison();
  kc.poison();
  vc.poison();
  DeviceVec<float> QN(qn), KN(kn), C(cos_h), S(sin_h);
  DeviceVec<int32_t> Pos(pos), Seq(seq), Table(table), Stride(std::vector<int32_t>{4});
  cuda::DeviceKvLayer kv;
  kv.k = bf(kc);
  kv.v = bf(vc);
  kv.page_size = page;
  kv.kv_heads = nkv;
  kv.head_dim = D;
  cuda::DeviceSlots slots;
  slots.positions = Pos.get();
  slots.seq_of_token = Seq.get();
  slots.page_tables = Table.get();
  slots.table_stride = Stride.get();
  cuda::qk_norm_rope_store(bf(qkv), QN.get(), KN.get(), C.get(), S.get(), bf(q_out), kv, slots, T, nq, nkv, D, eps,
                           nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto q_got = q_out.take(), k_got = kc.take(), v_got = vc.take();
  auto expect = [&](int64_t t, int64_t head, const float* w) {
    const uint16_t* x = qkv_h.data() + (t * heads + head) * D;
    float lane_sum[32] = {};
    for (int64_t d = 0; d < D; ++d) lane_sum[d % 32] += bf16_to_f32(x[d]) * bf16_to_f32(x[d]);
    for (int o = 16; o > 0; o >>= 1) {
      float next[32];
      for (int l = 0; l < 32; ++l) next[l] = lane_sum[l] + lane_sum[l ^ o];
      std::copy(next, next + 32, lane_sum);
    }
    const float inv = 1.0f / std::sqrt(lane_sum[0] / float(D) + eps);
    const float* c = cos_h.data() + pos[size_t(t)] * half;
    const float* s = sin_h.data() + pos[size_t(t)] * half;
    std::vector<uint16_t> out(static_cast<size_t>(D));
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = round_bf16(w[i] * round_bf16(bf16_to_f32(x[i]) * inv));
      const float x2 = round_bf16(w[i + half] * round_bf16(bf16_to_f32(x[i + half]) * inv));
      out[size_t(i)] = f32_to_bf16(x1 * c[i] - x2 * s[i]);
      out[size_t(i + half)] = f32_to_bf16(x2 * c[i] + x1 * s[i]);
    }
    return out;
  };
  for (int64_t t = 0; t < T; ++t) {
    const int64_t slot = int64_t(table[size_t(pos[size_t(t)] / page)]) * page + pos[size_t(t)] % page;
    for (int64_t h = 0; h < nq; ++h) {
      const auto want = expect(t, h, qn.data());
      EXPECT_TRUE(std::equal(want.begin(), want.end(), q_got.begin() + (t * nq + h) * D)) << "q token " << t;
    }
    for (int64_t h = 0; h < nkv; ++h) {
      const auto want = expect(t, nq + h, kn.data());
      EXPECT_TRUE(std::equal(want.begin(), want.end(), k_got.begin() + (slot * nkv + h) * D)) << "k token " << t;
      const uint16_t* v = qkv_h.data() + (t * heads + nq + nkv + h) * D;
      EXPECT_TRUE(std::equal(v, v + D, v_got.begin() + (slot * nkv + h) * D)) << "v token " << t;
    }
  }
}

TEST(CudaOps, QkNormRopeFollowsItsLaneOrder) {
  for (int64_t D : {16, 64, 128, 256}) check_qk_norm_rope(D);
}

// The RMSNorm procedure on the CPU: thread t of 256 sums elements t, t + 256, ... in order;
// the warps' butterflies (xor 16 .. 1), then the 8 warp sums in order.
std::vector<uint16_t> rmsnorm_emulated(const uint16_t* x, const float* w, int64_t n, float eps) {
  float thread_sum[256] = {};
  for (int64_t i = 0; i < n; ++i) thread_sum[i % 256] += bf16_to_f32(x[i]) * bf16_to_f32(x[i]);
  float total = 0.0f;
  for (int warp = 0; warp < 8; ++warp) {
    float* lane = thread_sum + 32 * warp;
    for (int o = 16; o > 0; o >>= 1) {
      float next[32];
      for (int l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ o];
      std::copy(next, next + 32, lane);
    }
    total += lane[0];
  }
  const float inv = 1.0f / std::sqrt(total / float(n) + eps);
  std::vector<uint16_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = f32_to_bf16(w[i] * round_bf16(bf16_to_f32(x[i]) * inv));
  return out;
}

// The unrolled rows (2048, 4096 columns) and the general loop follow the same procedure.
TEST(CudaOps, RmsNormFollowsItsThreadOrder) {
  LS_SKIP_WITHOUT_GPU();
  const float eps = 1e-6f;
  for (int64_t n : {2048, 4096, 1000}) {
    const int64_t rows = 5;
    const auto x_h = random_bf16(rows * n, 80 + n, 4.0f);
    const auto w_h = random_f32(n, 81 + n, 0.5f, 1.5f);
    DeviceVec<uint16_t> x(x_h), out(rows * n);
    DeviceVec<float> w(w_h);
    out.poison();
    cuda::rmsnorm(bf(x), w.get(), bf(out), rows, n, eps, nullptr);
    const auto got = out.take();
    for (int64_t r = 0; r < rows; ++r) {
      const auto want = rmsnorm_emulated(x_h.data() + r * n, w_h.data(), n, eps);
      EXPECT_TRUE(std::equal(want.begin(), want.end(), got.begin() + r * n)) << "n " << n << " row " << r;
    }
  }
}

// A large step (the vector kernel) equals the same rows run as small steps (the scalar kernel).
TEST(CudaOps, LargeStepSwigluEqualsSmallSteps) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t R = 1400, I = 768, piece = 100;  // R * I >= 2^20; a piece is below
  DeviceVec<uint16_t> gu(random_bf16(R * 2 * I, 11, 6.0f)), whole(R * I), pieces(R * I);
  whole.poison();
  pieces.poison();
  cuda::swiglu(bf(gu), bf(whole), R, I, nullptr);
  for (int64_t r0 = 0; r0 < R; r0 += piece)
    cuda::swiglu(bf(gu) + r0 * 2 * I, bf(pieces) + r0 * I, std::min(piece, R - r0), I, nullptr);
  EXPECT_EQ(whole.take(), pieces.take());
}

TEST(CudaOps, LargeStepCombineEqualsSmallSteps) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 300, H = 2048, k = 8, E = 128, piece = 50;  // T >= 256; a piece is below
  std::vector<int32_t> ids_h(size_t(T * k));
  for (int64_t t = 0; t < T; ++t)  // k distinct experts per token, not in ascending order
    for (int64_t j = 0; j < k; ++j) ids_h[size_t(t * k + j)] = int32_t((t * 7 + j * 37) % E);
  DeviceVec<int32_t> ids(ids_h);
  DeviceVec<float> weights(random_f32(T * k, 5, 0.0f, 1.0f));
  DeviceVec<uint16_t> y(random_bf16(T * k * H, 12));
  const auto x0 = random_bf16(T * H, 13);
  DeviceVec<uint16_t> whole(x0), pieces(x0);
  cuda::combine_experts_residual(ids.get(), weights.get(), bf(y), bf(whole), T, H, k, nullptr);
  for (int64_t t0 = 0; t0 < T; t0 += piece)
    cuda::combine_experts_residual(ids.get() + t0 * k, weights.get() + t0 * k, bf(y) + t0 * k * H,
                                   bf(pieces) + t0 * H, std::min(piece, T - t0), H, k, nullptr);
  const auto a = whole.take();
  EXPECT_EQ(a, pieces.take());
  EXPECT_NE(a, x0);  // the residual did change
}

}  // namespace
}  // namespace lockstep
