// The tensor-core GEMM: every tile configuration and every batch size gives the same bits
// per row (batch invariance by construction), grouped/gathered/scattered rows equal plain
// ones, and the values match a float64 reference of the same canonical reduction.
#include <cmath>

#include "cuda_test_util.h"
#include "gemm_test_util.h"
#include "core/error.h"
#include "kernels/canonical.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_wgmma.h"
#include "kernels/cuda/ops.h"

namespace lockstep {
namespace {

using testing::DeviceVec;
using testing::random_bf16;
using testing::same_bits_f;

struct Problem {
  int64_t M, N, K;
  int chunks;
};

std::vector<float> run(const Problem& p, const DeviceVec<uint16_t>& A, const DeviceVec<uint16_t>& W, int64_t M,
                       int config, bool split = false) {
  DeviceVec<float> out(M * p.N), workspace(8 * M * p.N);
  workspace.poison();
  out.poison();
  auto g = testing::gemm_args(A.get(), p.K, W.get(), p.K, M, p.N, p.K, p.chunks, out.get());
  if (split) {  // the row form's chunks in separate CTAs, combined by a second kernel
    g.split_workspace = workspace.get();
    g.split_workspace_floats = workspace.n;
  }
  if (config < 0) cuda::gemm(g, nullptr);
  else cuda::gemm_with_config(g, config, nullptr);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return out.take();
}

// float64 reference of the same function: per chunk an exact-ish sum, then the tree.
double reference(const std::vector<uint16_t>& a, const std::vector<uint16_t>& w, int64_t r, int64_t n,
                 const Problem& p) {
  const int64_t clen = p.chunks == 8 ? canonical_chunk(p.K) : p.K;
  double parts[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = 0; k < p.K; ++k)
    parts[k / clen] += double(bf16_to_f32(a[r * p.K + k])) * double(bf16_to_f32(w[n * p.K + k]));
  double total = 0;
  for (double x : parts) total += x;
  return total;
}

void check(const Problem& p) {
  LS_SKIP_WITHOUT_GPU();
  auto a = random_bf16(p.M * p.K, 1 + p.K), w = random_bf16(p.N * p.K, 2 + p.N);
  DeviceVec<uint16_t> A(a), W(w);
  const auto full = run(p, A, W, p.M, -1);
  for (int64_t r = 0; r < p.M; r += 7)
    for (int64_t n = 0; n < p.N; n += 5) {
      double ref = reference(a, w, r, n, p);
      ASSERT_NEAR(full[r * p.N + n], ref, 1e-4 * std::sqrt(double(p.K)) + 1e-5 * std::abs(ref))
          << "row " << r << " col " << n;
    }
  for (int config = 0; config < cuda::kGemmConfigs; ++config)
    for (bool split : {false, true}) {
      if (split && p.chunks != 8) continue;
      EXPECT_TRUE(same_bits_f(run(p, A, W, p.M, config, split), full)) << "config " << config << " split " << split;
      for (int64_t m : {int64_t(1), int64_t(3), int64_t(17), int64_t(70), int64_t(129), int64_t(255)}) {
        if (m > p.M) continue;
        auto part = run(p, A, W, m, config, split);
        std::vector<float> head(full.begin(), full.begin() + m * p.N);
        EXPECT_TRUE(same_bits_f(part, head)) << "config " << config << " split " << split << ", first " << m
                                             << " rows differ";
      }
    }
}

TEST(CudaGemm, ColumnFormIsBatchInvariant) { check({300, 200, 2048, 1}); }
TEST(CudaGemm, RowFormIsBatchInvariant) { check({150, 136, 768, 8}); }
// Row counts past one 128-row tile, chunks of three K tiles, a partial column tile: the row
// form with the tree's partials in shared memory (64x128, 128x128) equals every other.
TEST(CudaGemm, RowFormLargeTilesAreBatchInvariant) { check({300, 264, 1536, 8}); }
// Chunks of 5 k16 steps (a K tile and one step of the next, partly empty).
TEST(CudaGemm, RowFormChunksOfOddSteps) { check({200, 136, 640, 8}); }
TEST(CudaGemm, UnalignedChunksArePaddedWithZeros) { check({40, 24, 36, 8}); }
// K shorter than one K tile of 64 (a small model's hidden size) at a large step: the TMA
// configurations' tiles reach past the matrix and read zeros there.
TEST(CudaGemm, ShortKAtLargeSteps) {
  check({300, 72, 40, 1});
  check({300, 72, 128, 8});  // chunks of 16: one k16 step each
}
TEST(CudaGemm, UnalignedColumnForm) { check({33, 70, 100, 1}); }

// Rows grouped by expert, gathered from a token list and scattered back, equal the plain
// per-group product row for row.
TEST(CudaGemm, GroupedGatherScatterEqualsPlain) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 50, N = 96, K = 256, G = 4;
  auto x = random_bf16(T * K, 7), w = random_bf16(G * N * K, 8);
  DeviceVec<uint16_t> X(x), W(w);
  // Group g takes tokens t with t % G == g, in descending token order (order must not matter).
  std::vector<int32_t> rows_of{0}, gather, scatter;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t = T - 1; t >= 0; --t)
      if (t % G == g) {
        gather.push_back(int32_t(t));
        scatter.push_back(int32_t(t));
      }
    rows_of.push_back(int32_t(gather.size()));
  }
  DeviceVec<int32_t> Rows(rows_of), Gather(gather), Scatter(scatter);
  DeviceVec<float> workspace(8 * T * N);
  for (int variant : {1, 8, -8})  // -8: the row form with its chunks split across CTAs
    for (int config = 0; config < cuda::kGemmConfigs; ++config) {
      const bool split = variant < 0;
      const int chunks = split ? 8 : variant;
      DeviceVec<float> out(T * N);
      out.poison();
      workspace.poison();
      auto g = testing::gemm_args(X.get(), K, W.get(), K, T, N, K, chunks, out.get());
      g.a_gather = Gather.get();
      g.w_group_stride = N * K;
      g.group_rows = Rows.get();
      g.groups = int(G);
      g.out_scatter = Scatter.get();
      if (split) {
        g.split_workspace = workspace.get();
        g.split_workspace_floats = workspace.n;
      }
      cuda::gemm_with_config(g, config, nullptr);
      auto grouped = out.take();
      for (int64_t grp = 0; grp < G; ++grp) {
        Problem p{T, N, K, chunks};
        DeviceVec<uint16_t> Wg(std::vector<uint16_t>(w.begin() + grp * N * K, w.begin() + (grp + 1) * N * K));
        auto plain = run(p, X, Wg, T, config);
        for (int64_t t = grp; t < T; t += G)
          EXPECT_EQ(std::memcmp(&grouped[t * N], &plain[t * N], N * 4), 0)
              << "token " << t << " chunks " << chunks << " config " << config << " split " << split;
      }
    }
}

