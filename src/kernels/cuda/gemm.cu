#include "kernels/cuda/gemm.h"

#include <algorithm>

#include "kernels/cuda/common.cuh"

namespace lockstep::cuda {
namespace {

// K tile: fixed for every configuration, so the zero padding of a chunk (and therefore the
// sequence of mma steps each element sees) is the same whatever tile shape runs.
constexpr int kBK = 64;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  int bytes = valid ? 16 : 0;  // 0 bytes read: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Offset (elements) of 16-byte piece `piece` of row `row` in a [rows][kBK] tile, swizzled so
// that the 8 rows an ldmatrix reads fall in 8 different bank groups.
__device__ __forceinline__ int swz(int row, int piece) { return row * kBK + ((piece ^ (row & 7)) << 3); }

// MODE 0: column form. MODE 1: canonical row form, the 8 chunk sums folded by the tree in
// registers. MODE 2: the same chunk sums, one chunk per blockIdx.z, each written in fp32 to
// the split workspace; combine_chunks_kernel then applies the same tree and epilogue, so
// MODE 1 and MODE 2 give the same bits (MODE 2 has 8x the CTAs, for latency-bound steps).
template <int WM, int WN, int MI, int NI, int STAGES, int MODE>
__global__ void __launch_bounds__(WM* WN * 32) gemm_kernel(GemmArgs p, bool vec) {
  constexpr bool CHUNKED = MODE == 1, SPLIT = MODE == 2;
  constexpr int BM = WM * MI * 16, BN = WN * NI * 8, THREADS = WM * WN * 32;
  constexpr int A_ITERS = (BM * 8 + THREADS - 1) / THREADS, B_ITERS = (BN * 8 + THREADS - 1) / THREADS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sA = reinterpret_cast<bf16*>(smem_raw);
  bf16* sB = sA + STAGES * BM * kBK;
  __shared__ int s_group, s_row0, s_row_end;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Which group and which rows this CTA covers (groups laid out one after another).
  if (warp == 0) {
    if (p.group_rows == nullptr) {
      if (lane == 0) {
        s_group = 0;
        s_row0 = int(blockIdx.x) * BM;
        s_row_end = int(p.M);
      }
    } else {
      if (lane == 0) s_group = -1;
      __syncwarp();
      int carry = 0;
      const int bx = int(blockIdx.x);
      // 128 groups per round, all their bounds loaded before the first use: one memory
      // latency per round instead of one per 32 groups (decode steps are latency-bound).
      for (int base = 0; base < p.groups; base += 128) {
        int begin[4], end[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int g = base + 32 * i + lane;
          begin[i] = g < p.groups ? p.group_rows[g] : 0;
          end[i] = g < p.groups ? p.group_rows[g + 1] : 0;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int g = base + 32 * i + lane;
          const int tiles = (end[i] - begin[i] + BM - 1) / BM;
          int incl = tiles;
          for (int o = 1; o < 32; o <<= 1) {
            int v = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += v;
          }
          const int first = carry + incl - tiles;
          if (g < p.groups && bx >= first && bx < first + tiles) {
            s_group = g;
            s_row0 = begin[i] + (bx - first) * BM;
            s_row_end = end[i];
          }
          carry += __shfl_sync(0xffffffffu, incl, 31);
        }
        if (carry > bx) break;
      }
    }
  }
  __syncthreads();
  const int group = s_group, row0 = s_row0, row_end = s_row_end;
  if (group < 0 || row0 >= row_end) return;
  const int n0 = int(blockIdx.y) * BN;
  const int K = int(p.K), N = int(p.N);
  const bf16* W = p.W + int64_t(group) * p.w_group_stride;
  const int chunk_len = (CHUNKED || SPLIT) ? (K + 7) / 8 : K;
  const int tiles_per_chunk = (chunk_len + kBK - 1) / kBK;
  const int total_tiles = (CHUNKED ? 8 : 1) * tiles_per_chunk;
  const int kt0 = SPLIT ? int(blockIdx.z) * tiles_per_chunk : 0;  // first K tile of this CTA

  // The rows each thread loads are the same for every K tile: resolve them once.
  const bf16* a_row[A_ITERS];
  const bf16* b_row[B_ITERS];
#pragma unroll
  for (int i = 0; i < A_ITERS; ++i) {
    int idx = tid + i * THREADS, r = row0 + idx / 8;
    a_row[i] = nullptr;
    if (idx < BM * 8 && r < row_end) a_row[i] = p.A + int64_t(p.a_gather ? p.a_gather[r] : r) * p.lda;
  }
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    int idx = tid + i * THREADS, n = n0 + idx / 8;
    b_row[i] = nullptr;
    if (idx < BN * 8 && n < N) b_row[i] = W + int64_t(n) * p.ldw;
  }

