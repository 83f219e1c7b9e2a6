// The chunk loop and the fold of the warpgroup-MMA outer sums (outer_sum_split_wgmma.cu,
// outer_sum_split_tma.cu): how a tile's per-chunk partials enter the pairwise chunk tree. Both
// kernels call these, so their bits cannot drift apart.
#pragma once
#include <cstdint>

#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda {

// step(0) .. step(steps - 1) of a stage's 1-4 k16 steps, one branch each (constant indices).
template <typename Step>
__device__ __forceinline__ void issue_steps(int steps, Step step) {
  if (steps == 4) {
    step(0), step(1), step(2), step(3);
  } else if (steps == 3) {
    step(0), step(1), step(2);
  } else if (steps == 2) {
    step(0), step(1);
  } else {
    step(0);
  }
}

// Chunk c's partial `acc` (a warpgroup's m64nN accumulators: 4 j .. 4 j + 3 are row i, columns
// k and k + 1, then row i + 8, the same) into the tree of chunk_count chunks. The pending
// levels are one float4 a thread and fragment: level 0 from level0(j) (registers, read only: a
// fold in pairs never leaves a level 0 behind) when kLevel0InRegisters, level 1 at
// pending[j * threads + tid]; else both at pending (level 1 after the Fragments level-0 rows).
template <int kAcc, bool kLevel0InRegisters, typename Level0>
__device__ __forceinline__ void fold_chunk_partial(const float (&acc)[kAcc], int c, int chunk_count, float* out,
                                                   int64_t i, int64_t k0, int lane, int64_t I, int64_t K,
                                                   float4* pending, int threads, int tid, Level0 level0) {
  constexpr int kFragments = kAcc / 4;
  const bool last = c == chunk_count - 1;
  const int level = tree_level(c);
#pragma unroll
  for (int j = 0; j < kFragments; ++j) {
    const int64_t k = k0 + 8 * j + 2 * (lane % 4);
    const float(&fragment)[4] = *reinterpret_cast<const float(*)[4]>(acc + 4 * j);
    float* row0 = out + i * K + k;
    float* row8 = row0 + 8 * K;
    const bool inside0 = k < K && i < I, inside8 = k < K && i + 8 < I;
    float4& mine = pending[j * threads + tid];
    if constexpr (kLevel0InRegisters) {
      float4 pending0 = level0(j);
      fold_fragment(fragment, level, last, pending0, mine, row0, row8, inside0, inside8);
    } else {
      fold_fragment(fragment, level, last, mine, pending[(kFragments + j) * threads + tid], row0, row8, inside0,
                    inside8);
    }
  }
}

// fold_chunk_partial_on_chip at tree level kLevel (kLast: the tree's root, into the output, or
// with accumulate added to what the output holds, the output's value first).
// Straight-line adds: a fold whose level were a run-time value would issue every level's adds
// under predicates, and at 64 rows a chunk those instructions, not the MMAs, bound the tile.
template <int kLevel, bool kLast, int kAcc, typename Level0>
__device__ __forceinline__ void fold_on_chip_at(const float (&acc)[kAcc], float* out, int64_t i, int64_t k0, int lane,
                                                int64_t I, int64_t K, float4 (&level1)[kAcc / 4], float4* pending,
                                                int threads, int tid, Level0 level0, bool accumulate) {
  constexpr int kFragments = kAcc / 4;
  const auto add = [](float4 p, float4 v) { return make_float4(p.x + v.x, p.y + v.y, p.z + v.z, p.w + v.w); };
#pragma unroll
  for (int j = 0; j < kFragments; ++j) {
    float4 v = make_float4(acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]);
    if constexpr (kLevel >= 1) v = add(level0(j), v);
    if constexpr (kLevel >= 2) v = add(level1[j], v);
    float4& level2 = pending[j * threads + tid];
    if constexpr (kLevel >= 3) v = add(level2, v);
    if constexpr (kLast) {
      const int64_t k = k0 + 8 * j + 2 * (lane % 4);
      float2* row0 = reinterpret_cast<float2*>(out + i * K + k);
      float2* row8 = reinterpret_cast<float2*>(out + (i + 8) * K + k);
      if (accumulate) {  // this thread wrote these words in the previous part's fold
        if (k < K && i < I) v.x = row0->x + v.x, v.y = row0->y + v.y;
        if (k < K && i + 8 < I) v.z = row8->x + v.z, v.w = row8->y + v.w;
      }
      if (k < K && i < I) *row0 = make_float2(v.x, v.y);
      if (k < K && i + 8 < I) *row8 = make_float2(v.z, v.w);
    } else if constexpr (kLevel == 1) {
      level1[j] = v;
    } else if constexpr (kLevel == 2) {
      level2 = v;
    }
  }
}

