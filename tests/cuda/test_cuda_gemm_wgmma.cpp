// The GEMM at prefill-like sizes: groups of many row tiles (and empty or one-row groups),
// gathered and scattered rows, every output kind. Every configuration (the wgmma ones
// included) must give the bits of the plain per-group product, row for row.
#include <algorithm>
#include <numeric>
#include <random>

#include "cuda_test_util.h"
#include "gemm_test_util.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_tma.h"

namespace lockstep {
namespace {

using testing::DeviceVec;
using testing::random_bf16;

// run(config, cluster) for every configuration, the TMA ones (wgmma configurations 4-6) also in
// clusters of two CTAs (set_gemm_tma_cluster); the cluster setting is restored after.
template <typename Run>
void for_every_config(Run run) {
  const int before = cuda::gemm_tma_cluster();
  for (int config = 0; config < cuda::kGemmConfigs; ++config)
    for (const int cluster : {1, 2}) {
      if (cluster == 2 && config < cuda::kGemmMmaConfigs + 4) continue;
      cuda::set_gemm_tma_cluster(cluster);
      run(config, cluster);
    }
  cuda::set_gemm_tma_cluster(before);
}

// 600 tokens in 8 experts of 130, 0, 1, 257, 64, 3, 128 and 17 rows, gathered from a shuffled
// token order (as the GEMM loads them, or beforehand: then TMA applies) and scattered back to
// the token's row.
void check_grouped(int64_t N, int64_t K, int chunks) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 600, G = 8;
  const std::vector<int32_t> sizes{130, 0, 1, 257, 64, 3, 128, 17};
  std::vector<int32_t> rows_of{0};
  for (int32_t s : sizes) rows_of.push_back(rows_of.back() + s);
  ASSERT_EQ(rows_of.back(), T);
  std::vector<int32_t> perm(T);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(5));
  auto x = random_bf16(T * K, 21 + K), w = random_bf16(G * N * K, 22 + N);
  std::vector<uint16_t> x_rows(x.size());
  for (int64_t r = 0; r < T; ++r) std::copy_n(&x[size_t(perm[r] * K)], K, &x_rows[size_t(r * K)]);
  DeviceVec<uint16_t> X(x), X_rows(x_rows), W(w);
  DeviceVec<int32_t> Rows(rows_of), Perm(perm);
  // The plain product of every token with every expert's weights (the mma.sync 128x128 tiles).
  std::vector<std::vector<float>> plain;
  for (int64_t g = 0; g < G; ++g) {
    DeviceVec<float> out(T * N);
    out.poison();
    auto a = testing::gemm_args(X.get(), K, W.get() + g * N * K, K, T, N, K, chunks, out.get());
    cuda::gemm_with_config(a, 4, nullptr);
    plain.push_back(out.take());
  }
  for (const bool gathered_first : {false, true})
    for_every_config([&](int config, int cluster) {
      DeviceVec<float> out(T * N);
      out.poison();
      auto a = testing::gemm_args(gathered_first ? X_rows.get() : X.get(), K, W.get(), K, T, N, K, chunks, out.get());
      a.a_gather = gathered_first ? nullptr : Perm.get();
      a.w_group_stride = N * K;
      a.group_rows = Rows.get();
      a.groups = int(G);
      a.out_scatter = Perm.get();
      cuda::gemm_with_config(a, config, nullptr);
      const auto grouped = out.take();
      int bad_rows = 0;
      for (int64_t g = 0; g < G; ++g)
        for (int32_t r = rows_of[g]; r < rows_of[g + 1]; ++r) {
          const int64_t t = perm[r];
          bad_rows += std::memcmp(&grouped[t * N], &plain[g][t * N], N * 4) != 0;
        }
      EXPECT_EQ(bad_rows, 0) << "config " << config << " chunks " << chunks << " clusters of " << cluster
                             << (gathered_first ? ", rows gathered first" : "");
    });
}

TEST(CudaGemmLarge, GroupedColumnFormEqualsPlain) { check_grouped(1536, 2048, 1); }
TEST(CudaGemmLarge, GroupedRowFormEqualsPlain) { check_grouped(2048, 768, 8); }

// bf16 and bf16 + residual outputs (the residual read from the output buffer itself) equal
// across configurations; a partial column tile and a partial row tile.
TEST(CudaGemmLarge, OutputKindsAgreeAcrossConfigurations) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t M = 300, N = 200, K = 1024;
  auto a = random_bf16(M * K, 31), w = random_bf16(N * K, 32), r = random_bf16(M * N, 33, 4.0f);
  DeviceVec<uint16_t> A(a), W(w);
  for (int chunks : {1, 8})
    for (auto kind : {cuda::GemmOut::bf16, cuda::GemmOut::bf16_residual}) {
      std::vector<uint16_t> first;
      for_every_config([&](int config, int cluster) {
        DeviceVec<uint16_t> out(r);  // the residual, overwritten in place
        auto g = testing::gemm_args(A.get(), K, W.get(), K, M, N, K, chunks, nullptr);
        g.out_kind = kind;
        g.out_bf16 = reinterpret_cast<__nv_bfloat16*>(out.get());
        g.resid = reinterpret_cast<const __nv_bfloat16*>(out.get());
        cuda::gemm_with_config(g, config, nullptr);
        const auto got = out.take();
        if (config == 0)
          first = got;
        else
          EXPECT_EQ(std::memcmp(got.data(), first.data(), got.size() * 2), 0)
              << "config " << config << " chunks " << chunks << " kind " << int(kind) << " clusters of " << cluster;
      });
    }
}

// A shape whose row tiles (5) and column tiles (3 at 128, 2 at 256) are odd: the pair's second
// tile past the matrix takes part in the loads and stores nothing; every configuration and
// cluster setting gives the mma.sync tile's bits, grouped (A shared) and not (W shared).
TEST(CudaGemmLarge, ClustersOfTwoGiveTheBitsOfOne) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t M = 520, N = 328, K = 768;
  auto a = random_bf16(M * K, 41), w = random_bf16(2 * N * K, 42);
  DeviceVec<uint16_t> A(a), W(w);
  DeviceVec<int32_t> Rows(std::vector<int32_t>{0, 300, int32_t(M)});
  for (const bool grouped : {false, true})
    for (int chunks : {1, 8}) {
      std::vector<float> first;
      for_every_config([&](int config, int cluster) {
        DeviceVec<float> out(M * N);
        out.poison();
        auto g = testing::gemm_args(A.get(), K, W.get(), K, M, N, K, chunks, out.get());
        if (grouped) g.group_rows = Rows.get(), g.groups = 2, g.w_group_stride = N * K;
        cuda::gemm_with_config(g, config, nullptr);
        const auto got = out.take();
        if (first.empty())
          first = got;
        else
          EXPECT_EQ(std::memcmp(got.data(), first.data(), got.size() * 4), 0)
              << "config " << config << " chunks " << chunks << " grouped " << grouped << " clusters of " << cluster;
      });
    }
  EXPECT_THROW(cuda::set_gemm_tma_cluster(3), std::exception);
}

}  // namespace
}  // namespace lockstep