  auto load_tile = [&](int stage, int kt) {
    const int c = kt / tiles_per_chunk, j = kt % tiles_per_chunk;
    const int k_begin = c * chunk_len + j * kBK;
    const int k_end = min(c * chunk_len + chunk_len, K);
    bf16* a_s = sA + stage * BM * kBK;
    bf16* b_s = sB + stage * BN * kBK;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      int idx = tid + i * THREADS;
      if (idx >= BM * 8) break;
      int r = idx / 8, piece = idx % 8, k = k_begin + piece * 8;
      bf16* dst = a_s + swz(r, piece);
      if (vec) {
        bool valid = a_row[i] && k < k_end;
        cp_async16(smem_addr(dst), valid ? a_row[i] + k : p.A, valid);
      } else {
        for (int e = 0; e < 8; ++e)
          dst[e] = (a_row[i] && k + e < k_end) ? a_row[i][k + e] : __float2bfloat16_rn(0.0f);
      }
    }
#pragma unroll
    for (int i = 0; i < B_ITERS; ++i) {
      int idx = tid + i * THREADS;
      if (idx >= BN * 8) break;
      int r = idx / 8, piece = idx % 8, k = k_begin + piece * 8;
      bf16* dst = b_s + swz(r, piece);
      if (vec) {
        bool valid = b_row[i] && k < k_end;
        cp_async16(smem_addr(dst), valid ? b_row[i] + k : p.W, valid);
      } else {
        for (int e = 0; e < 8; ++e)
          dst[e] = (b_row[i] && k + e < k_end) ? b_row[i][k + e] : __float2bfloat16_rn(0.0f);
      }
    }
  };

  float acc[MI][NI][4];
  float s0[CHUNKED ? MI : 1][CHUNKED ? NI : 1][4], s1[CHUNKED ? MI : 1][CHUNKED ? NI : 1][4],
      s2[CHUNKED ? MI : 1][CHUNKED ? NI : 1][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < total_tiles) load_tile(s, kt0 + s);
    cp_async_commit();
  }

  const int warp_m = warp / WN, warp_n = warp % WN;
  for (int kt = 0; kt < total_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      int nt = kt + STAGES - 1;
      if (nt < total_tiles) load_tile(nt % STAGES, kt0 + nt);
      cp_async_commit();
    }
    const bf16* a_s = sA + (kt % STAGES) * BM * kBK;
    const bf16* b_s = sB + (kt % STAGES) * BN * kBK;
    // k16 steps that hold only the zero padding of a chunk are skipped (the same rule for
    // every tile shape, so every element still sees one fixed sequence of mma steps).
    const int k_live = min(kBK, chunk_len - ((kt0 + kt) % tiles_per_chunk) * kBK);
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      if (kk * 16 >= k_live) break;
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        int r = warp_m * MI * 16 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], smem_addr(a_s + swz(r, kk * 2 + (lane >> 4))));
      }