// Rows already in group order (the MoE down projection's input), groups of uneven sizes
// (empty ones, ones past a 128-row tile), scattered back: each group's rows equal the plain
// product with that group's weights. More tiles than SMs, so the persistent (TMA)
// configurations take several tiles per CTA and their stage ring wraps across tiles.
TEST(CudaGemm, GroupedRowsInOrderEqualPlain) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t N = 1300, K = 768;
  const std::vector<int64_t> sizes{0, 700, 3, 1300, 0, 497};
  const int64_t G = int64_t(sizes.size());
  std::vector<int32_t> rows_of{0};
  for (int64_t n : sizes) rows_of.push_back(rows_of.back() + int32_t(n));
  const int64_t M = rows_of.back();
  auto x = random_bf16(M * K, 17), w = random_bf16(G * N * K, 18);
  DeviceVec<uint16_t> X(x), W(w);
  std::vector<int32_t> scatter;
  for (int64_t r = 0; r < M; ++r) scatter.push_back(int32_t(M - 1 - r));
  DeviceVec<int32_t> Rows(rows_of), Scatter(scatter);
  for (int chunks : {1, 8}) {
    std::vector<std::vector<float>> plain(static_cast<size_t>(G));
    for (int64_t grp = 0; grp < G; ++grp) {
      if (sizes[size_t(grp)] == 0) continue;
      const int64_t r0 = rows_of[size_t(grp)], rows = sizes[size_t(grp)];
      DeviceVec<uint16_t> Xg(std::vector<uint16_t>(x.begin() + r0 * K, x.begin() + (r0 + rows) * K));
      DeviceVec<uint16_t> Wg(std::vector<uint16_t>(w.begin() + grp * N * K, w.begin() + (grp + 1) * N * K));
      plain[size_t(grp)] = run({rows, N, K, chunks}, Xg, Wg, rows, -1);
    }
    for (int config = 0; config < cuda::kGemmConfigs; ++config) {
      DeviceVec<float> out(M * N);
      out.poison();
      auto g = testing::gemm_args(X.get(), K, W.get(), K, M, N, K, chunks, out.get());
      g.w_group_stride = N * K;
      g.group_rows = Rows.get();
      g.groups = int(G);
      g.out_scatter = Scatter.get();
      cuda::gemm_with_config(g, config, nullptr);
      auto grouped = out.take();
      for (int64_t grp = 0; grp < G; ++grp)
        for (int64_t i = 0; i < sizes[size_t(grp)]; ++i) {
          const int64_t r = rows_of[size_t(grp)] + i;
          ASSERT_EQ(std::memcmp(&grouped[(M - 1 - r) * N], &plain[size_t(grp)][i * N], N * 4), 0)
              << "group " << grp << " row " << i << " chunks " << chunks << " config " << config;
        }
    }
  }
}

