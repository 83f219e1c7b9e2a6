// Token sampling from one row of fp32 logits (docs/numerics.md, D5).
#pragma once
#include <cstdint>

namespace lockstep::cpu {

struct SampleChoice {
  int32_t token;
  float logprob;
};

// Greedy when temperature == 0 (argmax, ties to the lower id; logprob under T = 1).
// Otherwise z = logits / T; candidates sorted by (z desc, id asc), cut to top_k (> 0) and
// to the shortest prefix whose probability mass reaches top_p; the token is the first
// candidate whose cumulative mass exceeds u * kept_mass. logprob = log softmax(z)[token],
// before truncation, by the canonical log-softmax. `u` in [0, 1) comes from Philox.
// Logits must not be NaN (no order is defined then).
SampleChoice sample_row(const float* logits, int64_t V, float temperature, int32_t top_k, float top_p, float u);

// Up to this many kept candidates sample_row partially sorts; past it, it radix-sorts the row
// (the same order). Public so a test can take both paths.
constexpr int64_t kPartialSortMax = 256;

// The n most likely tokens of the row under the distribution sample_row reports log-probs of
// (softmax(logits / T), T = 1 when greedy): ids and log-probs by log-prob descending, ties to
// the lower id; each value is the bits sample_row gives when it draws that token.
void top_logprobs_row(const float* logits, int64_t V, float temperature, int32_t n, int32_t* tokens, float* logprobs);

// The n largest of a row of log-probs (n <= V): ids and values by value descending, ties to the
// lower id. top_logprobs_row's selection, and the reference of the GPU's (cuda::top_n_rows).
void top_n_logprobs(const float* logprobs_row, int64_t V, int32_t n, int32_t* tokens, float* logprobs);

}  // namespace lockstep::cpu