#pragma unroll
      for (int nj = 0; nj < NI / 2; ++nj) {
        int n = warp_n * NI * 8 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r4[4];
        ldmatrix_x4(r4, smem_addr(b_s + swz(n, kk * 2 + ((lane >> 3) & 1))));
        bfr[2 * nj][0] = r4[0];
        bfr[2 * nj][1] = r4[1];
        bfr[2 * nj + 1][0] = r4[2];
        bfr[2 * nj + 1][1] = r4[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
    }
    if constexpr (CHUNKED) {
      if (kt % tiles_per_chunk == tiles_per_chunk - 1) {
        // Fold the finished chunk into the tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)).
        const int c = kt / tiles_per_chunk;
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float& a = acc[mi][ni][e];
              switch (c) {
                case 0: case 2: case 4: case 6: s0[mi][ni][e] = a; a = 0.0f; break;
                case 1: s1[mi][ni][e] = s0[mi][ni][e] + a; a = 0.0f; break;
                case 3: s1[mi][ni][e] = s1[mi][ni][e] + (s0[mi][ni][e] + a); a = 0.0f; break;
                case 5: s2[mi][ni][e] = s0[mi][ni][e] + a; a = 0.0f; break;
                default: a = s1[mi][ni][e] + (s2[mi][ni][e] + (s0[mi][ni][e] + a)); break;
              }
            }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: lane holds rows lane/4 and lane/4 + 8, columns 2 * (lane % 4) + {0, 1}.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + warp_m * MI * 16 + mi * 16 + (lane >> 2) + h * 8;
        const int n = n0 + warp_n * NI * 8 + ni * 8 + (lane & 3) * 2;
        if (row >= row_end || n >= N) continue;
        const float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
        const bool pair = n + 1 < N;
        if constexpr (SPLIT) {
          float* w = p.split_workspace + (int64_t(blockIdx.z) * p.M + row) * N + n;
          w[0] = v0;
          if (pair) w[1] = v1;
          continue;
        }
        const int64_t o = int64_t(p.out_scatter ? p.out_scatter[row] : row) * p.ldo + n;
        if (p.out_kind == GemmOut::f32) {
          if (pair) *reinterpret_cast<float2*>(p.out_f32 + o) = make_float2(v0, v1);
          else p.out_f32[o] = v0;
        } else if (p.out_kind == GemmOut::bf16) {
          if (pair) *reinterpret_cast<__nv_bfloat162*>(p.out_bf16 + o) = __floats2bfloat162_rn(v0, v1);
          else p.out_bf16[o] = to_bf16(v0);
        } else {
          float r0 = to_f32(p.resid[o]) + round_bf16(v0);
          if (pair) {
            float r1 = to_f32(p.resid[o + 1]) + round_bf16(v1);
            *reinterpret_cast<__nv_bfloat162*>(p.out_bf16 + o) = __floats2bfloat162_rn(r0, r1);
          } else {
            p.out_bf16[o] = to_bf16(r0);
          }
        }
      }
}

// The tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)) over the 8 chunk partials of MODE 2, then
// the epilogue of the output kind: the same operations as MODE 1's fold and epilogue.
__global__ void combine_chunks_kernel(GemmArgs p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.M * p.N) return;
  const int64_t row = i / p.N, n = i % p.N, plane = p.M * p.N;
  const float* w = p.split_workspace + i;
  const float left = (w[0] + w[plane]) + (w[2 * plane] + w[3 * plane]);
  const float v = left + ((w[4 * plane] + w[5 * plane]) + (w[6 * plane] + w[7 * plane]));
  const int64_t o = int64_t(p.out_scatter ? p.out_scatter[row] : row) * p.ldo + n;
  if (p.out_kind == GemmOut::f32) p.out_f32[o] = v;
  else if (p.out_kind == GemmOut::bf16) p.out_bf16[o] = to_bf16(v);
  else p.out_bf16[o] = to_bf16(to_f32(p.resid[o]) + round_bf16(v));
}

template <int WM, int WN, int MI, int NI, int STAGES, int MODE>
void launch(const GemmArgs& p, cudaStream_t stream) {
  constexpr bool CHUNKED = MODE != 0;
  constexpr int BM = WM * MI * 16, BN = WN * NI * 8, THREADS = WM * WN * 32;
  constexpr size_t smem = size_t(STAGES) * (BM + BN) * kBK * sizeof(bf16);
  auto kernel = gemm_kernel<WM, WN, MI, NI, STAGES, MODE>;
  static const bool configured = [&] {
    LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)configured;
  const int64_t chunk_len = CHUNKED ? (p.K + 7) / 8 : p.K;
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  const bool vec = chunk_len % 8 == 0 && p.K % 8 == 0 && p.lda % 8 == 0 && p.ldw % 8 == 0 &&
                   p.w_group_stride % 8 == 0 && aligned(p.A) && aligned(p.W);
  int64_t tiles_m = ceil_div(p.M, BM);
  if (p.group_rows) tiles_m += std::min<int64_t>(p.groups, p.M);
  dim3 grid(unsigned(tiles_m), unsigned(ceil_div(p.N, BN)), MODE == 2 ? 8u : 1u);
  LS_CHECK(grid.y <= 65535, "gemm: N = ", p.N, " is too large for one launch");
  kernel<<<grid, THREADS, smem, stream>>>(p, vec);
  LS_CUDA_LAUNCHED();
  if constexpr (MODE == 2) {
    combine_chunks_kernel<<<unsigned(ceil_div(p.M * p.N, 256)), 256, 0, stream>>>(p);
    LS_CUDA_LAUNCHED();
  }
}

