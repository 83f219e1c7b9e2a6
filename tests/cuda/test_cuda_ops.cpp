// The fused small-step routing + expert assignment equals the separate kernels bit for bit.
#include <algorithm>
#include <utility>

#include "cuda_test_util.h"
#include "kernels/cuda/ops.h"

namespace lockstep {
namespace {

using testing::DeviceVec;

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
    DeviceVec<int32_t> ids(T * k), counts(E), rows(E + 1), gather(T * k), scatter(T * k);
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
  EXPECT_EQ(a.ids, b.ids);
  EXPECT_EQ(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4), 0);
  EXPECT_EQ(a.rows, b.rows);
  EXPECT_EQ(a.groups, b.groups);
  EXPECT_EQ(b.rows.back(), int32_t(T * k));
}

TEST(CudaOps, RouteAndAssignEqualsSeparate) {
  for (int64_t T : {1, 5, 32, 33}) {  // 33: past the one-launch limit (the separate kernels)
    check_route_assign(T, 128, 8);
    check_route_assign(T, 16, 4);
  }
}

}  // namespace
}  // namespace lockstep
