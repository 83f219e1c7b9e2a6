// Hopper warpgroup-MMA (wgmma, sm_90a) kernels of the batch-invariant GEMM (gemm.h), and the
// probe that shows one wgmma k16 step rounds like one mma.sync m16n8k16 step. Operands are
// staged in wgmma.cuh's swizzled K tiles, which are also gemm.cu's shared-memory layout.
#include "kernels/cuda/gemm_wgmma.h"

#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_common.cuh"
#include "kernels/cuda/gemm_tma.h"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda {
namespace {

// ---------------------------------------------------------------------------------------
// The probe: one warpgroup, 64 rows x 128 columns, K tiles of 64 staged by plain loads.
__global__ void __launch_bounds__(128) wgmma_probe_kernel(const bf16* A, const bf16* W, int N, int K, int chunks,
                                                          bool scale_d_zero, float* out) {
  __shared__ __align__(1024) bf16 sA[64 * 64];
  __shared__ __align__(1024) bf16 sB[128 * 64];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n0 = int(blockIdx.y) * 128;
  const int chunk_len = chunks == 8 ? (K + 7) / 8 : K, tiles_per_chunk = (chunk_len + 63) / 64;
  const float start_value = scale_d_zero ? __int_as_float(0x7fffffff) : 0.0f;  // NaN must never show
  float acc[64], s0[64], s1[64], s2[64];
  for (int i = 0; i < 64; ++i) acc[i] = start_value;
  for (int c = 0; c < chunks; ++c) {
    for (int j = 0; j < tiles_per_chunk; ++j) {
      const int k_begin = c * chunk_len + j * 64, k_end = min(c * chunk_len + chunk_len, K);
      for (int idx = tid; idx < (64 + 128) * 64; idx += 128) {
        const int r = idx / 64, k = idx % 64, piece = k / 8;
        const bool is_a = r < 64;
        const int row = is_a ? r : r - 64;
        const bf16 v = k_begin + k < k_end
                           ? (is_a ? A[int64_t(row) * K + k_begin + k] : W[int64_t(n0 + row) * K + k_begin + k])
                           : __float2bfloat16_rn(0.0f);
        (is_a ? sA : sB)[row * 64 + ((piece ^ (row & 7)) << 3) + k % 8] = v;
      }
      fence_proxy_async();
      __syncthreads();
      const int k_live = min(64, chunk_len - j * 64);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if (kk * 16 >= k_live) break;
        const int scale_d = (scale_d_zero && j == 0 && kk == 0) ? 0 : 1;
        wgmma_m64n128k16(acc, smem_desc(smem_addr(sA) + kk * 32), smem_desc(smem_addr(sB) + kk * 32), scale_d);
      }
      wgmma_commit();
      wgmma_wait<0>();
      pin_registers(acc);
      __syncthreads();
    }
    if (chunks == 8) {
      fold_chunk<64>(
          c, [&](int i) -> float& { return acc[i]; }, [&](int i) -> float& { return s0[i]; },
          [&](int i) -> float& { return s1[i]; }, [&](int i) -> float& { return s2[i]; });
      if (c < 7)
        for (int i = 0; i < 64; ++i) acc[i] = start_value;
    }
  }
  // Accumulator layout: warp w holds rows 16 w + lane / 4 (+ 8), columns 8 j + 2 (lane % 4) + {0, 1}.
  for (int j = 0; j < 16; ++j)
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * warp + (lane >> 2) + 8 * h, n = n0 + 8 * j + 2 * (lane & 3);
      out[int64_t(row) * N + n] = acc[4 * j + 2 * h];
      out[int64_t(row) * N + n + 1] = acc[4 * j + 2 * h + 1];
    }
}


// ---------------------------------------------------------------------------------------
// The GEMM: CTAs of 128 rows x BN columns, two warpgroups of 64 rows each, K tiles of 64
// staged by cp.async (every thread) in a ring of STAGES, loaded STAGES - 2 tiles ahead; each
// K tile is up to 4 wgmma m64nBNk16 steps per warpgroup, the warpgroup keeps one tile's
// wgmma in flight while the next is issued. Per element: zeroed accumulator, then the k16
// steps of its K (or of each chunk) in ascending k with scale-d = 1, k16 steps wholly in a
// chunk's zero padding skipped: the sequence of the mma.sync kernels (the probe shows one
// wgmma k16 step rounds like one mma.sync step), so the same bits.
// TREE: the row form; each finished chunk is folded by fold_chunk's additions, with the
// partial s1 in registers, and SMEM_PARTIALS of s2, s0 (in that order) in shared memory
// rather than registers (each thread its own words: no bank conflicts, no barrier).

