#include "kernels/cuda/gemm.h"

#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm_common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/gemm_tma.h"
#include "kernels/cuda/gemm_wgmma.h"

namespace lockstep::cuda {
namespace {

// K tile. Every element sees the same sequence of mma k16 steps in ascending k whatever the
// configuration (a K tile never crosses a chunk end; k16 steps wholly past a chunk's end are
// skipped), so every configuration gives the same bits. gemm_kernel can also stage wider K
// tiles (BK 128 / 256 give the same k16 sequence); measured slower at one token (notes).
constexpr int kBK = 64;

// Offset (elements) of 16-byte piece `piece` of row `row` in a [rows][BK] tile, swizzled so
// that the 8 rows an ldmatrix reads fall in 8 different bank groups.
template <int BK>
__device__ __forceinline__ int swz(int row, int piece) { return row * BK + ((piece ^ (row & 7)) << 3); }

// The mma B fragments of k16 step kk for NI n8 tiles: weight rows n_base .. n_base + 8 NI - 1
// of a swizzled [rows][BK] tile in shared memory.
template <int NI, int BK>
__device__ __forceinline__ void load_b_fragments(uint32_t (&bfr)[NI][2], const bf16* tile, int n_base, int kk,
                                                 int lane) {
  if constexpr (NI == 1) {
    uint32_t r2[2];
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r2[0]), "=r"(r2[1])
                 : "r"(smem_addr(tile + swz<BK>(n_base + (lane & 7), kk * 2 + ((lane >> 3) & 1)))));
    bfr[0][0] = r2[0];
    bfr[0][1] = r2[1];
  } else {
#pragma unroll
    for (int nj = 0; nj < NI / 2; ++nj) {
      const int n = n_base + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
      uint32_t r4[4];
      ldmatrix_x4(r4, smem_addr(tile + swz<BK>(n, kk * 2 + ((lane >> 3) & 1))));
      bfr[2 * nj][0] = r4[0];
      bfr[2 * nj][1] = r4[1];
      bfr[2 * nj + 1][0] = r4[2];
      bfr[2 * nj + 1][1] = r4[3];
    }
  }
}

// MODE 0: column form. MODE 1: canonical row form, the 8 chunk sums folded by the tree in
// registers. MODE 2: the same chunk sums, one chunk per blockIdx.z, each written in fp32 to
// the split workspace; combine_chunks_kernel then applies the same tree and epilogue, so
// MODE 1 and MODE 2 give the same bits (MODE 2 has 8x the CTAs, for latency-bound steps).
// MODE 3: MODE 1's tree with only the long-lived partial (c0+c1)+(c2+c3) in registers and
// the two short-lived ones in shared memory (each thread its own words), so twice the warps
// fit an SM: the same additions in the same order, so the same bits.
template <int WM, int WN, int MI, int NI, int STAGES, int MODE, int BK>
__global__ void __launch_bounds__(WM* WN * 32) gemm_kernel(GemmArgs p, bool vec) {
  constexpr bool CHUNKED = MODE == 1, SPLIT = MODE == 2, TREE_SMEM = MODE == 3, TREE = CHUNKED || TREE_SMEM;
  constexpr int BM = WM * MI * 16, BN = WN * NI * 8, THREADS = WM * WN * 32;
  constexpr int PIECES = BK / 8;  // 16-byte pieces per row of a K tile
  constexpr int A_ITERS = (BM * PIECES + THREADS - 1) / THREADS, B_ITERS = (BN * PIECES + THREADS - 1) / THREADS;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16* sA = reinterpret_cast<bf16*>(smem_raw);
  bf16* sB = sA + STAGES * BM * BK;
  __shared__ int s_group, s_row0, s_row_end;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Grouped rows come from the previous kernels (expert assignment): wait before reading.
  if (p.group_rows != nullptr) start_after_previous();
  find_row_tile<BM>(p, int(blockIdx.x), s_group, s_row0, s_row_end);
  __syncthreads();
  const int group = s_group, row0 = s_row0, row_end = s_row_end;
  if (group < 0 || row0 >= row_end) return;
  const int n0 = int(blockIdx.y) * BN;
  const int K = int(p.K), N = int(p.N);
  const bf16* W = p.W + int64_t(group) * p.w_group_stride;
  const int chunk_len = (TREE || SPLIT) ? (K + 7) / 8 : K;
  const int tiles_per_chunk = (chunk_len + BK - 1) / BK;
  const int total_tiles = (TREE ? 8 : 1) * tiles_per_chunk;
  // A K tile's place: chunk c, tile j within it; advanced without divisions (the per-tile
  // instructions bound these kernels at short K, notes v5).
  struct TilePos {
    int c, j;
  };
  auto next_pos = [&](TilePos t) {
    if (++t.j == tiles_per_chunk) t.j = 0, ++t.c;
    return t;
  };
  const TilePos first{SPLIT ? int(blockIdx.z) : 0, 0};  // first K tile of this CTA

  // The rows each thread loads are the same for every K tile: resolve them once (A rows
  // after the wait below: a gather list may come from the previous kernel).
  const bf16* a_row[A_ITERS];
  const bf16* b_row[B_ITERS];
  auto resolve_a_rows = [&] {
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      int idx = tid + i * THREADS, r = row0 + idx / PIECES;
      a_row[i] = nullptr;
      if (idx < BM * PIECES && r < row_end) a_row[i] = p.A + int64_t(p.a_gather ? p.a_gather[r] : r) * p.lda;
    }
  };
