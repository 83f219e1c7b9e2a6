// AdamW on the GPU (the trainer's optimizer step over the runner's weights): the elementwise
// update and the canonical sums of squares of the global gradient norm, each with the CPU's
// arithmetic (train/optimizer.cpp) operation for operation, so the device step gives the host
// step's bits (nvcc runs without contraction; sqrt and division are IEEE).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lockstep::cuda {

// One parameter tensor: its fp32 master, moments and gradient, and where the new weight goes
// (the runner's bf16 matrix, or its fp32 norm vector).
struct AdamWTensor {
  float* master = nullptr;
  float* exp_avg = nullptr;
  float* exp_avg_sq = nullptr;
  const float* grad = nullptr;
  __nv_bfloat16* weight_bf16 = nullptr;
  float* weight_f32 = nullptr;
  int64_t numel = 0;
  int decayed = 0;  // matrices take weight decay; the norm weights do not
};

// The step's scalars, computed on the host as AdamW::update computes them.
struct AdamWScalars {
  float clip_coef = 1.0f;
  int clipped = 0;
  float beta1, beta2, one_minus_beta1, one_minus_beta2, bias1, bias2, lr, decay, eps;
  int round_bf16 = 1;  // the bfloat16 recipe: the fp32 weights written are bf16 values too
};

// The update of every tensor of `tensors` (device array of `count`).
void adamw_step(const AdamWTensor* tensors, int64_t count, int64_t max_numel, const AdamWScalars& s,
                cudaStream_t stream);

// partials[t * 8 + c] = chunk c of tensor t's sum of squares by canonical_sum_squares' lanes:
// the leaves of its tree (8 chunks of canonical_chunk(numel), the tree folded on the host).
void sum_squares_chunks(const float* const* data, const int64_t* numel, int64_t count, float* partials,
                        cudaStream_t stream);

// out[i] = x[i] widened to fp32 (a fresh state's masters from the runner's bf16 weights).
void widen_bf16(const __nv_bfloat16* x, float* out, int64_t n, cudaStream_t stream);

// The first index of x[0, n) holding NaN or Inf, or -1.
int64_t first_nonfinite(const float* x, int64_t n, cudaStream_t stream);

}  // namespace lockstep::cuda
