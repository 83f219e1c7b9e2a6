// A development kernel for the L2-bound GEMMs (notes/gpu-trainer.md, session 21): the TMA
// GEMM's column form (gemm_tma.cu's structure: one producer thread, two consumer warpgroups,
// an mbarrier ring, persistent CTAs) in two variants of one kernel. Unicast: every CTA loads
// its own 128 rows of A and its whole W tile. Multicast: the two CTAs of a cluster take two
// row tiles of the same W tile, and each loads half of that W tile into both CTAs' shared
// memory (TMA multicast), so L2 feeds each CTA (128 + BN / 2) instead of (128 + BN) rows a
// stage. Each stage is handed back only when both CTAs' consumers are done with it (they
// arrive on both CTAs' empty barriers).
//
// Per element the sequence is the library's column form (a zeroed fp32 sum, then the k16
// steps of K in ascending k), so both variants must give the library's bits: each is checked
// against cuda::gemm on the same inputs (memcmp), then timed (median of 5), on the shapes of
// the trainer's short-K and grouped GEMMs. Not yet run on a GPU: the first run is its test.
//
//   tma_multicast_gemm
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_timing.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_common.cuh"
#include "kernels/cuda/mbarrier.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/tensor_map.h"
#include "kernels/cuda/wgmma.cuh"

namespace {

using namespace lockstep::cuda;

constexpr int kBM = 128, kBK = 64, kConsumers = 256, kThreads = kConsumers + 128;

// Work unit u: column tile u % tiles_n of row block u / tiles_n, a row block being 128 rows a
// CTA of the cluster (locate_row_tile's tiles of 128 CTAS rows, so both CTAs of a cluster stay
// in one group: one W tile).
template <int BN, int STAGES, bool MULTICAST>
__global__ void __launch_bounds__(kThreads, 1)
    dev_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w, GemmArgs p,
                    int tiles_n, int units) {
  constexpr int CTAS = MULTICAST ? 2 : 1;
  constexpr uint32_t A_BYTES = kBM * kBK * 2, W_BYTES = BN * kBK * 2, STAGE_BYTES = A_BYTES + W_BYTES;
  constexpr uint32_t W_PART = W_BYTES / CTAS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  const uint32_t bars = base + STAGES * STAGE_BYTES;
  auto full = [&](uint32_t s) { return bars + 8 * s; };
  auto empty = [&](uint32_t s) { return bars + 8 * (STAGES + s); };
  const int tid = int(threadIdx.x), lane = tid & 31, warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const uint32_t rank = MULTICAST ? cluster_rank() : 0;
  const int first_unit = int(blockIdx.x) / CTAS, unit_step = int(gridDim.x) / CTAS;
  if (tid == 0) {
    for (uint32_t s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), CTAS * kConsumers / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (MULTICAST)
    cluster_sync();
  else
    __syncthreads();
  const int K = int(p.K), N = int(p.N), k_tiles = (K + kBK - 1) / kBK;

  if (warp == kConsumers / 32) {  // the producer warp (lane 0 issues)
    uint32_t it = 0;
    for (int unit = first_unit; unit < units; unit += unit_step) {
      int group, row0, row_end;
      if (!locate_row_tile<kBM * CTAS>(p, unit / tiles_n, group, row0, row_end)) break;
      const int w_row = group * N + (unit % tiles_n) * BN, a_row = row0 + int(rank) * kBM;
      for (int j = 0; j < k_tiles; ++j, ++it) {
        const uint32_t s = it % STAGES, round = it / STAGES;
        if (lane != 0) continue;
        if (round > 0) mbar_wait(empty(s), (round - 1) & 1);
        mbar_arrive_expect_tx(full(s), STAGE_BYTES);  // A, and the whole W tile (both halves)
        tma_load(base + s * STAGE_BYTES, &map_a, full(s), j * kBK, a_row);
        if constexpr (MULTICAST)
          tma_load_multicast(base + s * STAGE_BYTES + A_BYTES + rank * W_PART, &map_w, full(s), j * kBK,
                             w_row + int(rank) * (BN / 2), uint16_t(0x3));
        else
          tma_load(base + s * STAGE_BYTES + A_BYTES, &map_w, full(s), j * kBK, w_row);
      }
    }
  } else if (warp < kConsumers / 32) {  // the consumers: warpgroup wg computes rows 64 wg ..
    const int wg = warp >> 2;
    uint32_t it = 0;
    for (int unit = first_unit; unit < units; unit += unit_step) {
      int group, row0, row_end;
      if (!locate_row_tile<kBM * CTAS>(p, unit / tiles_n, group, row0, row_end)) break;
      (void)group;
      float acc[BN / 2];
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc[i] = 0.0f;
      for (int j = 0; j < k_tiles; ++j, ++it) {
        const uint32_t s = it % STAGES;
        mbar_wait(full(s), (it / STAGES) & 1);
        const uint64_t da = smem_desc(base + s * STAGE_BYTES + wg * 64 * kBK * 2);
        const uint64_t db = smem_desc(base + s * STAGE_BYTES + A_BYTES);
        const int k_live = min(kBK, K - j * kBK);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBK / 16; ++kk)
          if (kk * 16 < k_live) wgmma_step<BN>(acc, da + 2 * kk, db + 2 * kk);
        wgmma_commit();
        wgmma_wait<0>();
        __syncwarp();
        if constexpr (MULTICAST) {
          if (lane < 2) mbar_arrive_in(empty(s), uint32_t(lane));
        } else if (lane == 0) {
          mbar_arrive(empty(s));
        }
      }
      store_wgmma_tile<BN>(p, acc, row0 + int(rank) * kBM, row_end, (unit % tiles_n) * BN, wg);
    }
  }
  if constexpr (MULTICAST) cluster_sync();
}