#pragma unroll
  for (int i = 0; i < B_ITERS; ++i) {
    int idx = tid + i * THREADS, n = n0 + idx / PIECES;
    b_row[i] = nullptr;
    if (idx < BN * PIECES && n < N) b_row[i] = W + int64_t(n) * p.ldw;
  }

  auto load_tile = [&](int stage, TilePos t, bool load_a = true, bool load_b = true) {
    const int k_begin = t.c * chunk_len + t.j * BK;
    const int k_end = min(t.c * chunk_len + chunk_len, K);
    bf16* a_s = sA + stage * BM * BK;
    bf16* b_s = sB + stage * BN * BK;
#pragma unroll
    for (int i = 0; i < A_ITERS; ++i) {
      int idx = tid + i * THREADS;
      if (!load_a || idx >= BM * PIECES) break;
      int r = idx / PIECES, piece = idx % PIECES, k = k_begin + piece * 8;
      bf16* dst = a_s + swz<BK>(r, piece);
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
      if (!load_b || idx >= BN * PIECES) break;
      int r = idx / PIECES, piece = idx % PIECES, k = k_begin + piece * 8;
      bf16* dst = b_s + swz<BK>(r, piece);
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
  float s0[CHUNKED ? MI : 1][CHUNKED ? NI : 1][4], s1[TREE ? MI : 1][TREE ? NI : 1][4],
      s2[CHUNKED ? MI : 1][CHUNKED ? NI : 1][4];
  // MODE 3: partials s0 and s2 of element e of this thread at sP[e * THREADS + tid] and
  // sP[(ACC + e) * THREADS + tid] (consecutive threads, consecutive banks).
  constexpr int ACC = MI * NI * 4;
  float* sP = reinterpret_cast<float*>(sB + STAGES * BN * BK) + tid;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;

  TilePos load_pos = first;  // the next K tile to load
  if (p.group_rows == nullptr) {
    // The first weight tiles stream while the previous kernel finishes (one extra, older
    // cp.async group: every later wait_group covers it).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < total_tiles) load_tile(s, load_pos, false, true);
      load_pos = next_pos(load_pos);
    }
    cp_async_commit();
    start_after_previous();
    resolve_a_rows();
    load_pos = first;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < total_tiles) load_tile(s, load_pos, true, false);
      load_pos = next_pos(load_pos);
      cp_async_commit();
    }
  } else {
    resolve_a_rows();
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < total_tiles) load_tile(s, load_pos);
      load_pos = next_pos(load_pos);
      cp_async_commit();
    }
  }

  const int warp_m = warp / WN, warp_n = warp % WN;
  TilePos cur = first;  // the K tile computed
  for (int kt = 0; kt < total_tiles; ++kt, cur = next_pos(cur)) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    {
      int nt = kt + STAGES - 1;
      if (nt < total_tiles) load_tile(nt % STAGES, load_pos);
      load_pos = next_pos(load_pos);
      cp_async_commit();
    }
    const bf16* a_s = sA + (kt % STAGES) * BM * BK;
    const bf16* b_s = sB + (kt % STAGES) * BN * BK;
    // k16 steps that hold only the zero padding of a chunk are skipped (the same rule for
    // every tile shape, so every element still sees one fixed sequence of mma steps).
    const int k_live = min(BK, chunk_len - cur.j * BK);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      if (kk * 16 >= k_live) break;
      uint32_t af[MI][4], bfr[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        int r = warp_m * MI * 16 + mi * 16 + (lane & 15);
        ldmatrix_x4(af[mi], smem_addr(a_s + swz<BK>(r, kk * 2 + (lane >> 4))));
      }
      load_b_fragments<NI, BK>(bfr, b_s, warp_n * NI * 8, kk, lane);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
    }
    if constexpr (CHUNKED) {
      if (cur.j == tiles_per_chunk - 1) {
        // Fold the finished chunk into the tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)).
        auto at = [](auto& v, int i) -> float& { return v[i / (NI * 4)][i / 4 % NI][i % 4]; };
        fold_chunk<MI * NI * 4>(
            cur.c, [&](int i) -> float& { return at(acc, i); }, [&](int i) -> float& { return at(s0, i); },
            [&](int i) -> float& { return at(s1, i); }, [&](int i) -> float& { return at(s2, i); });
      }
    }
    if constexpr (TREE_SMEM) {
      if (cur.j == tiles_per_chunk - 1) {
        // fold_chunk with s0 and s2 in shared memory.
        auto at = [](auto& v, int i) -> float& { return v[i / (NI * 4)][i / 4 % NI][i % 4]; };
        fold_chunk<ACC>(
            cur.c, [&](int i) -> float& { return at(acc, i); }, [&](int i) -> float& { return sP[i * THREADS]; },
            [&](int i) -> float& { return at(s1, i); }, [&](int i) -> float& { return sP[(ACC + i) * THREADS]; });
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
        store_pair<SPLIT>(p, row, n, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], int(blockIdx.z));
      }
}

