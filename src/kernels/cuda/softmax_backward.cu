// Softmax backward kernels on the GPU (backward.h): the router's top-k softmax, and the
// log-softmax with target gather and its entropy over the vocabulary.
#include "kernels/canonical.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/row_ops.cuh"

namespace lockstep::cuda {

namespace {

constexpr int kRouteWarps = 4;
constexpr int kMaxExperts = 512;

// One warp per token: the probabilities by the router's own procedure (route_probs), then
// cpu::route_topk_backward's sums in its order on lane 0.
__global__ void route_backward_kernel(const float* logits, const int32_t* ids, const float* weights,
                                      const float* dweights, float* dlogits, int64_t T, int64_t E, int64_t k,
                                      bool normalize) {
  __shared__ float probs_s[kRouteWarps][kMaxExperts], dp_s[kRouteWarps][kMaxExperts];
  __shared__ float pdp_s[kRouteWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (t >= T) return;
  float* probs = probs_s[warp];
  float* dp = dp_s[warp];
  route_probs(logits + t * E, E, probs);
  for (int64_t e = lane; e < E; e += 32) dp[e] = 0.0f;
  __syncwarp();
  if (lane == 0) {
    const int32_t* id = ids + t * k;
    const float* w = weights + t * k;
    const float* dw = dweights + t * k;
    if (normalize) {
      float total = 0.0f, wdw = 0.0f;
      for (int64_t i = 0; i < k; ++i) total += probs[id[i]];
      for (int64_t i = 0; i < k; ++i) wdw += dw[i] * w[i];
      for (int64_t i = 0; i < k; ++i) dp[id[i]] = (dw[i] - wdw) / total;
    } else {
      for (int64_t i = 0; i < k; ++i) dp[id[i]] = dw[i];
    }
    float pdp = 0.0f;
    for (int64_t e = 0; e < E; ++e) pdp += dp[e] * probs[e];
    pdp_s[warp] = pdp;
  }
  __syncwarp();
  const float pdp = pdp_s[warp];
  for (int64_t e = lane; e < E; e += 32) dlogits[t * E + e] = probs[e] * (dp[e] - pdp);
}

// d logit of one element: -g p (the gathered log-prob), less de p (log p + H) (the entropy),
// plus g at the target. Both kernels below call it, so the packed form rounds the same fp32.
__device__ __forceinline__ float log_softmax_grad(float z, float lse, float g, const float* dentropy,
                                                  const float* entropy, int64_t r, bool is_target) {
  const float lp = z - lse;
  const float p = expf(lp);
  float d = -g * p;
  if (dentropy) d -= dentropy[r] * p * (lp + entropy[r]);
  if (is_target) d += g;
  return d;
}

__global__ void log_softmax_backward_kernel(const float* logits, const float* lse, const int32_t* targets,
                                            const float* dlogp, const float* dentropy, const float* entropy,
                                            float* dlogits, int64_t V) {
  const int64_t r = blockIdx.y, v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= V) return;
  dlogits[r * V + v] = log_softmax_grad(logits[r * V + v], lse[r], dlogp[r], dentropy, entropy, r, v == targets[r]);
}

// One block a row (grid-stride), 8 values a thread, as pack_bf16_rows_kernel: every thread
// reads its segment's logits before any writes that segment's bf16 d to the front of it.
__global__ void log_softmax_backward_packed_kernel(float* logits, const float* lse, const int32_t* targets,
                                                   const float* dlogp, const float* dentropy, const float* entropy,
                                                   int64_t rows, int64_t V) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* row = logits + r * V;
    bf16* packed = reinterpret_cast<bf16*>(row);
    const float row_lse = lse[r], g = dlogp[r];
    const int64_t target = targets[r];
    for (int64_t c0 = 0; c0 < V; c0 += 8 * int64_t(blockDim.x)) {
      const int64_t c = c0 + 8 * int64_t(threadIdx.x);
      float4 a = make_float4(0, 0, 0, 0), b = a;
      if (c < V) a = reinterpret_cast<const float4*>(row + c)[0], b = reinterpret_cast<const float4*>(row + c)[1];
      __syncthreads();
      if (c >= V) continue;
      const float z[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
      uint32_t out[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t v = c + 2 * j;
        out[j] = pack_bf16(to_bf16(log_softmax_grad(z[2 * j], row_lse, g, dentropy, entropy, r, v == target)),
                           to_bf16(log_softmax_grad(z[2 * j + 1], row_lse, g, dentropy, entropy, r, v + 1 == target)));
      }
      *reinterpret_cast<uint4*>(packed + c) = make_uint4(out[0], out[1], out[2], out[3]);
    }
  }
}

// One thread per (row, canonical chunk): the chunk's sum of p log p ascending, then the tree.
__global__ void entropy_kernel(const float* logits, const float* lse, float* entropy, int64_t V) {
  __shared__ float parts[kTMax];
  const int64_t r = blockIdx.x, len = (V + kTMax - 1) / kTMax;
  const int c = threadIdx.x;
  const int64_t begin = min(V, c * len), end = min(V, (c + 1) * len);
  const float* z = logits + r * V;
  float s = 0.0f;
  for (int64_t v = begin; v < end; ++v) {
    const float lp = z[v] - lse[r];
    s += expf(lp) * lp;
  }
  parts[c] = s;
  __syncthreads();
  if (c == 0)
    entropy[r] = -(((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7])));
}

}  // namespace