template <int BN, int STAGES, bool MULTICAST>
void launch_dev(const GemmArgs& p, cudaStream_t stream) {
  constexpr int CTAS = MULTICAST ? 2 : 1;
  constexpr size_t smem = 1024 + size_t(STAGES) * (kBM + BN) * kBK * 2 + 16 * STAGES;
  auto kernel = dev_gemm_kernel<BN, STAGES, MULTICAST>;
  static const bool configured = allow_dynamic_smem(kernel, smem);
  (void)configured;
  const int64_t groups = p.group_rows ? p.groups : 1;
  const CUtensorMap map_a = bf16_tensor_map(p.A, p.M, p.K, p.lda, kBM, "dev gemm");
  const CUtensorMap map_w = bf16_tensor_map(p.W, groups * p.N, p.K, p.ldw, BN / CTAS, "dev gemm");
  const int64_t tiles_n = ceil_div(p.N, BN), units = tiles_n * row_tiles_bound(p, kBM * CTAS);
  static const int resident = MULTICAST ? max_active_clusters(kernel, kThreads, smem, CTAS) : sm_count();
  static const bool reported = [] {
    std::printf("{\"variant\":\"%s\",\"resident_clusters\":%d}\n", MULTICAST ? "multicast" : "unicast", resident);
    return true;
  }();
  (void)reported;
  const int64_t clusters = std::min<int64_t>(units, resident);
  launch_kernel(kernel, dim3(unsigned(clusters * CTAS)), dim3(kThreads), smem, stream, LaunchOptions{false, CTAS},
                map_a, map_w, p, int(tiles_n), int(units));
}

struct Shape {
  const char* name;
  int64_t M, N, K, groups;  // groups > 1: M rows in equal groups, one W of [N, K] each
};