// Small steps (decode): row tiles of 8 and one weight stream per warp. At one token the
// kernel above is bound by instruction latency (one warp per scheduler, a CTA barrier, the
// chunk arithmetic and the A tile per K tile: ~8 cycles per instruction, ~1 us per K tile,
// measured with ncu on the H200), not by memory. Here the CTA's A rows (at most 8, laid out
// exactly as the K tiles of the kernel above, zero padding included) are loaded into shared
// memory once; then each warp streams its own 8 * NI weight rows through its own cp.async
// ring with no CTA barrier. Every element still sees the same mma k16 steps in the same order
// (the A fragment rows 8..15 are zero registers: mma rows never mix), so the bits equal the
// kernel above. MODE as above.
template <int NI, int WARPS, int STAGES, int MODE, int BK>
__global__ void __launch_bounds__(WARPS * 32) gemm_small_kernel(GemmArgs p, bool vec) {
  constexpr bool CHUNKED = MODE == 1, SPLIT = MODE == 2;
  constexpr int BM = 8, WCOLS = NI * 8, BN = WARPS * WCOLS, THREADS = WARPS * 32;
  constexpr int PIECES = BK / 8;              // 16-byte pieces per row of a K tile
  constexpr int W_STAGE = WCOLS * BK;         // elements of one warp's K tile
  constexpr int W_ITERS = WCOLS * PIECES / 32;  // 16-byte pieces per lane per K tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int s_group, s_row0, s_row_end;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Weights are loaded before the wait unless the group list comes from the previous kernel.
  const bool early_weights = p.group_rows == nullptr || p.group_rows_settled;
  if (!early_weights) start_after_previous();
  find_row_tile<BM>(p, int(blockIdx.x), s_group, s_row0, s_row_end);
  __syncthreads();
  const int group = s_group, row0 = s_row0, row_end = s_row_end;
  if (group < 0 || row0 >= row_end) return;  // an exit counts as the next kernel's trigger
  const int K = int(p.K), N = int(p.N);
  const bf16* W = p.W + int64_t(group) * p.w_group_stride;
  const int chunk_len = (CHUNKED || SPLIT) ? (K + 7) / 8 : K;
  const int tiles_per_chunk = (chunk_len + BK - 1) / BK;
  const int total_tiles = (CHUNKED ? 8 : 1) * tiles_per_chunk;
  const int kt0 = SPLIT ? int(blockIdx.z) * tiles_per_chunk : 0;
  // A in shared memory: [8][a_ld], the CTA's K tiles side by side (row pitch + 16 bytes so
  // the 8 rows of an ldmatrix fall in 8 bank groups).
  const int a_ld = total_tiles * BK + 8;
  bf16* sW = reinterpret_cast<bf16*>(smem_raw) + warp * STAGES * W_STAGE;
  bf16* sA = reinterpret_cast<bf16*>(smem_raw) + WARPS * STAGES * W_STAGE;

  // This warp's weight rows: piece i of a K tile is row (lane + 32 i) / PIECES.
  const int wn0 = int(blockIdx.y) * BN + warp * WCOLS;
  const bf16* w_row[W_ITERS];
#pragma unroll
  for (int i = 0; i < W_ITERS; ++i) {
    const int n = wn0 + (lane + 32 * i) / PIECES;
    w_row[i] = n < N ? W + int64_t(n) * p.ldw : nullptr;
  }
  // K tile kt of the CTA covers k in [k_begin, k_begin + BK), live below k_end.
  auto tile_bounds = [&](int kt, int& k_begin, int& k_end) {
    const int c = kt / tiles_per_chunk, j = kt - c * tiles_per_chunk;
    k_begin = c * chunk_len + j * BK;
    k_end = min(c * chunk_len + chunk_len, K);
  };
  auto load_w = [&](int stage, int kt) {
    int k_begin, k_end;
    tile_bounds(kt0 + kt, k_begin, k_end);
    bf16* dst0 = sW + stage * W_STAGE;
#pragma unroll
    for (int i = 0; i < W_ITERS; ++i) {
      const int r = (lane + 32 * i) / PIECES, piece = (lane + 32 * i) % PIECES, k = k_begin + piece * 8;
      bf16* dst = dst0 + swz<BK>(r, piece);
      if (vec) {
        const bool valid = w_row[i] && k < k_end;
        cp_async16(smem_addr(dst), valid ? w_row[i] + k : p.W, valid);
      } else {
        for (int e = 0; e < 8; ++e)
          dst[e] = (w_row[i] && k + e < k_end) ? w_row[i][k + e] : __float2bfloat16_rn(0.0f);
      }
    }
  };

  // Weights first: they do not depend on the previous kernel (programmatic launch).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < total_tiles) load_w(s, s);
    cp_async_commit();
  }
  if (early_weights) start_after_previous();
  // The A rows of this tile, every K tile of the CTA, zero where the tile is padding.
  for (int idx = tid; idx < BM * total_tiles * PIECES; idx += THREADS) {
    const int r = idx / (total_tiles * PIECES), rest = idx % (total_tiles * PIECES), kt = rest / PIECES,
              piece = rest % PIECES;
    int k_begin, k_end;
    tile_bounds(kt0 + kt, k_begin, k_end);
    const int k = k_begin + piece * 8, row = row0 + r;
    const bf16* src = row < row_end ? p.A + int64_t(p.a_gather ? p.a_gather[row] : row) * p.lda : nullptr;
    bf16* dst = sA + r * a_ld + kt * BK + piece * 8;
    if (p.a_swiglu_up > 0) {  // SwiGLU of the [gate | up] row, element by element
      if (vec && p.a_swiglu_up % 8 == 0) {  // a piece is wholly live or wholly padding
        uint4 out = make_uint4(0, 0, 0, 0);
        if (src && k < k_end) {
          const uint4 gv = *reinterpret_cast<const uint4*>(src + k);
          const uint4 uv = *reinterpret_cast<const uint4*>(src + k + p.a_swiglu_up);
          const bf16* g8 = reinterpret_cast<const bf16*>(&gv);
          const bf16* u8 = reinterpret_cast<const bf16*>(&uv);
          bf16* o8 = reinterpret_cast<bf16*>(&out);
#pragma unroll
          for (int e = 0; e < 8; ++e) o8[e] = to_bf16(swiglu_value(to_f32(g8[e]), to_f32(u8[e])));
        }
        *reinterpret_cast<uint4*>(dst) = out;
      } else {
        for (int e = 0; e < 8; ++e) {
          const bool live = src && k + e < k_end;
          dst[e] = live ? to_bf16(swiglu_value(to_f32(src[k + e]), to_f32(src[k + e + p.a_swiglu_up])))
                        : __float2bfloat16_rn(0.0f);
        }
      }
    } else if (vec) {
      const bool valid = src && k < k_end;
      cp_async16(smem_addr(dst), valid ? src + k : p.A, valid);
    } else {
      for (int e = 0; e < 8; ++e) dst[e] = (src && k + e < k_end) ? src[k + e] : __float2bfloat16_rn(0.0f);
    }
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  float acc[NI][4];
  float s0[CHUNKED ? NI : 1][4], s1[CHUNKED ? NI : 1][4], s2[CHUNKED ? NI : 1][4];
#pragma unroll
  for (int ni = 0; ni < NI; ++ni)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[ni][e] = 0.0f;
  int j = kt0 % tiles_per_chunk;  // K tile within its chunk (the next one computed)
  for (int kt = 0; kt < total_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();
    if (kt + STAGES - 1 < total_tiles) load_w((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    const bf16* w_s = sW + (kt % STAGES) * W_STAGE;
    const bf16* a_s = sA + (lane & 7) * a_ld + kt * BK + ((lane >> 3) & 1) * 8;
    const int k_live = min(BK, chunk_len - j * BK);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      if (kk * 16 >= k_live) break;
      uint32_t a[4], bfr[NI][2];
      {
        uint32_t r2[2];
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r2[0]), "=r"(r2[1])
                     : "r"(smem_addr(a_s + kk * 16)));
        a[0] = r2[0];
        a[1] = 0u;  // rows 8..15 of the mma tile: zeros (their results are never stored)
        a[2] = r2[1];
        a[3] = 0u;
      }
      load_b_fragments<NI, BK>(bfr, w_s, 0, kk, lane);
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) mma_bf16(acc[ni], a, bfr[ni][0], bfr[ni][1]);
    }
    if (++j == tiles_per_chunk) {
      j = 0;
      if constexpr (CHUNKED) {
        auto at = [](auto& v, int i) -> float& { return v[i / 4][i % 4]; };
        fold_chunk<NI * 4>(
            kt / tiles_per_chunk, [&](int i) -> float& { return at(acc, i); },
            [&](int i) -> float& { return at(s0, i); }, [&](int i) -> float& { return at(s1, i); },
            [&](int i) -> float& { return at(s2, i); });
      }
    }
  }
  cp_async_wait<0>();
  // Lane holds row lane / 4 (elements 0, 1; rows 8..15 are padding), columns 2 (lane % 4) + {0, 1}.
  const int row = row0 + (lane >> 2);
  if (row >= row_end) return;
