// Row-wise and element-wise ops on the CPU: RMSNorm, SwiGLU, residual add, embedding,
// and the bf16 cast points of the precision recipes.
#pragma once
#include <cstdint>

namespace lockstep::cpu {

// out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps)); the mean is dot(x, x) / n (one fixed
// procedure per row). With round_normed, the normalised row is rounded to bf16 before the
// weight is applied (the bfloat16 recipe, as Hugging Face's Qwen3 RMSNorm does).
void rmsnorm(const float* x, const float* w, float* out, int64_t rows, int64_t n, float eps, bool round_normed);

// out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
void swiglu(const float* gate, const float* up, float* out, int64_t n);

// x += y.
void add_inplace(float* x, const float* y, int64_t n);

// out[t] = table[ids[t]]; ids are checked by the caller.
void embedding(const int32_t* ids, const float* table, float* out, int64_t T, int64_t hidden);

// Rounds every value to the nearest bf16 (ties to even), in place.
void round_to_bf16(float* x, int64_t n);

}  // namespace lockstep::cpu
