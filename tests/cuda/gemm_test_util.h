// The GEMM arguments the GPU tests start from.
#pragma once
#include <cstdint>

#include "kernels/cuda/gemm.h"

namespace lockstep::testing {

// out[M, N] = A[M, K] . W[N, K]^T in fp32 (row strides lda and ldw), the column form (chunks 1)
// or the row form (8); callers add groups, gathers, scatters, splits or another output.
inline cuda::GemmArgs gemm_args(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N,
                                int64_t K, int chunks, float* out) {
  cuda::GemmArgs g;
  g.A = reinterpret_cast<const __nv_bfloat16*>(A);
  g.lda = lda;
  g.W = reinterpret_cast<const __nv_bfloat16*>(W);
  g.ldw = ldw;
  g.M = M;
  g.N = N;
  g.K = K;
  g.chunks = chunks;
  g.out_kind = cuda::GemmOut::f32;
  g.out_f32 = out;
  g.ldo = N;
  return g;
}

}  // namespace lockstep::testing
