// The parts of the GEMM every kernel form shares, so that each gives the same bits: the
// row form's tree over the 8 chunk sums, and the epilogue of the output kinds.
#pragma once
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm.h"

namespace lockstep::cuda {

// Folds the finished chunk c's sum `a` into the tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)),
// with partials s0, s1, s2; after chunk 7, `a` holds the total.
__device__ __forceinline__ void fold_chunk(int c, float& a, float& s0, float& s1, float& s2) {
  switch (c) {
    case 0: case 2: case 4: case 6: s0 = a; a = 0.0f; break;
    case 1: s1 = s0 + a; a = 0.0f; break;
    case 3: s1 = s1 + (s0 + a); a = 0.0f; break;
    case 5: s2 = s0 + a; a = 0.0f; break;
    default: a = s1 + (s2 + (s0 + a)); break;
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

}  // namespace lockstep::cuda