constexpr int kWgBM = 128, kWgBK = 64, kWgThreads = 256;

template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS>
constexpr size_t wgmma_smem_bytes() {
  return 1024 + size_t(STAGES) * (kWgBM + BN) * kWgBK * 2 +
         (TREE ? size_t(SMEM_PARTIALS) * (BN / 2) * kWgThreads * sizeof(float) : 0);
}

template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS, bool DRAIN>
__global__ void __launch_bounds__(kWgThreads, 1) wgmma_gemm_kernel(GemmArgs p) {
  static_assert(BN == 64 || BN == 128 || BN == 256, "wgmma tiles are 64, 128 or 256 columns");
  static_assert(SMEM_PARTIALS >= 0 && SMEM_PARTIALS <= 2, "s2, then s0, may live in shared memory");
  static_assert(STAGES >= 3, "the ring keeps one K tile in the tensor cores and loads ahead");
  constexpr int BM = kWgBM, BK = kWgBK, THREADS = kWgThreads, R = BN / 2;  // R accumulators per thread
  // K tiles loaded ahead: with DRAIN each tile's wgmma finish before the next tile, so one more
  // stage is free for loads.
  constexpr int AHEAD = DRAIN ? STAGES - 1 : STAGES - 2;
  constexpr int A_ITERS = BM * 8 / THREADS, B_ITERS = BN * 8 / THREADS;   // 16-byte pieces per thread
  extern __shared__ unsigned char smem_raw[];
  __shared__ int s_group, s_row0, s_row_end;
  // 1024-byte aligned tiles (the 128-byte swizzle repeats every 8 rows of 128 bytes).
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t sA = base, sB = base + STAGES * BM * BK * 2;
  float* sP = reinterpret_cast<float*>(smem + size_t(STAGES) * (BM + BN) * BK * 2) + threadIdx.x;

  const int tid = threadIdx.x, warp = tid >> 5, wg = warp >> 2;
  start_after_previous();  // rows, gather lists and A come from the previous kernels
  // The column tiles of a row tile are consecutive CTAs: CTAs running together share A rows
  // (and a group's weights) in L2 instead of re-reading A from memory for every column tile.
  const int tiles_n = (int(p.N) + BN - 1) / BN, tile_m = int(blockIdx.x) / tiles_n;
  const int tile_n = int(blockIdx.x) - tile_m * tiles_n;
  find_row_tile<kWgBM>(p, tile_m, s_group, s_row0, s_row_end);
  __syncthreads();
  const int group = s_group, row0 = s_row0, row_end = s_row_end;
  if (group < 0 || row0 >= row_end) return;
  const int n0 = tile_n * BN, K = int(p.K), N = int(p.N);
  const bf16* W = p.W + int64_t(group) * p.w_group_stride;
  const int chunk_len = TREE ? (K + 7) / 8 : K;
  const int tiles_per_chunk = (chunk_len + BK - 1) / BK;
  const int total_tiles = (TREE ? 8 : 1) * tiles_per_chunk;

  // Piece i of a K tile for this thread: row (tid + i THREADS) / 8, 16-byte piece tid % 8.
  const int piece = tid & 7;
  const bf16* a_row[A_ITERS];
  const bf16* b_row[B_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    const int r = row0 + (tid + i * THREADS) / 8;
    a_row[i] = r < row_end ? p.A + int64_t(p.a_gather ? p.a_gather[r] : r) * p.lda : nullptr;
  }
  // The SwiGLU output (BN = 256): the tile's rows are gate rows c0 .. c0 + 127 and the up rows
  // I + c0 .. of its 128 output columns c0 = n0 / 2, so a thread holds a column's gate and up.
  const bool swiglu = BN == 256 && !TREE && p.out_kind == GemmOut::bf16_swiglu;
  const int half = N / 2;
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    const int r = (tid + i * THREADS) / 8;
    if (swiglu) {
      const int c = n0 / 2 + (r & 127);
      b_row[i] = c < half ? W + int64_t(r < 128 ? c : half + c) * p.ldw : nullptr;
    } else {
      const int n = n0 + r;
      b_row[i] = n < N ? W + int64_t(n) * p.ldw : nullptr;
    }
  }
  struct TilePos {
    int c, j;  // chunk, K tile within the chunk
  };
  auto next_pos = [&](TilePos t) {
    if (++t.j == tiles_per_chunk) t.j = 0, ++t.c;
    return t;
  };
  auto load_tile = [&](int stage, TilePos t) {
    const int k = t.c * chunk_len + t.j * BK + piece * 8, k_end = min(t.c * chunk_len + chunk_len, K);
    const bool k_ok = k < k_end;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      const int r = (tid + i * THREADS) / 8;
      const bool valid = a_row[i] && k_ok;
      cp_async16(sA + stage * BM * BK * 2 + r * 128 + ((piece ^ (r & 7)) << 4), valid ? a_row[i] + k : p.A, valid);
    }
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      const int r = (tid + i * THREADS) / 8;
      const bool valid = b_row[i] && k_ok;
      cp_async16(sB + stage * BN * BK * 2 + r * 128 + ((piece ^ (r & 7)) << 4), valid ? b_row[i] + k : p.W, valid);
    }
  };

  float acc[R];
  constexpr bool S2_SMEM = SMEM_PARTIALS >= 1, S0_SMEM = SMEM_PARTIALS == 2;
  float s0[TREE && !S0_SMEM ? R : 1], s1[TREE ? R : 1], s2[TREE && !S2_SMEM ? R : 1];
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = 0.0f;

  TilePos load_pos{0, 0};
