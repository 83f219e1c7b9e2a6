// Backward of the linear layers (weights [N, K] row-major, y = x . W^T).
//
// Weight gradient dW[n, k] = sum over tokens of dy[t, n] * x[t, k]: the canonical token-chunk
// tree of reduce_backward.h (each chunk ascending in tokens, fp32, pairwise tree over chunks).
//
// Input gradient dx[t, k] = sum over n of dy[t, n] * W[n, k]. For a column-form linear
// (q/k/v, gate/up, router, lm_head) N is what tensor parallelism splits, so the sum is
// canonical over N: 8 chunks of canonical_chunk(N), each summed in ascending n in fp32,
// combined by the pairwise tree. A row-form linear (o_proj, down_proj) has N = hidden, which
// no topology splits; it uses the same procedure (one fixed procedure per row).
#pragma once
#include <cstdint>

#include "kernels/cpu/reduce_backward.h"

namespace lockstep::cpu {

// dW (overwritten) = tree over chunks [0, num_chunks) of the chunk sums; chunk_rows has
// num_chunks + 1 row offsets relative to dy [rows, N] and x [rows, K]. A sequence-parallel rank
// passes its own rows and its run of chunks and gets its subtree.
void linear_weight_grad_subtree(const float* dy, const float* x, float* dW, int64_t N, int64_t K,
                                const int64_t* chunk_rows, int num_chunks);

// The full 8-chunk tree.
void linear_weight_grad(const float* dy, const float* x, float* dW, int64_t N, int64_t K, const TokenChunks& chunks);

// dx [T, K] (overwritten) for dy [T, N_local] and W [N_local, K], where the N_local rows held
// here are a run of `num_chunks` canonical chunks of `chunk_len` rows (the last may be short
// or empty). One rank with all 8 chunks computes the full tree; a tensor-parallel rank with a
// power-of-two run computes its subtree.
void linear_input_grad_canonical(const float* dy, const float* w, float* dx, int64_t T, int64_t N_local, int64_t K,
                                 int64_t chunk_len, int num_chunks);

// Single rank: 8 chunks of canonical_chunk(N).
void linear_input_grad(const float* dy, const float* w, float* dx, int64_t T, int64_t N, int64_t K);

}  // namespace lockstep::cpu
