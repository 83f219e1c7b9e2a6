// The MoE block's backward kernels around the experts' GEMMs (backward.h): gathering expert
// rows, the combine's backward, and the sum of a token's expert input gradients in ascending
// expert id (cpu::moe_backward's order).
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"

namespace lockstep::cuda {

namespace {

__global__ void gather_rows_kernel(const bf16* src, const int32_t* index, bf16* dst, int64_t H) {
  const int64_t r = blockIdx.x;
  const bf16* from = src + int64_t(index[r]) * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dst[r * H + h] = from[h];
}

__global__ void expert_output_backward_kernel(const float* dout, const bf16* y, const float* weights,
                                              const int32_t* row_token, const int32_t* row_pair, float* dweights,
                                              float* dy_rows, int64_t H) {
  const int64_t r = blockIdx.x, t = row_token[r], pair = row_pair[r];
  const float* g = dout + t * H;
  if (threadIdx.x == 0) dweights[pair] = dot_lanes(g, y + pair * H, H);
  const float w = weights[pair];
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dy_rows[r * H + h] = w * g[h];
}

__global__ void add_rows_in_order_kernel(float* dh, const float* rows, const int32_t* order, int64_t k, int64_t H) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = dh[t * H + h];
    for (int64_t j = 0; j < k; ++j) acc = acc + rows[int64_t(order[t * k + j]) * H + h];
    dh[t * H + h] = acc;
  }
}

}  // namespace

void gather_rows(const bf16_t* src, const int32_t* index, bf16_t* dst, int64_t rows, int64_t H, cudaStream_t s) {
  if (rows == 0) return;
  gather_rows_kernel<<<unsigned(rows), 256, 0, s>>>(src, index, dst, H);
  LS_CUDA_LAUNCHED();
}

void expert_output_backward(const float* dout, const bf16_t* y, const float* weights, const int32_t* row_token,
                            const int32_t* row_pair, float* dweights, float* dy_rows, int64_t rows, int64_t H,
                            cudaStream_t s) {
  if (rows == 0) return;
  expert_output_backward_kernel<<<unsigned(rows), 256, 0, s>>>(dout, y, weights, row_token, row_pair, dweights, dy_rows,
                                                               H);
  LS_CUDA_LAUNCHED();
}

void add_rows_in_order(float* dh, const float* rows, const int32_t* order, int64_t T, int64_t k, int64_t H,
                       cudaStream_t s) {
  if (T == 0) return;
  add_rows_in_order_kernel<<<unsigned(T), 256, 0, s>>>(dh, rows, order, k, H);
  LS_CUDA_LAUNCHED();
}

}  // namespace lockstep::cuda
