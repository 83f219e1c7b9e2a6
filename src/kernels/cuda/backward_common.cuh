// Device helpers of the backward kernels: exact widening of an input, the pairwise tree of
// canonical.h folded as the chunk partials arrive, and the CPU's dot procedure.
#pragma once
#include "kernels/canonical.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"  // cp_async_commit

namespace lockstep::cuda {

inline void check_chunk_bounds(const ChunkBounds& b, const char* what) {
  LS_CHECK(b.count >= 1 && b.count <= kTMax && is_power_of_two(b.count), what,
           ": the number of chunks must be a power of two <= 8, got ", b.count);
  for (int c = 0; c < b.count; ++c) LS_CHECK(b.rows[c] <= b.rows[c + 1], what, ": chunk ", c, " ends before it begins");
}

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(bf16 x) { return to_f32(x); }

// The pairwise tree of up to 8 chunk partials, folded as they arrive: chunk c's sum `v`
// merges with the saved left subtrees while c's low bits are ones (a binary counter), so the
// result is pairwise_tree of canonical.h. `levels` holds the pending left subtrees; push
// returns the subtree it completed, which after the last of a power-of-two count of pushes is
// the root (no slot for it: the tensor-core sums hold 32 trees a thread in registers).
struct TreeFold {
  float levels[3];
  __device__ __forceinline__ float push(int c, float v) {
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
    for (int l = 0; l < 3; ++l)
      if (l == level) levels[l] = v;
    return v;
  }
};

// TreeFold's merge for the tensor-core outer sums, whose pending subtrees wait outside the
// registers: levels 0 and 1 at level0 and level1 (shared memory, read back only by the thread
// that wrote them), level 2 in the output element itself. Chunk c's partial v merges with the
// subtrees it completes; the root, or a level-2 subtree, is stored to the output if inside.
__device__ __forceinline__ int tree_level(int c) { return (c & 1) == 0 ? 0 : (c & 3) != 3 ? 1 : (c & 7) != 7 ? 2 : 3; }
__device__ __forceinline__ void fold_partial(float v, int level, bool last, float* level0, float* level1, float* out,
                                             bool inside) {
  if (level >= 1) v = *level0 + v;
  if (level >= 2) v = *level1 + v;
  if (level >= 3 && inside) v = *out + v;
  if (last || level == 2) {
    if (inside) *out = v;
  } else if (level == 0) {
    *level0 = v;
  } else if (level == 1) {
    *level1 = v;
  }
}

// fold_partial of an m16n8 fragment's four accumulators at once (the split outer sums): the
// pending levels one float4 a thread and fragment (in shared or global memory, or registers),
// the output two float2 (row i: columns k and k + 1; row i + 8: the same), each element folded
// exactly as fold_partial folds it.
__device__ __forceinline__ void fold_fragment(const float (&acc)[4], int level, bool last, float4& level0,
                                              float4& level1, float* row0, float* row8, bool inside0, bool inside8) {
  float4 v = make_float4(acc[0], acc[1], acc[2], acc[3]);
  if (level >= 1) {
    const float4 p = level0;
    v = make_float4(p.x + v.x, p.y + v.y, p.z + v.z, p.w + v.w);
  }
  if (level >= 2) {
    const float4 p = level1;
    v = make_float4(p.x + v.x, p.y + v.y, p.z + v.z, p.w + v.w);
  }
  if (level >= 3) {
    if (inside0) {
      const float2 p = *reinterpret_cast<const float2*>(row0);
      v.x = p.x + v.x, v.y = p.y + v.y;
    }
    if (inside8) {
      const float2 p = *reinterpret_cast<const float2*>(row8);
      v.z = p.x + v.z, v.w = p.y + v.w;
    }
  }
  if (last || level == 2) {
    if (inside0) *reinterpret_cast<float2*>(row0) = make_float2(v.x, v.y);
    if (inside8) *reinterpret_cast<float2*>(row8) = make_float2(v.z, v.w);
  } else if (level == 0) {
    level0 = v;
  } else if (level == 1) {
    level1 = v;
  }
}

// The loads of the split outer sums' stages: the stages of all chunks in order, kRows summed
// rows each from the chunk's first row (empty chunks have none), into a ring of kStages slots.
// next() issues one stage, load(slot, first row, chunk end), and commits a cp.async group (an
// empty one where nothing is left, which keeps the wait counts aligned).
template <int kRows, int kStages, typename Row = int64_t>
struct StageLoader {
  const Row* rows;  // chunk bounds: chunk c is rows[c] .. rows[c + 1]
  int count;        // chunks
  int chunk = 0, slot = 0;
  int64_t s0;
  __device__ StageLoader(const Row* chunk_rows, int chunk_count)
      : rows(chunk_rows), count(chunk_count), s0(chunk_rows[0]) {}
  template <typename Load>
  __device__ __forceinline__ void next(Load load) {
    while (chunk < count && s0 >= rows[chunk + 1])
      if (++chunk < count) s0 = rows[chunk];
    if (chunk < count) {
      load(slot, s0, rows[chunk + 1]);
      s0 += kRows;
      slot = (slot + 1) % kStages;
    }
    cp_async_commit();
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

// dot_lanes of a row held by a warp, lane l holding the products of elements l + 32 j in
// prod[j] (n = 32 kPer): lane q < 8's chain takes elements q, q + 8, ... by shuffles, in that
// order, then tree8; every lane returns the sum. The same additions as dot_lanes.
template <int kPer>
__device__ __forceinline__ float dot_lanes_of_warp(const float (&prod)[kPer]) {
  const int q = threadIdx.x % 8;
  float part = 0.0f;
#pragma unroll
  for (int m = 0; m < 4 * kPer; ++m) part = part + __shfl_sync(0xffffffffu, prod[m / 4], q + 8 * (m % 4));
  float lanes[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) lanes[j] = __shfl_sync(0xffffffffu, part, j);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

}  // namespace lockstep::cuda
