// Device helpers of the backward kernels: exact widening of an input, the pairwise tree of
// canonical.h folded as the chunk partials arrive, and the CPU's dot procedure.
#pragma once
#include "kernels/cuda/common.cuh"

namespace lockstep::cuda {

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(bf16 x) { return to_f32(x); }

// The pairwise tree of up to 8 chunk partials, folded as they arrive: chunk c's sum `v`
// merges with the saved left subtrees while c's low bits are ones (a binary counter), so the
// result is pairwise_tree of canonical.h. `levels` holds the pending left subtrees.
struct TreeFold {
  float levels[4];
  __device__ __forceinline__ void push(int c, float v) {
    int level = 0;
    bool merging = true;
#pragma unroll
    for (int l = 0; l < 3; ++l) {
      if (merging && ((c >> l) & 1)) {
        v = levels[l] + v;
        level = l + 1;
      } else {
        merging = false;
      }
    }
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (l == level) levels[l] = v;
  }
  // The root after `count` (a power of two) pushes.
  __device__ __forceinline__ float root(int count) const {
    float r = levels[0];
#pragma unroll
    for (int l = 1; l < 4; ++l)
      if ((1 << l) == count) r = levels[l];
    return r;
  }
};

// The CPU's dot procedure (cpu/dot.h) by one thread over the products product(i), i < n: lane
// j of 8 sums the products of the indices = j (mod 8) in ascending order from 0, then tree8.
// (The CPU's zero padding adds +0 to sums that are never -0: no bit changes.)
template <typename Product>
__device__ __forceinline__ float dot_lanes(Product product, int64_t n) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = acc[j] + product(k + j);
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (k + j < n) acc[j] = acc[j] + product(k + j);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename TA, typename TB>
__device__ __forceinline__ float dot_lanes(const TA* a, const TB* b, int64_t n) {
  return dot_lanes([&](int64_t i) { return widen(a[i]) * widen(b[i]); }, n);
}

}  // namespace lockstep::cuda
