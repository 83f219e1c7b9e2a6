// Backward of the canonical log-softmax with target gather (log_softmax.h), and the softmax
// entropy with its gradient (for an entropy term in the RL loss).
#pragma once
#include <cstdint>

namespace lockstep::cpu {

// entropy[t] = -sum_v p_v log p_v of softmax(logits[t]), with log p_v = logits - log_normalizer
// (the canonical log-sum-exp). The sum over the vocabulary is canonical (8 chunks ascending,
// pairwise tree) since vocab parallelism splits it.
void softmax_entropy(const float* logits, float* entropy, int64_t T, int64_t V);

// dlogits[t, v] (overwritten) = dlogp[t] (1[v = target] - p_v) + dentropy[t] (-p_v (log p_v + H_t))
// for logp[t] = log_softmax(logits[t])[target[t]] and H_t = entropy[t]. dentropy and entropy
// may be null (no entropy term). Elementwise per (t, v): no reduction beyond the normaliser.
void log_softmax_gather_backward(const float* logits, const int32_t* targets, const float* dlogp,
                                 const float* dentropy, const float* entropy, float* dlogits, int64_t T, int64_t V);

}  // namespace lockstep::cpu
