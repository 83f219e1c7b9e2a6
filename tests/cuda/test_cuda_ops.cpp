// The fused small-step routing + expert assignment equals the separate kernels bit for bit, and
// both group the pairs as the selected ids say (one block, or many at large steps);
// the large-step SwiGLU and expert combine (8 columns per thread) equal the small-step kernels.
#include <algorithm>
#include <utility>

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
}

TEST(CudaOps, RouteAndAssignEqualsSeparate) {
  // 33: past the one-launch limit (the separate kernels); 1100 and 3000: the many-block grouping
  for (int64_t T : {1, 5, 32, 33, 1100, 3000}) {
    check_route_assign(T, 128, 8);
    check_route_assign(T, 16, 4);
  }
}

cuda::bf16_t* bf(const DeviceVec<uint16_t>& v) { return reinterpret_cast<cuda::bf16_t*>(v.get()); }

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
