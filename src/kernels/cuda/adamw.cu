// AdamW on the GPU (adamw.h): the CPU's per-element arithmetic, tensor by tensor.
#include <algorithm>

#include "kernels/canonical.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"  // cp.async

namespace lockstep::cuda {

namespace {

__global__ void adamw_kernel(const AdamWTensor* tensors, AdamWScalars s) {
  const AdamWTensor t = tensors[blockIdx.y];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < t.numel; i += int64_t(gridDim.x) * blockDim.x) {
    const float gi = s.clipped ? t.grad[i] * s.clip_coef : t.grad[i];
    const float m = s.beta1 * t.exp_avg[i] + s.one_minus_beta1 * gi;
    const float v = s.beta2 * t.exp_avg_sq[i] + s.one_minus_beta2 * (gi * gi);
    const float m_hat = m / s.bias1;
    const float v_hat = v / s.bias2;
    const float w = t.decayed ? t.master[i] * s.decay : t.master[i];
    const float p = w - s.lr * (m_hat / (sqrtf(v_hat) + s.eps));
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    t.master[i] = p;
    if (t.weight_bf16) t.weight_bf16[i] = __float2bfloat16_rn(p);
    if (t.weight_f32) t.weight_f32[i] = s.round_bf16 ? round_bf16(p) : p;
  }
}

__global__ void widen_bf16_kernel(const __nv_bfloat16* x, float* out, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = __bfloat162float(x[i]);
}

// One block per (tensor, chunk): the block streams the chunk through a ring of shared-memory
// tiles by cp.async, several tiles in flight, and kSquaresLanes threads add the squares, lane j
// the tile's elements j, j + 64, ... (tiles start at multiples of kSquaresLanes into the chunk,
// so that is the lane's order); thread 0 folds the lanes. The CPU's loop, canonical_sum_squares.
// (Two 16 KB tiles kept too few loads in flight for chunks of hundreds of MB, such as the
// experts' gate_up's.)
constexpr int kSquaresThreads = 256, kSquaresTile = 16 * kSquaresThreads, kSquaresStages = 6;
constexpr size_t kSquaresSmem = size_t(kSquaresStages) * kSquaresTile * 4;
static_assert(kSquaresTile % kSquaresLanes == 0 && kSquaresLanes <= kSquaresThreads, "whole rounds of lanes a tile");
__global__ void __launch_bounds__(kSquaresThreads)
    sum_squares_kernel(const float* const* data, const int64_t* numel, float* partials) {
  extern __shared__ __align__(16) float ring[];  // [kSquaresStages][kSquaresTile]
  __shared__ float lanes[kSquaresLanes];
  const int64_t t = blockIdx.x;
  const int c = blockIdx.y;
  const int64_t n = numel[t], chunk = (n + 7) / 8;
  const int64_t begin = min(n, c * chunk), end = min(n, (c + 1) * chunk);
  const float* x = data[t];
  const bool whole16 = (reinterpret_cast<uintptr_t>(x + begin) & 15) == 0;
  // The tile at `first` into ring slot `slot` (nothing past the chunk), then a commit: one
  // cp.async group a tile, empty ones past the end keep the wait counts aligned.
  auto stage = [&](int64_t first, int slot) {
    float* dst = ring + slot * kSquaresTile;
    if (first < end) {
      if (whole16) {
        for (int i = 4 * threadIdx.x; i < kSquaresTile; i += 4 * kSquaresThreads) {
          const int64_t e = first + i;
          const int bytes = e < end ? int(end - e < 4 ? end - e : 4) * 4 : 0;
          cp_async16_bytes(smem_addr(dst + i), bytes ? x + e : x, bytes);
        }
      } else {
        for (int i = threadIdx.x; i < kSquaresTile; i += kSquaresThreads)
          cp_async4(smem_addr(dst + i), first + i < end ? x + first + i : x, first + i < end);
      }
    }
    cp_async_commit();
  };
  int64_t next = begin;
  for (int slot = 0; slot < kSquaresStages - 1; ++slot, next += kSquaresTile) stage(next, slot);
  float acc = 0.0f;
  int slot = 0;
  for (int64_t first = begin; first < end; first += kSquaresTile) {
    cp_async_wait<kSquaresStages - 2>();  // this thread's pieces of the tile at `first`
    __syncthreads();                      // everyone's; and the slot refilled next is read by no one
    stage(next, (slot + kSquaresStages - 1) % kSquaresStages);
    next += kSquaresTile;
    if (threadIdx.x < kSquaresLanes) {
      const float* tile = ring + slot * kSquaresTile;
      const int count = int(end - first < kSquaresTile ? end - first : kSquaresTile);
      for (int i = threadIdx.x; i < count; i += kSquaresLanes) acc += tile[i] * tile[i];
    }
    slot = (slot + 1) % kSquaresStages;
  }
  cp_async_wait<0>();
  if (threadIdx.x < kSquaresLanes) lanes[threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int width = kSquaresLanes; width > 1; width /= 2)  // pairwise_tree, level by level
    for (int j = 0; j < width / 2; ++j) lanes[j] = lanes[2 * j] + lanes[2 * j + 1];
  partials[t * 8 + c] = lanes[0];
}

__global__ void first_nonfinite_kernel(const float* x, int64_t n, unsigned long long* first) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (!isfinite(x[i])) atomicMin(first, (unsigned long long)i);  // the minimum: one answer
}

}  // namespace

void adamw_step(const AdamWTensor* tensors, int64_t count, int64_t max_numel, const AdamWScalars& s,
                cudaStream_t stream) {
  if (count == 0) return;
  LS_CHECK(count <= 65535, "adamw_step: ", count, " tensors exceed the grid");
  const dim3 grid(unsigned(std::min<int64_t>(ceil_div(max_numel, 256), 1024)), unsigned(count));
  adamw_kernel<<<grid, 256, 0, stream>>>(tensors, s);
  LS_CUDA_LAUNCHED();
}

void sum_squares_chunks(const float* const* data, const int64_t* numel, int64_t count, float* partials,
                        cudaStream_t stream) {
  if (count == 0) return;
  static const bool configured = [] {
    LS_CUDA_CHECK(
        cudaFuncSetAttribute(sum_squares_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSquaresSmem)));
    return true;
  }();
  (void)configured;
  sum_squares_kernel<<<dim3(unsigned(count), 8), kSquaresThreads, kSquaresSmem, stream>>>(data, numel, partials);
  LS_CUDA_LAUNCHED();
}

void widen_bf16(const __nv_bfloat16* x, float* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  widen_bf16_kernel<<<unsigned(std::min<int64_t>(ceil_div(n, 256), 65536)), 256, 0, stream>>>(x, out, n);
  LS_CUDA_LAUNCHED();
}

int64_t first_nonfinite(const float* x, int64_t n, cudaStream_t stream) {
  unsigned long long* first = nullptr;
  LS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&first), 8, stream));
  const unsigned long long none = ~0ull;
  LS_CUDA_CHECK(cudaMemcpyAsync(first, &none, 8, cudaMemcpyHostToDevice, stream));
  if (n > 0)
    first_nonfinite_kernel<<<unsigned(std::min<int64_t>(ceil_div(n, 256), 4096)), 256, 0, stream>>>(x, n, first);
  unsigned long long out = none;
  LS_CUDA_CHECK(cudaMemcpyAsync(&out, first, 8, cudaMemcpyDeviceToHost, stream));
  LS_CUDA_CHECK(cudaFreeAsync(first, stream));
  LS_CUDA_CHECK(cudaStreamSynchronize(stream));
  return out == none ? -1 : int64_t(out);
}

}  // namespace lockstep::cuda
