// Step 1 of the wgmma GEMM (issue 7): one Hopper wgmma m64nNk16 step must round its 16
// products and the accumulator exactly like one mma.sync m16n8k16 step, or wgmma cannot join
// the batch-invariant GEMM. The probe accumulates in registers over the k16 steps in
// ascending k (column form, and the row form's 8 chunks with the tree) and must equal the
// mma.sync kernels bit for bit, on data of mixed magnitudes with exact cancellation inside a
// k16 step (so a different internal rounding or alignment of the 16 products would show).
#include <cmath>
#include <cstdio>
#include <random>

#include "cuda_test_util.h"
#include "gemm_test_util.h"
#include "kernels/canonical.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_wgmma.h"

namespace lockstep {
namespace {

using testing::DeviceVec;

// rows x K bf16: magnitudes 2^-10 .. 2^6; in every k16 step of even rows the first three
// values are large (x 2^12) and repeated negated (A) or unchanged (W) 8 positions later, so
// even-row x even-column products cancel exactly inside the step around the small ones.
std::vector<uint16_t> mixed_bf16(int64_t rows, int64_t K, uint64_t seed, bool negate_copy) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> exponent(-10, 6), mantissa(0, 127), sign(0, 1);
  std::vector<uint16_t> out(size_t(rows * K));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      const int in_step = int(k % 16);
      float v = std::ldexp(1.0f + float(mantissa(rng)) / 128.0f, exponent(rng)) * (sign(rng) ? -1.0f : 1.0f);
      if (r % 2 == 0 && in_step < 3) v = std::ldexp(v, 12);
      if (r % 2 == 0 && in_step >= 8 && in_step < 11) {
        const float big = bf16_to_f32(out[size_t(r * K + k - 8)]);
        v = negate_copy ? -big : big;
      }
      out[size_t(r * K + k)] = f32_to_bf16(v);
    }
  return out;
}

std::vector<float> mma_sync_gemm(const DeviceVec<uint16_t>& A, const DeviceVec<uint16_t>& W, int64_t M, int64_t N,
                                 int64_t K, int chunks, int config) {
  DeviceVec<float> out(M * N);
  out.poison();
  auto g = testing::gemm_args(A.get(), K, W.get(), K, M, N, K, chunks, out.get());
  cuda::gemm_with_config(g, config, nullptr);
  return out.take();
}

TEST(CudaWgmmaProbe, OneWgmmaStepRoundsLikeOneMmaSyncStep) {
  LS_SKIP_WITHOUT_GPU();
  int device = 0, major = 0, minor = 0;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (major != 9) GTEST_SKIP() << "wgmma needs sm_90a, device is sm_" << major << minor;
  const int64_t M = 64, N = 256;
  for (int64_t K : {int64_t(2048), int64_t(768)}) {
    auto a = mixed_bf16(M, K, 11 + K, true), w = mixed_bf16(N, K, 12 + K, false);
    DeviceVec<uint16_t> A(a), W(w);
    for (int chunks : {1, 8}) {
      // The mma.sync kernels: the 128x128 tiled kernel, the small-step kernel, and the row
      // form's kernel with partials in shared memory (the column form's 128x128 at chunks 1).
      const auto expected = mma_sync_gemm(A, W, M, N, K, chunks, 4);
      for (int config : {10, 12})
        ASSERT_TRUE(testing::same_bits_f(mma_sync_gemm(A, W, M, N, K, chunks, config), expected)) << config;
      // The same function in float64 (the bits aside): the data and the probe are what we meant.
      const int64_t clen = chunks == 8 ? canonical_chunk(K) : K;
      int differs_from_sequential_fp32 = 0;
      for (int64_t r = 0; r < M; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double parts[8] = {0, 0, 0, 0, 0, 0, 0, 0}, scale = 0;
          float sequential = 0.0f;
          for (int64_t k = 0; k < K; ++k) {
            const double prod = double(bf16_to_f32(a[r * K + k])) * double(bf16_to_f32(w[n * K + k]));
            parts[k / clen] += prod;
            scale += std::abs(prod);
            sequential += float(prod);
          }
          double ref = 0;
          for (double x : parts) ref += x;
          ASSERT_NEAR(expected[r * N + n], ref, 1e-4 * scale) << "row " << r << " col " << n;
          differs_from_sequential_fp32 += sequential != expected[r * N + n];
        }
      for (auto start : {cuda::WgmmaStart::zeroed_registers, cuda::WgmmaStart::scale_d_zero}) {
        DeviceVec<float> out(M * N);
        out.poison();
        cuda::wgmma_probe(reinterpret_cast<const __nv_bfloat16*>(A.get()),
                          reinterpret_cast<const __nv_bfloat16*>(W.get()), int(N), int(K), chunks, start, out.get());
        const auto got = out.take();
        int differ = 0;
        int64_t first = -1;
        for (int64_t i = 0; i < M * N; ++i)
          if (std::memcmp(&got[i], &expected[i], 4) != 0) {
            ++differ;
            if (first < 0) first = i;
          }
        const char* how = start == cuda::WgmmaStart::zeroed_registers ? "zeroed registers" : "scale-d 0";
        std::printf("wgmma probe K=%lld chunks=%d start=%s: %d of %lld elements differ from mma.sync (%d differ "
                    "from a sequential fp32 sum)\n",
                    (long long)K, chunks, how, differ, (long long)(M * N), differs_from_sequential_fp32);
        EXPECT_EQ(differ, 0) << "K " << K << " chunks " << chunks << " start " << how << ": first at row "
                             << first / N << " col " << first % N << ": wgmma " << (first >= 0 ? got[first] : 0.0f)
                             << " mma.sync " << (first >= 0 ? expected[first] : 0.0f);
      }
    }
  }
}

}  // namespace
}  // namespace lockstep