// fold_chunk_partial for chunks in pairs with level 1 in registers too (level1, a float4 a
// fragment) and level 2 at pending[j * threads + tid] instead of in the output: the same
// additions in the same order (fold_fragment's), and no pending subtree goes through global
// memory. Level 0 comes from level0(j) (x of the pair). The level is the same for the whole
// block, so one branch picks the path. accumulate: the root is added to the output's value.
template <int kAcc, typename Level0>
__device__ __forceinline__ void fold_chunk_partial_on_chip(const float (&acc)[kAcc], int c, int chunk_count, float* out,
                                                           int64_t i, int64_t k0, int lane, int64_t I, int64_t K,
                                                           float4 (&level1)[kAcc / 4], float4* pending, int threads,
                                                           int tid, Level0 level0, bool accumulate = false) {
  const bool last = c == chunk_count - 1;
  const auto at = [&]<int kLevel>() {
    if (last) {
      fold_on_chip_at<kLevel, true>(acc, out, i, k0, lane, I, K, level1, pending, threads, tid, level0, accumulate);
    } else if constexpr (kLevel == 1 || kLevel == 2) {
      fold_on_chip_at<kLevel, false>(acc, out, i, k0, lane, I, K, level1, pending, threads, tid, level0, false);
    }  // else: level 0 stays in x (only a tree of one chunk writes it); chunk 7 ends a tree of 8
  };
  switch (tree_level(c)) {
    case 0: return at.template operator()<0>();
    case 1: return at.template operator()<1>();
    case 2: return at.template operator()<2>();
    default: return at.template operator()<3>();
  }
}

// A tile's chunks in pairs: run_pair(x, y, c) issues chunk c's MMAs into x and chunk c + 1's
// (if any) into y, both zeroed first; drain() waits for every MMA; fold(acc, c, level0) is
// fold_chunk_partial. One drain a pair (chunk c + 1's MMAs start while c's finish); x is then
// the level 0 that y's fold reads.
template <int kAcc, typename RunPair, typename Drain, typename Fold>
__device__ __forceinline__ void run_chunk_pairs(int chunk_count, RunPair run_pair, Drain drain, Fold fold) {
  float x[kAcc], y[kAcc];
  for (int c = 0; c < chunk_count; c += 2) {
    const bool pair = c + 1 < chunk_count;
    run_pair(x, y, c);
    drain();
    pin_registers(x);
    if (pair) {
      pin_registers(y);
      // Chunk c's fold would only have put x at level 0: y's fold reads it there.
      fold(y, c + 1, [&](int j) { return make_float4(x[4 * j], x[4 * j + 1], x[4 * j + 2], x[4 * j + 3]); });
    } else {
      fold(x, c, [](int) { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); });  // the last chunk, at level 0
    }
  }
}

// A tile's chunks: run_chunk(acc, c) issues chunk c's MMAs into acc (zeroed first), drain()
// waits for every MMA, fold(acc, c, level0) is fold_chunk_partial. kPairs: run_chunk_pairs
// with the two chunks issued one after the other. Else one drain and fold a chunk.
template <int kAcc, bool kPairs, typename Run, typename Drain, typename Fold>
__device__ __forceinline__ void run_chunks(int chunk_count, Run run_chunk, Drain drain, Fold fold) {
  if constexpr (kPairs) {
    run_chunk_pairs<kAcc>(
        chunk_count,
        [&](float(&x)[kAcc], float(&y)[kAcc], int c) {
          run_chunk(x, c);
          if (c + 1 < chunk_count) run_chunk(y, c + 1);
        },
        drain, fold);
  } else {
    for (int c = 0; c < chunk_count; ++c) {
      float acc[kAcc];
      run_chunk(acc, c);
      drain();
      pin_registers(acc);
      fold(acc, c, [](int) { return make_float4(0.0f, 0.0f, 0.0f, 0.0f); });  // levels in `pending`
    }
  }
}

}  // namespace lockstep::cuda
