// The parts of the GEMM every kernel family shares (mma.sync in gemm.cu, wgmma in
// gemm_wgmma.cu): where a row tile's rows are, the row form's tree over the 8 chunk sums, and
// the epilogue of the output kinds (one procedure, so one set of bits).
#pragma once
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm.h"

namespace lockstep::cuda {

// Which group and which rows of it row tile bx covers (row tiles of BM, the groups' tiles
// laid out one after another), in every lane of the calling warp; false when bx is past the
// last row tile.
template <int BM>
__device__ __forceinline__ bool locate_row_tile(const GemmArgs& p, int bx, int& group, int& row0, int& row_end) {
  if (p.group_rows == nullptr) {
    group = 0;
    row0 = bx * BM;
    row_end = int(p.M);
    return row0 < row_end;
  }
  const int lane = threadIdx.x & 31;
  int found_group = -1, found_row0 = 0, found_end = 0, carry = 0;
  // 128 groups per round, all their bounds loaded before the first use: one memory latency
  // per round instead of one per 32 groups (decode steps are latency-bound).
  for (int base = 0; base < p.groups; base += 128) {
    int begin[4], end[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int g = base + 32 * i + lane;
      // L2 loads: a settled list may be read before the kernel's wait (GemmArgs).
      begin[i] = g < p.groups ? __ldcg(p.group_rows + g) : 0;
      end[i] = g < p.groups ? __ldcg(p.group_rows + g + 1) : 0;
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
        found_group = g;
        found_row0 = begin[i] + (bx - first) * BM;
        found_end = end[i];
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (carry > bx) break;
  }
  const unsigned hit = __ballot_sync(0xffffffffu, found_group >= 0);
  if (hit == 0) return false;
  const int src = __ffs(int(hit)) - 1;
  group = __shfl_sync(0xffffffffu, found_group, src);
  row0 = __shfl_sync(0xffffffffu, found_row0, src);
  row_end = __shfl_sync(0xffffffffu, found_end, src);
  return true;
}

// locate_row_tile by warp 0, into shared memory; group -1 if none.
template <int BM>
__device__ __forceinline__ void find_row_tile(const GemmArgs& p, int bx, int& s_group, int& s_row0, int& s_row_end) {
  if ((threadIdx.x >> 5) != 0) return;
  int group, row0, row_end;
  const bool found = locate_row_tile<BM>(p, bx, group, row0, row_end);
  if ((threadIdx.x & 31) == 0) {
    s_group = found ? group : -1;
    s_row0 = found ? row0 : 0;
    s_row_end = found ? row_end : 0;
  }
}

// An upper bound of the row tiles of BM rows (with groups, each group's last tile may be partial).
inline int64_t row_tiles_bound(const GemmArgs& p, int64_t bm) {
  return ceil_div(p.M, bm) + (p.group_rows ? std::min<int64_t>(p.groups, p.M) : 0);
}

// Lets `kernel` use `bytes` of dynamic shared memory; true, for a launcher's function-local
// `static const bool` (so once per kernel instantiation, thread-safe).
template <typename Kernel>
bool allow_dynamic_smem(Kernel kernel, size_t bytes) {
  LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  return true;
}

// Folds the finished chunk c's sums into the tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)): for
// each i < COUNT the chunk sum a(i) with the partials s0(i), s1(i), s2(i) (each accessor
// returns a reference); after chunk 7, a(i) holds the total. The case is chosen once for all
// COUNT sums: a switch per sum compiles to an indirect branch per sum, which was half the
// instructions of the row form at prefill (ncu, notes v7).
template <int COUNT, typename Sum, typename P0, typename P1, typename P2>
__device__ __forceinline__ void fold_chunk(int c, Sum&& a, P0&& s0, P1&& s1, P2&& s2) {
  switch (c) {
    case 0: case 2: case 4: case 6:
#pragma unroll
      for (int i = 0; i < COUNT; ++i) s0(i) = a(i), a(i) = 0.0f;
      break;
    case 1:
#pragma unroll
      for (int i = 0; i < COUNT; ++i) s1(i) = s0(i) + a(i), a(i) = 0.0f;
      break;
    case 3:
#pragma unroll
      for (int i = 0; i < COUNT; ++i) s1(i) = s1(i) + (s0(i) + a(i)), a(i) = 0.0f;
      break;
    case 5:
#pragma unroll
      for (int i = 0; i < COUNT; ++i) s2(i) = s0(i) + a(i), a(i) = 0.0f;
      break;
    default:
#pragma unroll
      for (int i = 0; i < COUNT; ++i) a(i) = s1(i) + (s2(i) + (s0(i) + a(i)));
      break;
  }
}

// Writes the results of columns n, n + 1 (when n + 1 < N) of logical row `row`: to the split
// workspace (chunk `z`), or in the output kind.
template <bool SPLIT>
__device__ __forceinline__ void store_pair(const GemmArgs& p, int row, int n, float v0, float v1, int z) {
  const int N = int(p.N);
  const bool pair = n + 1 < N;
  if constexpr (SPLIT) {
    float* w = p.split_workspace + (int64_t(z) * p.M + row) * N + n;
    w[0] = v0;
    if (pair) w[1] = v1;
    return;
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

// The bf16_swiglu output of columns c, c + 1 (when c + 1 < N / 2) of logical row `row` from
// their gate and up sums: each rounded to bf16 first, as the swiglu kernel reads them.
__device__ __forceinline__ void store_swiglu_pair(const GemmArgs& p, int row, int c, float g0, float g1, float u0,
                                                  float u1) {
  const int64_t o = int64_t(p.out_scatter ? p.out_scatter[row] : row) * p.ldo + c;
  const float a0 = swiglu_value(round_bf16(g0), round_bf16(u0));
  if (c + 1 < int(p.N / 2)) {
    const float a1 = swiglu_value(round_bf16(g1), round_bf16(u1));
    *reinterpret_cast<__nv_bfloat162*>(p.out_bf16 + o) = __floats2bfloat162_rn(a0, a1);
  } else {
    p.out_bf16[o] = to_bf16(a0);
  }
}

// Stores warpgroup wg's 64 x BN wgmma sums of the tile at (row0, n0): warp w of the
// warpgroup holds rows 16 w + lane / 4 (+ 8), columns 8 j + 2 (lane % 4) + {0, 1}. With the
// SwiGLU output (BN = 256) the tile's columns are the gate sums of output columns n0 / 2 ..
// n0 / 2 + 127 and then their up sums: j < BN / 16 is a gate, j + BN / 16 its up.
template <int BN>
__device__ __forceinline__ void store_wgmma_tile(const GemmArgs& p, const float (&acc)[BN / 2], int row0, int row_end,
                                                 int n0, int wg) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, N = int(p.N);
  if (BN == 256 && p.out_kind == GemmOut::bf16_swiglu) {
    constexpr int UP = BN / 16;
#pragma unroll
    for (int j = 0; j < UP; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + wg * 64 + warp * 16 + (lane >> 2) + 8 * h;
        const int c = n0 / 2 + 8 * j + 2 * (lane & 3);
        if (row < row_end && c < N / 2)
          store_swiglu_pair(p, row, c, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], acc[4 * (j + UP) + 2 * h],
                            acc[4 * (j + UP) + 2 * h + 1]);
      }
    return;
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + wg * 64 + warp * 16 + (lane >> 2) + 8 * h;
      const int n = n0 + 8 * j + 2 * (lane & 3);
      if (row < row_end && n < N) store_pair<false>(p, row, n, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], 0);
    }
}

}  // namespace lockstep::cuda