void route_topk_backward(const float* router_logits, const int32_t* expert_ids, const float* weights,
                         const float* dweights, float* dlogits, int64_t T, int64_t E, int64_t k, bool normalize,
                         cudaStream_t s) {
  LS_CHECK(E <= kMaxExperts, "route_topk_backward: ", E, " experts exceed ", kMaxExperts);
  if (T == 0) return;
  route_backward_kernel<<<unsigned(ceil_div(T, kRouteWarps)), 32 * kRouteWarps, 0, s>>>(
      router_logits, expert_ids, weights, dweights, dlogits, T, E, k, normalize);
  LS_CUDA_LAUNCHED();
}

void log_softmax_gather_backward(const float* logits, const float* lse, const int32_t* targets, const float* dlogp,
                                 const float* dentropy, const float* entropy, float* dlogits, int64_t R, int64_t V,
                                 cudaStream_t s) {
  if (R == 0) return;
  LS_CHECK(R <= 65535, "log_softmax_gather_backward: ", R, " rows exceed the grid; pass slices");
  log_softmax_backward_kernel<<<dim3(unsigned(ceil_div(V, 256)), unsigned(R)), 256, 0, s>>>(
      logits, lse, targets, dlogp, dentropy, entropy, dlogits, V);
  LS_CUDA_LAUNCHED();
}

void log_softmax_gather_backward_packed(float* logits, const float* lse, const int32_t* targets, const float* dlogp,
                                        const float* dentropy, const float* entropy, int64_t R, int64_t V,
                                        cudaStream_t s) {
  LS_CHECK(V % 8 == 0 && aligned16(logits), "log_softmax_gather_backward_packed: rows of ", V, " logits at ",
           static_cast<const void*>(logits), " (needs a multiple of 8, 16-byte aligned)");
  if (R == 0 || V == 0) return;
  log_softmax_backward_packed_kernel<<<unsigned(std::min<int64_t>(R, 1 << 20)), 256, 0, s>>>(
      logits, lse, targets, dlogp, dentropy, entropy, R, V);
  LS_CUDA_LAUNCHED();
}

void softmax_entropy(const float* logits, const float* lse, float* entropy, int64_t R, int64_t V, cudaStream_t s) {
  if (R == 0) return;
  entropy_kernel<<<unsigned(R), kTMax, 0, s>>>(logits, lse, entropy, V);
  LS_CUDA_LAUNCHED();
}

}  // namespace lockstep::cuda