#pragma unroll
  for (int s = 0; s < AHEAD; ++s) {
    if (s < total_tiles) load_tile(s, load_pos);
    load_pos = next_pos(load_pos);
    cp_async_commit();
  }
  const uint64_t desc_a = smem_desc(sA + wg * 64 * BK * 2), desc_b = smem_desc(sB);
  TilePos cur{0, 0};
  for (int kt = 0; kt < total_tiles; ++kt, cur = next_pos(cur)) {
    cp_async_wait<AHEAD - 1>();  // this thread's pieces of tile kt have landed
    fence_proxy_async();         // ... and are visible to the tensor cores
    __syncthreads();             // everyone's pieces; every warpgroup is done with tile kt - 2
    if (kt + AHEAD < total_tiles) load_tile((kt + AHEAD) % STAGES, load_pos);
    load_pos = next_pos(load_pos);
    cp_async_commit();
    const int stage = kt % STAGES;
    const uint64_t da = desc_a + uint64_t((stage * BM * BK * 2) >> 4);
    const uint64_t db = desc_b + uint64_t((stage * BN * BK * 2) >> 4);
    const int k_live = min(BK, chunk_len - cur.j * BK);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk)
      if (kk * 16 < k_live) wgmma_step<BN>(acc, da + 2 * kk, db + 2 * kk);  // + 32 bytes per k16 step
    wgmma_commit();
    if constexpr (TREE) {
      if (cur.j == tiles_per_chunk - 1) {
        wgmma_wait<0>();
        pin_registers(acc);
        fold_chunk<R>(
            cur.c, [&](int i) -> float& { return acc[i]; },
            [&](int i) -> float& { return S0_SMEM ? sP[(R + i) * THREADS] : s0[S0_SMEM ? 0 : i]; },
            [&](int i) -> float& { return s1[i]; },
            [&](int i) -> float& { return S2_SMEM ? sP[i * THREADS] : s2[S2_SMEM ? 0 : i]; });
        pin_registers(acc);
        continue;
      }
    }
    if constexpr (DRAIN) {
      wgmma_wait<0>();
      pin_registers(acc);
    } else {
      wgmma_wait<1>();
    }
  }
  wgmma_wait<0>();
  pin_registers(acc);
  cp_async_wait<0>();

  store_wgmma_tile<BN>(p, acc, row0, row_end, n0, wg);
}

// Whether 16-byte cp.async can load every piece (gemm.cu's vector_loads).
bool wgmma_loads_ok(const GemmArgs& p) {
  const int64_t chunk_len = p.chunks == 8 ? (p.K + 7) / 8 : p.K;
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  return chunk_len % 8 == 0 && p.K % 8 == 0 && p.lda % 8 == 0 && p.ldw % 8 == 0 && p.w_group_stride % 8 == 0 &&
         aligned(p.A) && aligned(p.W);
}

template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS, bool DRAIN = false>
void launch_wgmma(const GemmArgs& p, cudaStream_t stream) {
  constexpr size_t smem = wgmma_smem_bytes<BN, STAGES, TREE, SMEM_PARTIALS>();
  auto kernel = wgmma_gemm_kernel<BN, STAGES, TREE, SMEM_PARTIALS, DRAIN>;
  static const bool configured = allow_dynamic_smem(kernel, smem);
  (void)configured;
  const int64_t tiles_m = row_tiles_bound(p, kWgBM);
  const int64_t tiles_n = ceil_div(p.N, BN);
  LS_CHECK(tiles_m * tiles_n < (int64_t(1) << 31), "gemm: shape too large for one wgmma launch: M = ", p.M,
           ", N = ", p.N);
  launch_after_previous(kernel, dim3(unsigned(tiles_m * tiles_n)), dim3(kWgThreads), smem, stream, p);
}

}  // namespace