void run(const Shape& shape) {
  const int64_t M = shape.M, N = shape.N, K = shape.K, G = shape.groups;
  bf16_t *a = nullptr, *w = nullptr;
  float *want = nullptr, *got = nullptr;
  int32_t* group_rows = nullptr;
  LS_CUDA_CHECK(cudaMalloc(&a, size_t(M * K) * 2));
  LS_CUDA_CHECK(cudaMalloc(&w, size_t(G * N * K) * 2));
  LS_CUDA_CHECK(cudaMalloc(&want, size_t(M * N) * 4));
  LS_CUDA_CHECK(cudaMalloc(&got, size_t(M * N) * 4));
  fill_random_bf16(a, M * K, 1, 1.0f, 0.0f, nullptr);
  fill_random_bf16(w, G * N * K, 2, 0.05f, 0.0f, nullptr);
  GemmArgs p;
  p.A = reinterpret_cast<const __nv_bfloat16*>(a);
  p.lda = K;
  p.W = reinterpret_cast<const __nv_bfloat16*>(w);
  p.ldw = K;
  p.M = M, p.N = N, p.K = K;
  p.out_kind = GemmOut::f32;
  p.ldo = N;
  if (G > 1) {
    std::vector<int32_t> bounds(static_cast<size_t>(G + 1));
    for (int64_t g = 0; g <= G; ++g) bounds[size_t(g)] = int32_t(g * M / G);
    LS_CUDA_CHECK(cudaMalloc(&group_rows, bounds.size() * 4));
    LS_CUDA_CHECK(cudaMemcpy(group_rows, bounds.data(), bounds.size() * 4, cudaMemcpyHostToDevice));
    p.group_rows = group_rows;
    p.groups = int(G);
    p.w_group_stride = N * K;
    p.rows_hint = M / G;
  }
  const double flop = 2.0 * double(M) * double(N) * double(K);
  GemmArgs ref = p;
  ref.out_f32 = want;
  const double ms_ref = lockstep::bench::cuda_median_ms([&] { gemm(ref, nullptr); });
  std::printf("{\"gemm\":\"%s\",\"variant\":\"library gemm\",\"ms\":%.3f,\"tflops\":%.1f,\"bits\":\"reference\"}\n",
              shape.name, ms_ref, flop / (ms_ref / 1e3) / 1e12);
  std::vector<char> want_h(size_t(M * N) * 4), got_h(want_h.size());
  LS_CUDA_CHECK(cudaMemcpy(want_h.data(), want, want_h.size(), cudaMemcpyDeviceToHost));
  GemmArgs dev = p;
  dev.out_f32 = got;
  const auto report = [&](const char* variant, auto launch) {
    LS_CUDA_CHECK(cudaMemset(got, 0xff, size_t(M * N) * 4));
    const double ms = lockstep::bench::cuda_median_ms([&] { launch(dev, nullptr); });
    LS_CUDA_CHECK(cudaMemcpy(got_h.data(), got, got_h.size(), cudaMemcpyDeviceToHost));
    const bool same = std::memcmp(got_h.data(), want_h.data(), want_h.size()) == 0;
    std::printf("{\"gemm\":\"%s\",\"variant\":\"%s\",\"ms\":%.3f,\"tflops\":%.1f,\"bits\":\"%s\"}\n", shape.name,
                variant, ms, flop / (ms / 1e3) / 1e12, same ? "same" : "DIFFER");
    std::fflush(stdout);
  };
  report("128x128 unicast", launch_dev<128, 6, false>);
  report("128x128 multicast W (2 CTAs)", launch_dev<128, 6, true>);
  report("128x256 unicast", launch_dev<256, 4, false>);
  report("128x256 multicast W (2 CTAs)", launch_dev<256, 4, true>);
  LS_CUDA_CHECK(cudaFree(a));
  LS_CUDA_CHECK(cudaFree(w));
  LS_CUDA_CHECK(cudaFree(want));
  LS_CUDA_CHECK(cudaFree(got));
  if (group_rows) LS_CUDA_CHECK(cudaFree(group_rows));
}

}  // namespace

int main() {
  try {
    // 4 x 2048 tokens of Qwen3-30B-A3B: the down projection's and o_proj's shapes in column
    // form (their row form's tiles read as much), qkv, and gate_up on expert-sorted rows.
    for (const Shape& s :
         {Shape{"down shape (K 768)", 8192, 2048, 768, 1}, Shape{"o_proj shape (K 4096)", 8192, 2048, 4096, 1},
          Shape{"qkv", 8192, 5120, 2048, 1}, Shape{"experts gate_up, 128 x 512 rows", 65536, 1536, 2048, 128}})
      run(s);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "tma_multicast_gemm: %s\n", e.what());
    return 1;
  }
}