// The SwiGLU output of the MoE gate_up (rows gathered and grouped, W rows [gate | up]) equals
// the [gate | up] product followed by the swiglu kernel, bit for bit; I = 320 leaves a
// partial 128-column tile. Configurations without it refuse it.
TEST(CudaGemm, SwigluOutputEqualsGemmThenSwiglu) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 2600, k = 2, G = 4, I = 320, N = 2 * I, K = 256, M = T * k;
  auto x = random_bf16(T * K, 31), w = random_bf16(G * N * K, 32, 0.5f);
  DeviceVec<uint16_t> X(x), W(w), GU(M * N), Want(M * I), Got(M * I);
  std::vector<int32_t> rows_of{0}, gather;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = 0; r < M; ++r)
      if ((r * 7) % G == g) gather.push_back(int32_t(r % T));
    rows_of.push_back(int32_t(gather.size()));
  }
  DeviceVec<int32_t> Rows(rows_of), Gather(gather);
  auto g = testing::gemm_args(X.get(), K, W.get(), K, M, N, K, 1, nullptr);
  g.a_gather = Gather.get();
  g.w_group_stride = N * K;
  g.group_rows = Rows.get();
  g.groups = int(G);
  g.out_kind = cuda::GemmOut::bf16;
  g.out_bf16 = reinterpret_cast<__nv_bfloat16*>(GU.get());
  cuda::gemm(g, nullptr);
  cuda::swiglu(reinterpret_cast<const cuda::bf16_t*>(GU.get()), reinterpret_cast<cuda::bf16_t*>(Want.get()), M, I,
               nullptr);
  const auto want = Want.take();
  // 1300 rows per group, 132 tiles of 128 x 256: the large-step kernel
  ASSERT_TRUE(cuda::gemm_takes_swiglu(g));
  g.out_kind = cuda::GemmOut::bf16_swiglu;
  g.out_bf16 = reinterpret_cast<__nv_bfloat16*>(Got.get());
  g.ldo = I;
  Got.poison();
  cuda::gemm(g, nullptr);
  EXPECT_EQ(Got.take(), want) << "gemm()";
  for (int config = 0; config < cuda::kGemmConfigs; ++config) {
    Got.poison();
    const bool takes =
        config >= cuda::kGemmMmaConfigs && cuda::gemm_wgmma_takes_swiglu(g, config - cuda::kGemmMmaConfigs);
    if (!takes) {
      EXPECT_THROW(cuda::gemm_with_config(g, config, nullptr), Error) << "config " << config;
      continue;
    }
    cuda::gemm_with_config(g, config, nullptr);
    EXPECT_EQ(Got.take(), want) << "config " << config;
  }
}