#pragma unroll
  for (int ni = 0; ni < NI; ++ni) {
    const int n = wn0 + ni * 8 + (lane & 3) * 2;
    if (n < N) store_pair<SPLIT>(p, row, n, acc[ni][0], acc[ni][1], int(blockIdx.z));
  }
}

// The tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)) over the 8 chunk partials of MODE 2, then
// the epilogue of the output kind: the same operations as MODE 1's fold and epilogue.
__global__ void combine_chunks_kernel(GemmArgs p) {
  start_after_previous();
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

// Whether 16-byte cp.async can load every piece (alignment of rows, chunks and pointers).
bool vector_loads(const GemmArgs& p) {
  const int64_t chunk_len = p.chunks == 8 ? (p.K + 7) / 8 : p.K;
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  return chunk_len % 8 == 0 && p.K % 8 == 0 && p.lda % 8 == 0 && p.ldw % 8 == 0 && p.w_group_stride % 8 == 0 &&
         aligned(p.A) && aligned(p.W);
}

// Launches a GEMM kernel with programmatic dependent launch: its CTAs may start (and prefetch
// weights) while the previous kernel runs; the kernel waits for it before touching its
// outputs. Then, for MODE 2, the tree over the chunk partials.
template <int MODE, typename Kernel>
void launch_kernel(Kernel kernel, dim3 grid, int threads, size_t smem, const GemmArgs& p, cudaStream_t stream) {
  LS_CHECK(grid.y <= 65535, "gemm: N = ", p.N, " is too large for one launch");
  launch_after_previous(kernel, grid, dim3(unsigned(threads)), smem, stream, p, vector_loads(p));
  if constexpr (MODE == 2)
    launch_after_previous(combine_chunks_kernel, unsigned(ceil_div(p.M * p.N, 256)), 256, 0, stream, p);
}

template <int WM, int WN, int MI, int NI, int STAGES, int MODE, int BK = kBK>
void launch(const GemmArgs& p, cudaStream_t stream) {
  constexpr int BM = WM * MI * 16, BN = WN * NI * 8, THREADS = WM * WN * 32;
  constexpr size_t smem =
      size_t(STAGES) * (BM + BN) * BK * sizeof(bf16) + (MODE == 3 ? size_t(2) * BM * BN * sizeof(float) : 0);
  auto kernel = gemm_kernel<WM, WN, MI, NI, STAGES, MODE, BK>;
  static const bool configured = allow_dynamic_smem(kernel, smem);
  (void)configured;
  const int64_t tiles_m = row_tiles_bound(p, BM);
  dim3 grid(unsigned(tiles_m), unsigned(ceil_div(p.N, BN)), MODE == 2 ? 8u : 1u);
  launch_kernel<MODE>(kernel, grid, THREADS, smem, p, stream);
}

// The small-step configurations 7-10: weight columns per warp / 8, warps, ring stages, K tile.
struct SmallTile {
  int ni, warps, stages, bk;
};
constexpr int kFirstSmallConfig = 7;
constexpr SmallTile kSmallTiles[] = {
    {1, 4, 8, 128},  // 7: 8 x 32, 4 warps of 8 columns, K tile 128
    {1, 4, 4, 256},  // 8: 8 x 32, 4 warps of 8 columns, K tile 256
    {2, 8, 6, kBK},  // 9: 8 x 128, 8 warps of 16 columns
    {1, 8, 8, kBK},  // 10: 8 x 64, 8 warps of 8 columns
};
constexpr int kSmallConfigs = int(sizeof(kSmallTiles) / sizeof(kSmallTiles[0]));
bool is_small_config(int config) { return config >= kFirstSmallConfig && config < kFirstSmallConfig + kSmallConfigs; }

// Shared memory of gemm_small_kernel in tile t and MODE: the warps' weight rings and the A rows
// of its K tiles.
size_t small_smem(const GemmArgs& p, const SmallTile& t, int mode) {
  const int64_t chunk_len = mode != 0 ? (p.K + 7) / 8 : p.K;
  const int64_t tiles = (mode == 1 ? 8 : 1) * ceil_div(chunk_len, t.bk);
  return size_t(t.warps * t.stages * t.ni * 8 * t.bk + 8 * (tiles * t.bk + 8)) * sizeof(bf16);
}

int max_dynamic_smem() {
  static const int bytes = [] {
    int device = 0, optin = 0;
    LS_CUDA_CHECK(cudaGetDevice(&device));
    LS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    return optin - 1024;  // the static shared memory of the kernel
  }();
  return bytes;
}

template <int CONFIG, int MODE>
void launch_small(const GemmArgs& p, cudaStream_t stream) {
  constexpr SmallTile t = kSmallTiles[CONFIG - kFirstSmallConfig];
  auto kernel = gemm_small_kernel<t.ni, t.warps, t.stages, MODE, t.bk>;
  static const bool configured = allow_dynamic_smem(kernel, size_t(max_dynamic_smem()));
  (void)configured;
  const size_t smem = small_smem(p, t, MODE);
  // A K too long for the A rows in shared memory: the tiled kernel (the same bits).
  if (smem > size_t(max_dynamic_smem())) {
    LS_CHECK(p.a_swiglu_up == 0, "gemm: SwiGLU on load needs the A rows in shared memory; K = ", p.K, " is too long");
    return launch<1, 4, 1, 2, 6, MODE>(p, stream);
  }
  dim3 grid(unsigned(row_tiles_bound(p, 8)), unsigned(ceil_div(p.N, t.ni * 8 * t.warps)), MODE == 2 ? 8u : 1u);
  launch_kernel<MODE>(kernel, grid, t.warps * 32, smem, p, stream);
}

template <int MODE>
void launch_config(const GemmArgs& p, int config, cudaStream_t stream) {
  switch (config) {
    case 0: return launch<1, 2, 1, 2, 8, MODE>(p, stream);  // 16 x 32
    case 1: return launch<1, 4, 1, 2, 6, MODE>(p, stream);  // 16 x 64
    case 6: return launch<1, 1, 1, 2, 8, MODE>(p, stream);  // 16 x 16, one warp: most CTAs
    // Small steps: row tiles of 8, one weight stream per warp (gemm_small_kernel, kSmallTiles).
    case 7: return launch_small<7, MODE>(p, stream);
    case 8: return launch_small<8, MODE>(p, stream);
    case 9: return launch_small<9, MODE>(p, stream);
    case 10: return launch_small<10, MODE>(p, stream);
    // Row form, large steps: the tree's short-lived partials in shared memory (MODE 3) so
    // more warps fit an SM (notes v5); the column form takes 128 x 128, the split form its
    // small tiles.
    case 11:  // 64 x 128, 2 stages: 112 KB and 126 registers, 2 CTAs per SM
      if constexpr (MODE == 1) return launch<2, 4, 2, 4, 2, 3>(p, stream);
      else if constexpr (MODE == 2) return launch<1, 4, 1, 2, 6, MODE>(p, stream);
      else return launch<2, 4, 4, 4, 4, MODE>(p, stream);
    case 12:  // 128 x 128, 16 warps of 32 x 32, 3 stages: 224 KB, 16 warps per SM
      if constexpr (MODE == 1) return launch<4, 4, 2, 4, 3, 3>(p, stream);
      else if constexpr (MODE == 2) return launch<1, 4, 1, 2, 6, MODE>(p, stream);
      else return launch<2, 4, 4, 4, 4, MODE>(p, stream);
    default:
      if constexpr (MODE == 2) {
        return launch<1, 4, 1, 2, 6, MODE>(p, stream);  // split: small tiles only (larger measured slower, v5)
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
  LS_CHECK(p.a_swiglu_up == 0 || is_small_config(config), "gemm: SwiGLU on load needs a small-step configuration, got ",
           config);
  if (config >= kGemmMmaConfigs) return gemm_wgmma_with_config(p, config - kGemmMmaConfigs, stream);
  LS_CHECK(p.out_kind != GemmOut::bf16_swiglu, "gemm: the SwiGLU output needs a wgmma configuration, got ", config);
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

namespace {

// The wgmma configurations gemm() takes for large steps: gemm_wgmma.cu's configurations 6
// (column form: the warp-specialized TMA kernel at 128 x 256, each K tile drained) and 5 (row
// form: TMA, 128 x 128, chunks in pairs); where TMA does not apply, its configurations 0 and 3.
constexpr int kWgmmaColumnLarge = kGemmMmaConfigs + 6, kWgmmaRowLarge = kGemmMmaConfigs + 5;
// The TMA column form at 128 x 128, for steps whose 128 x 256 tiles would leave SMs idle
// (fewer than kWideTilesMin: the H200's SM count).
constexpr int kWgmmaColumnNarrow = kGemmMmaConfigs + 5, kWideTilesMin = 132;

// The configuration gemm() takes for p, and whether the row form runs split (one chunk per CTA).
void choose_config(const GemmArgs& p, int& config, bool& split) {
  const int64_t groups = p.group_rows ? std::max<int64_t>(1, std::min<int64_t>(p.groups, p.M)) : 1;
  const int64_t rows = p.rows_hint >= 0 ? p.rows_hint : p.M / groups;
  // Only speed depends on the choice: every configuration gives the same bits. Measured on
  // the H200 (cuda_bench --decode-kernels; notes/cuda-perf.md, v4): with few CTAs a step is
  // latency-bound and one weight stream per warp wins; with many, the 16x64 tiles (column
  // form) or 8x128 small tiles (row form) keep more bytes in flight per SM.
  // Small configurations: 8 (K tiles of 256, 8 x 32 CTAs, 2 per SM) while its CTAs fit one
  // wave, else 10 (8 x 64 CTAs of 8 warps).
  const int64_t row_tiles = groups * ceil_div(rows, 8), small_ctas = ceil_div(p.N, 64) * row_tiles;
  const bool l2_resident = p.N * p.K * 2 * (p.group_rows ? p.groups : 1) <= (int64_t(32) << 20);
  if (rows <= 64 && small_ctas < 528) config = ceil_div(p.N, 32) * row_tiles <= 264 ? 8 : 10;
  else if (rows <= 8) config = p.chunks == 8 ? 9 : 1;
  else if (rows <= 16 || (rows <= 64 && l2_resident)) config = 1;  // 16-row tiles re-read W from L2
  else if (rows <= 64) config = ceil_div(p.N, 128) * groups * ceil_div(rows, 64) < 132 ? 2 : 3;
  // The row form with the tree's short-lived partials in shared memory, 16 warps per SM (notes
  // v5: at 16384 tokens o_proj 2.10 -> 1.43 ms, down 6.68 -> 4.64 ms).
  // From 128 rows per group on, the wgmma kernels, measured with --gemm at 16384 tokens (notes
  // v6-v8): the TMA column form at 128 x 256 (qkv 1.24 -> 0.73 -> 0.64 ms; gate_up, whose A is
  // gathered, on the cp.async 128 x 256: 2.86 -> 1.83), the TMA row form at 128 x 128 (o_proj
  // 0.74 -> 0.50 ms, down 2.15 -> 1.47; the mma.sync config 12: 1.16, 2.70).
  else if (p.chunks == 8)
    config = rows < 128 ? 11 : kWgmmaRowLarge;
  else if (rows < 128)
    config = 4;
  // Decode steps of 128-512 sequences (notes v9, cuda_bench --gemm --gemm-tokens 256): qkv 37
  // -> 28 us at 128 x 128; the router (N = 128: 2 tiles of 128 rows) 34 -> 20 us on 8-row CTAs.
  else if (groups * ceil_div(rows, 128) * ceil_div(p.N, 256) >= kWideTilesMin)
    config = kWgmmaColumnLarge;
  else if (groups == 1 && p.M <= 512 && p.N <= 256)
    config = 8;
  else
    config = kWgmmaColumnNarrow;
  // The row form with fewer CTAs than SMs (o_proj up to 64 tokens): one chunk per CTA (8x the
  // CTAs, fp32 partials, the same tree in a second kernel), when the workspace allows.
  // Measured: o_proj at 1 token 20.8 -> 9.7 us, at 64 tokens 72.8 -> 30 us; splitting what
  // already has many CTAs (down) loses.
  split = p.chunks == 8 && rows <= 64 && p.split_workspace != nullptr &&
          8 * p.M * p.N <= p.split_workspace_floats && ceil_div(p.N, 64) * groups * ceil_div(rows, 16) < 132;
  if (split) config = rows <= 8 ? 9 : 1;
}

}  // namespace

bool gemm_small_step(const GemmArgs& p) {
  int config;
  bool split;
  choose_config(p, config, split);
  if (!is_small_config(config)) return false;
  // launch_small falls back to the tiled kernel where the A rows do not fit shared memory.
  const int mode = p.chunks == 1 ? 0 : split ? 2 : 1;
  return small_smem(p, kSmallTiles[config - kFirstSmallConfig], mode) <= size_t(max_dynamic_smem());
}

bool gemm_takes_swiglu(const GemmArgs& args) {
  GemmArgs p = args;
  p.out_kind = GemmOut::bf16_swiglu;  // which the TMA kernel does not take: it hands p on
  int config;
  bool split;
  choose_config(p, config, split);
  return config == kWgmmaColumnLarge && gemm_wgmma_takes_swiglu(p, config - kGemmMmaConfigs);
}

void gemm(const GemmArgs& args, cudaStream_t stream) {
  GemmArgs p = args;
  int config;
  bool split;
  choose_config(p, config, split);
  if (!split) p.split_workspace = nullptr;
  gemm_with_config(p, config, stream);
}

}  // namespace lockstep::cuda
