// top_n_rows: one block per row. Each thread keeps the n best of its strided entries in order
// (most fail the test against its current last), then n rounds of a block-wide pick of the best
// head among the threads' lists. The order (value desc, index asc) is total, so any split of the
// row gives the same list.
#include <climits>
#include <cmath>

#include "core/error.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/row_ops.cuh"
#include "kernels/cuda/top_n.h"

namespace lockstep::cuda {
namespace {

constexpr int kTopThreads = 256;

__device__ __forceinline__ bool before(float a, int32_t ia, float b, int32_t ib) {
  return a > b || (a == b && ia < ib);
}

__global__ void __launch_bounds__(kTopThreads)
    top_n_kernel(const float* values, const int32_t* counts, int32_t* tokens, float* out, int64_t V) {
  const int64_t r = blockIdx.x;
  const int n = counts[r];
  if (n <= 0) return;
  const float* row = values + r * V;
  const int tid = int(threadIdx.x);
  // The thread's list, padded with entries after every real one (-inf at an index past any).
  float lv[kMaxTopN];
  int32_t li[kMaxTopN];
  for (int k = 0; k < kMaxTopN; ++k) lv[k] = -INFINITY, li[k] = INT_MAX;
  for (int64_t v = tid; v < V; v += kTopThreads) {
    const float x = row[v];
    if (!before(x, int32_t(v), lv[n - 1], li[n - 1])) continue;
    int k = n - 1;
    for (; k > 0 && before(x, int32_t(v), lv[k - 1], li[k - 1]); --k) lv[k] = lv[k - 1], li[k] = li[k - 1];
    lv[k] = x;
    li[k] = int32_t(v);
  }
  __shared__ float sv[kTopThreads * kMaxTopN];
  __shared__ int32_t si[kTopThreads * kMaxTopN];
  for (int k = 0; k < n; ++k) sv[tid * kMaxTopN + k] = lv[k], si[tid * kMaxTopN + k] = li[k];
  __shared__ float wv[kTopThreads / 32];
  __shared__ int32_t wi[kTopThreads / 32], wt[kTopThreads / 32];
  int head = 0;  // this thread's next entry
  __syncthreads();
  for (int k = 0; k < n; ++k) {
    float bv = sv[tid * kMaxTopN + head];
    int32_t bi = si[tid * kMaxTopN + head];
    int bt = tid;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, o);
      const int32_t oi = __shfl_xor_sync(kFull, bi, o);
      const int ot = __shfl_xor_sync(kFull, bt, o);
      if (before(ov, oi, bv, bi)) bv = ov, bi = oi, bt = ot;
    }
    if ((tid & 31) == 0) wv[tid >> 5] = bv, wi[tid >> 5] = bi, wt[tid >> 5] = bt;
    __syncthreads();
    bv = wv[0], bi = wi[0], bt = wt[0];
    for (int w = 1; w < kTopThreads / 32; ++w)
      if (before(wv[w], wi[w], bv, bi)) bv = wv[w], bi = wi[w], bt = wt[w];
    if (tid == 0) tokens[r * kMaxTopN + k] = bi, out[r * kMaxTopN + k] = bv;
    if (tid == bt) ++head;  // heads stay < n: a list gives at most n winners in n rounds
    __syncthreads();
  }
}

}  // namespace

void top_n_rows(const float* values, const int32_t* counts, int32_t* tokens, float* out, int64_t R, int64_t V,
                cudaStream_t s) {
  if (R == 0) return;
  LS_CHECK(V > 0 && V < int64_t(INT_MAX), "top_n_rows: vocabulary of ", V, " entries");
  top_n_kernel<<<unsigned(R), kTopThreads, 0, s>>>(values, counts, tokens, out, V);
  LS_CUDA_LAUNCHED();
}

}  // namespace lockstep::cuda