// Configurations (each gives the same bits as every mma.sync configuration):
// 0: column form 128 x 256 (4 stages, 193 KB); row form 128 x 64 with the tree's partials in
//    registers (8 stages, 193 KB).
// 1: column form 128 x 128 (7 stages, 225 KB); row form 128 x 128 with s1 in registers
//    (3 stages + s0, s2 in shared memory, 225 KB).
// 2: column form 128 x 64 (8 stages, 193 KB); row form 128 x 128 with s0, s1 in registers
//    (4 stages + s2 in shared memory, 193 KB).
// 3: configuration 0's column form and configuration 1's row form, each K tile's wgmma
//    finished before the next tile (DRAIN): one more K tile in flight.
// 4-6: the warp-specialized TMA kernels (gemm_tma.cu, its configurations 0-2) where they
//    apply, else configuration 0 (column form) or 3 (row form).
// H200, 16384 tokens (cuda_bench --gemm, ms): qkv 0.73 / 0.84 / 1.14 / 0.75 and gate_up 1.74 /
// 2.06 / 2.82 / 1.77 (the mma.sync 128 x 256: 1.24, 3.28); o_proj 0.97 / 0.84 / 0.90 / 0.74 and
// down 2.98 / 2.28 / 2.56 / 2.15 (the mma.sync 128 x 128 of 16 warps: 1.16, 2.70).
// Problems cp.async cannot load in 16-byte pieces go to the mma.sync 128 x 128 kernels.
bool gemm_wgmma_takes_swiglu(const GemmArgs& p, int config) {
  if (p.chunks != 1 || p.N % 2 != 0 || !wgmma_loads_ok(p)) return false;
  if (config >= 4 && !gemm_tma_applies(p)) config = 0;  // the TMA configurations' fallback
  return config == 0 || config == 3;
}

void gemm_wgmma_with_config(const GemmArgs& args, int config, cudaStream_t stream) {
  LS_CHECK(config >= 0 && config < kGemmWgmmaConfigs, "gemm: no wgmma configuration ", config);
  LS_CHECK(args.out_kind != GemmOut::bf16_swiglu || gemm_wgmma_takes_swiglu(args, config),
           "gemm: the SwiGLU output needs the 128 x 256 column form (wgmma configuration 0 or 3) and an even N; got "
           "configuration ", config, ", N = ", args.N);
  LS_CHECK(args.a_swiglu_up == 0, "gemm: SwiGLU on load needs a small-step configuration, got wgmma configuration ",
           config);
  if (args.M == 0) return;
  if (!wgmma_loads_ok(args)) return gemm_with_config(args, args.chunks == 8 ? 12 : 4, stream);
  GemmArgs p = args;
  p.split_workspace = nullptr;  // the tree is computed in the kernel (the same operations)
  if (config >= 4) {
    if (gemm_tma_applies(p)) return gemm_tma_with_config(p, config - 4, stream);
    config = p.chunks == 8 ? 3 : 0;  // e.g. chunks of part k16 steps: the cp.async kernels
  }
  if (p.chunks == 8) {
    if (config == 0) return launch_wgmma<64, 8, true, 0>(p, stream);
    if (config == 1) return launch_wgmma<128, 3, true, 2>(p, stream);
    if (config == 2) return launch_wgmma<128, 4, true, 1>(p, stream);
    return launch_wgmma<128, 3, true, 2, true>(p, stream);
  }
  if (config == 0) return launch_wgmma<256, 4, false, 0>(p, stream);
  if (config == 1) return launch_wgmma<128, 7, false, 0>(p, stream);
  if (config == 2) return launch_wgmma<64, 8, false, 0>(p, stream);
  return launch_wgmma<256, 4, false, 0, true>(p, stream);
}

void wgmma_probe(const bf16* A, const bf16* W, int N, int K, int chunks, WgmmaStart start, float* out) {
  LS_CHECK(N > 0 && N % 128 == 0, "wgmma_probe: N must be a positive multiple of 128, got ", N);
  LS_CHECK(K > 0 && K % 8 == 0, "wgmma_probe: K must be a positive multiple of 8, got ", K);
  LS_CHECK(chunks == 1 || chunks == 8, "wgmma_probe: chunks must be 1 or 8, got ", chunks);
  wgmma_probe_kernel<<<dim3(1, unsigned(N / 128)), 128>>>(A, W, N, K, chunks, start == WgmmaStart::scale_d_zero,
                                                          out);
  LS_CUDA_LAUNCHED();
  LS_CUDA_CHECK(cudaDeviceSynchronize());
}


}  // namespace lockstep::cuda
