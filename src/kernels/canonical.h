// The canonical reduction of docs/numerics.md, rule 1: a dimension that some topology
// may split is cut into kTMax = 8 equal contiguous chunks (zero-padded to a multiple of 8);
// each chunk is reduced in fp32 by a fixed procedure, and the 8 partials are combined by
// the fixed pairwise tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)). A rank that owns a
// power-of-two run of chunks computes its subtree; the cross-rank step finishes the tree.
#pragma once
#include <cstdint>

namespace lockstep {

constexpr int kTMax = 8;

// Length of one canonical chunk of a dimension of size n (n padded up to a multiple of 8).
inline int64_t canonical_chunk(int64_t n) { return (n + kTMax - 1) / kTMax; }

// Pairwise tree over `count` (a power of two) consecutive partials.
template <typename T>
inline T pairwise_tree(const T* partials, int count) {
  if (count == 1) return partials[0];
  int half = count / 2;
  return pairwise_tree(partials, half) + pairwise_tree(partials + half, half);
}

inline float tree8(const float* c) { return ((c[0] + c[1]) + (c[2] + c[3])) + ((c[4] + c[5]) + (c[6] + c[7])); }

inline bool is_power_of_two(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

// Lanes of a canonical sum of squares' chunk (the global gradient norm, rule 11): lane j sums
// the squares of the chunk's elements at offsets = j (mod kSquaresLanes) in ascending order,
// the lanes are folded by pairwise_tree. Independent chains let the GPU read a 39M-value chunk
// at memory speed and the CPU vectorise; one chain per chunk cost ~0.16 s a step on an H100.
constexpr int kSquaresLanes = 64;

}  // namespace lockstep

namespace lockstep {

// A (running max, sum of exp(x - max)) pair: the partial of a log-sum-exp. Combining two
// partials is the fixed expression below; the vocabulary tree of the canonical log-softmax
// and its vocab-parallel form both use it, so they give the same bits.
struct MaxSum {
  float max;
  float sum;
};

MaxSum combine_maxsum(MaxSum a, MaxSum b);

inline MaxSum pairwise_tree_maxsum(const MaxSum* partials, int count) {
  if (count == 1) return partials[0];
  int half = count / 2;
  return combine_maxsum(pairwise_tree_maxsum(partials, half), pairwise_tree_maxsum(partials + half, half));
}

}  // namespace lockstep
