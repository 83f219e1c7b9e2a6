// Backward of the mixture-of-experts block of moe.h, recomputing the experts' internals from
// the block input with the forward's own kernels (activation recomputation: the same bits).
#pragma once
#include <cstdint>

#include "kernels/cpu/reduce_backward.h"

namespace lockstep::cpu {

// Router backward: given d(weight) [T, k] of route_topk's outputs (in selection order),
// dlogits [T, E] (overwritten) through the optional renormalisation and the fp32 softmax:
//   renormalised: dp_j = (dw_j - sum_i dw_i w_i) / sum_S p       (sums over slots ascending)
//   softmax:      dz_e = p_e (dp_e - sum_j dp_j p_j)             (dp zero off the selection)
// The softmax probabilities are recomputed as route_topk computes them.
void route_topk_backward(const float* router_logits, const int32_t* expert_ids, const float* weights,
                         const float* dweights, float* dlogits, int64_t T, int64_t E, int64_t k, bool normalize);

// One SwiGLU MLP (swiglu_mlp of moe.h) over rows x [R, H] whose weight gradients reduce over
// token chunks `chunks` (row offsets). Given dy [R, H]: dx [R, H] (overwritten) =
// (gate input grad, canonical over I) + (up input grad, canonical over I); dgate_w, dup_w
// [I, H] and ddown_w [H, I] overwritten. With y_out, the recomputed output rows are written.
void swiglu_mlp_backward(const float* x, const float* gate_w, const float* up_w, const float* down_w, const float* dy,
                         float* dx, float* dgate_w, float* dup_w, float* ddown_w, int64_t R, int64_t H, int64_t I,
                         const TokenChunks& chunks, bool round_bf16);

// The whole MoE block (moe_forward of moe.h) given the block input x [T, H] (one packed
// micro-batch of T tokens) and the forward's router logits [T, E]. Given dout [T, H]:
//   dx (overwritten) = router input grad (canonical over E), then plus each of the token's
//     experts' input grads in ascending expert id;
//   drouter_w [E, H], and per expert dgate_w/dup_w [I, H], ddown_w [H, I] (overwritten; an
//     expert with no tokens gets zeros). Expert weight gradients put each token's
//     contribution in the canonical chunk of its position in the stream.
void moe_backward(const float* x, const float* router_logits, const float* router_w, const float* const* gate_w,
                  const float* const* up_w, const float* const* down_w, const float* dout, float* dx,
                  float* drouter_w, float* const* dgate_w, float* const* dup_w, float* const* ddown_w, int64_t T,
                  int64_t H, int64_t I, int64_t E, int64_t k, bool normalize, bool round_bf16);

}  // namespace lockstep::cpu