// SwiGLU applied as the small-step kernel loads its A rows ([gate | up] rows, the MoE down
// projection at decode) equals the SwiGLU kernel followed by the GEMM, bit for bit: plain rows
// and rows grouped by expert and scattered (with the group list read before the kernel's wait),
// column form, row form, and the row form split across CTAs.
TEST(CudaGemm, SwigluOnLoadEqualsSwigluKernelThenGemm) {
  LS_SKIP_WITHOUT_GPU();
  const int64_t T = 20, I = 200, N = 72, G = 3;
  auto gu = random_bf16(T * 2 * I, 11, 4.0f), w = random_bf16(G * N * I, 12);
  DeviceVec<uint16_t> GU(gu), W(w), Act(T * I);
  cuda::swiglu(reinterpret_cast<const cuda::bf16_t*>(GU.get()), reinterpret_cast<cuda::bf16_t*>(Act.get()), T, I,
               nullptr);
  std::vector<int32_t> rows_of{0}, scatter;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t t = g; t < T; t += G) scatter.push_back(int32_t(T - 1 - t));
    rows_of.push_back(int32_t(scatter.size()));
  }
  DeviceVec<int32_t> Rows(rows_of), Scatter(scatter);
  DeviceVec<float> workspace(8 * T * N);
  for (bool grouped : {false, true})
    for (int variant : {1, 8, -8})
      for (int config : {7, 8, 9, 10}) {
        auto product = [&](bool fused) {
          DeviceVec<float> out(T * N);
          out.poison();
          workspace.poison();
          auto g = testing::gemm_args(fused ? GU.get() : Act.get(), fused ? 2 * I : I, W.get(), I, T, N, I,
                                      variant < 0 ? 8 : variant, out.get());
          g.a_swiglu_up = fused ? I : 0;
          if (grouped) {
            g.group_rows = Rows.get();
            g.group_rows_settled = true;
            g.groups = int(G);
            g.w_group_stride = N * I;
            g.out_scatter = Scatter.get();
          }
          if (variant < 0) {
            g.split_workspace = workspace.get();
            g.split_workspace_floats = workspace.n;
          }
          cuda::gemm_with_config(g, config, nullptr);
          return out.take();
        };
        EXPECT_TRUE(same_bits_f(product(true), product(false)))
            << "grouped " << grouped << " chunks " << variant << " config " << config;
      }
}

// A configuration that cannot apply SwiGLU on load refuses it instead of ignoring it.
TEST(CudaGemm, SwigluOnLoadNeedsASmallStepConfiguration) {
  LS_SKIP_WITHOUT_GPU();
  DeviceVec<uint16_t> A(8 * 64), W(16 * 32);
  DeviceVec<float> out(8 * 16);
  auto g = testing::gemm_args(A.get(), 64, W.get(), 32, 8, 16, 32, 1, out.get());
  g.a_swiglu_up = 32;
  EXPECT_THROW(cuda::gemm_with_config(g, 3, nullptr), Error);
  EXPECT_NO_THROW(cuda::gemm_with_config(g, 8, nullptr));
}

}  // namespace
}  // namespace lockstep
