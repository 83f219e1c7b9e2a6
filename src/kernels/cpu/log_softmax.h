// The canonical log-softmax over the vocabulary (docs/numerics.md, rules 1 and 6).
#pragma once
#include <cstdint>

#include "kernels/canonical.h"

namespace lockstep::cpu {

// Max and sum of exp(x - max) over n values, in ascending order.
MaxSum chunk_maxsum(const float* x, int64_t n);

// log sum exp over a row of V logits: 8 canonical chunks, each by chunk_maxsum, combined by
// the pairwise tree of combine_maxsum; result max + log(sum).
float log_normalizer(const float* logits, int64_t V);

// The subtree of a vocab-parallel rank: its logits hold `num_chunks` chunks of chunk_len.
MaxSum vocab_subtree(const float* logits, int64_t V_local, int64_t chunk_len, int num_chunks);

// out[t] = logits[t, targets[t]] - log_normalizer(logits[t]) for T rows of V logits.
void log_softmax_gather(const float* logits, const int32_t* targets, float* out, int64_t T, int64_t V);

// Full log-softmax rows: out[t, v] = logits[t, v] - log_normalizer(logits[t]).
void log_softmax(const float* logits, float* out, int64_t T, int64_t V);

}  // namespace lockstep::cpu
