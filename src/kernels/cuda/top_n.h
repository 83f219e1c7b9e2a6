// The n largest entries of fp32 rows on the GPU (the CUDA runner's top log-probs): by value
// descending, ties to the lower index, the order of cpu::top_n_logprobs, which is its reference.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace lockstep::cuda {

constexpr int32_t kMaxTopN = 20;

// For each row r of `values` [R, V] with counts[r] > 0 (at most min(kMaxTopN, V)): tokens and
// out [R, kMaxTopN] get that many indices and values in order; rows with counts[r] == 0 are
// left alone. The result is a fixed function of the row (the order is total), not of the launch.
void top_n_rows(const float* values, const int32_t* counts, int32_t* tokens, float* out, int64_t R, int64_t V,
                cudaStream_t s);

}  // namespace lockstep::cuda
