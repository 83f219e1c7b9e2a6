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

// Vocab-parallel forms: a rank holds the columns [v_begin, v_begin + VL) of each row (whole
// canonical chunks of canonical_chunk(V)) and each row's log-normaliser `lse` (the canonical
// max/sum tree completed across ranks). They give the bits of the full-row kernels above.
//
// entropy_parts[t * num_chunks + i] = sum over chunk (first_chunk + i) of p_v log p_v: the
// leaves of softmax_entropy's tree (entropy = -tree8 of all 8 chunks' parts).
void softmax_entropy_parts(const float* logits_slice, const float* lse, float* entropy_parts, int64_t T, int64_t V,
                           int64_t VL, int first_chunk, int num_chunks);
// dlogits_slice = the columns [v_begin, v_begin + VL) of log_softmax_gather_backward's dlogits
// (the target's +dlogp only where the target falls in the slice).
void log_softmax_gather_backward_slice(const float* logits_slice, const float* lse, const int32_t* targets,
                                       const float* dlogp, const float* dentropy, const float* entropy,
                                       float* dlogits_slice, int64_t T, int64_t v_begin, int64_t VL);

}  // namespace lockstep::cpu
