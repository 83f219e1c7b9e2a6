// Backward of causal GQA attention read through the paged KV cache (flash-style: the softmax
// is recomputed per key block from q and the cached K, with the log-sum-exp of each
// (token, head) found by the forward's own block walk).
#pragma once
#include <cstdint>

#include "kernels/cpu/attention.h"

namespace lockstep::cpu {

// q, out, dout: [T, heads, head_dim] (out = the forward's attention output); K/V are read
// from `kv` at each token's slots. Every sequence of the batch must be whole (positions
// 0..n-1, the trainer's micro-batch), so the gradient of every key and value it reads belongs
// to a token of the batch. Overwrites dq [T, heads, D], dk and dv [T, kv_heads, D]:
//   p_ij = exp(s_ij - lse_i), s_ij = scale q_i.k_j, D_i = dout_i.out_i (fixed dot),
//   ds_ij = p_ij (dout_i.v_j - D_i),
//   dq_i = sum over keys j ascending of (scale ds_ij) k_j                      (per (i, head))
//   dk_j = sum over queries i ascending, then heads of the group ascending, of (scale ds_ij) q_i
//   dv_j = same order, of p_ij dout_i                                         (per (j, kv head))
// Parallel over (token, head) pairs only.
void paged_attention_backward(const float* q, const float* out, const float* dout, const PagedKvLayer& kv,
                              const TokenSlots& slots, int64_t T, int64_t heads, float scale, float* dq, float* dk,
                              float* dv);

}  // namespace lockstep::cpu
