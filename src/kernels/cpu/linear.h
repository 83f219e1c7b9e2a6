// Linear layers on the CPU. Weights are [N, K] row-major (the Hugging Face layout).
#pragma once
#include <cstdint>

namespace lockstep::cpu {

// Column form: y[t, n] = dot(x[t, :], w[n, :]) over the full K. A tensor-parallel split of
// N (column-parallel) computes each output on one rank, so it changes no bit.
void linear(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K);

// Canonical row form (docs/numerics.md, rule 1). The K columns held here are a run of
// `num_chunks` canonical chunks of `chunk_len` columns (the last may be short or empty,
// the zero padding); y[t, n] = pairwise_tree over the chunks of dot(chunk of x, chunk of w).
// One rank holding all 8 chunks computes the full tree; a rank holding a power-of-two run
// computes its subtree and the communicator completes it.
void linear_row_canonical(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K,
                          int64_t chunk_len, int num_chunks);

// The single-rank canonical row form: 8 chunks of canonical_chunk(K).
void linear_row(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K);

// The same functions (the same bits) run entirely in the calling thread, for callers that
// already split their work over the thread pool (its parallel_for is not reentrant).
void linear_in_caller(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K);
void linear_row_in_caller(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K);

}  // namespace lockstep::cpu