template <int MODE>
void launch_config(const GemmArgs& p, int config, cudaStream_t stream) {
  switch (config) {
    case 0: return launch<1, 2, 1, 2, 8, MODE>(p, stream);  // 16 x 32
    case 1: return launch<1, 4, 1, 2, 6, MODE>(p, stream);  // 16 x 64
    case 6: return launch<1, 1, 1, 2, 8, MODE>(p, stream);  // 16 x 16, one warp: most CTAs
    default:
      if constexpr (MODE == 2) {
        return launch<1, 4, 1, 2, 6, MODE>(p, stream);  // split: small tiles only
      } else {
        switch (config) {
        case 2: return launch<2, 2, 2, 4, 4, MODE>(p, stream);  // 64 x 64
        case 3: return launch<2, 4, 2, 4, 4, MODE>(p, stream);  // 64 x 128
        case 4:
          if constexpr (MODE == 1) return launch<2, 4, 2, 4, 4, MODE>(p, stream);  // the tree needs 4 accumulators
          else return launch<2, 4, 4, 4, 4, MODE>(p, stream);                     // 128 x 128
        default:
          if constexpr (MODE == 1) return launch<2, 4, 2, 4, 4, MODE>(p, stream);
          else return launch<2, 4, 4, 8, 3, MODE>(p, stream);  // 128 x 256, warp tile 64 x 64
        }
      }
  }
}

}  // namespace

void gemm_with_config(const GemmArgs& p, int config, cudaStream_t stream) {
  LS_CHECK(p.chunks == 1 || p.chunks == 8, "gemm: chunks must be 1 or 8, got ", p.chunks);
  LS_CHECK(p.M >= 0 && p.N > 0 && p.K > 0, "gemm: bad shape M=", p.M, " N=", p.N, " K=", p.K);
  LS_CHECK(p.M < (int64_t(1) << 31) && p.K < (int64_t(1) << 31), "gemm: shape too large");
  LS_CHECK(config >= 0 && config < kGemmConfigs, "gemm: no tile configuration ", config);
  if (p.M == 0) return;
  if (p.chunks == 8 && p.split_workspace != nullptr) {
    LS_CHECK(8 * p.M * p.N <= p.split_workspace_floats, "gemm: the split workspace holds ", p.split_workspace_floats,
             " floats, ", 8 * p.M * p.N, " needed");
    launch_config<2>(p, config, stream);
  } else if (p.chunks == 8) {
    launch_config<1>(p, config, stream);
  } else {
    launch_config<0>(p, config, stream);
  }
}

void gemm(const GemmArgs& args, cudaStream_t stream) {
  GemmArgs p = args;
  const int64_t groups = p.group_rows ? std::max<int64_t>(1, std::min<int64_t>(p.groups, p.M)) : 1;
  const int64_t rows = p.rows_hint >= 0 ? p.rows_hint : p.M / groups;
  // Only speed depends on the choice: every configuration gives the same bits.
  int config;
  if (rows <= 16) config = ceil_div(p.N, 64) * groups < 264 ? 0 : 1;
  else if (rows <= 64) config = ceil_div(p.N, 128) * groups * ceil_div(rows, 64) < 132 ? 2 : 3;
  else config = rows >= 128 && p.chunks == 1 ? 5 : 4;
  // The row form with fewer CTAs than SMs (o_proj at one token): one chunk per CTA, in
  // one-warp 16x16 tiles (2 x 8 = 16x the CTAs), when the workspace allows. Measured (H200,
  // ncu): o_proj at b1 52 -> 27 us; splitting what already has 512 CTAs (down) lost time.
  const bool split = p.chunks == 8 && rows <= 16 && p.split_workspace != nullptr &&
                     8 * p.M * p.N <= p.split_workspace_floats && ceil_div(p.N, 32) * groups * ceil_div(rows, 16) < 132;
  if (split) config = 6;
  if (!split) p.split_workspace = nullptr;
  gemm_with_config(p, config, stream);
}

}  // namespace lockstep::cuda
