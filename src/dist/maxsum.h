// The (max, sum-of-exp) pair combine of the canonical log-softmax (docs/numerics.md,
// rules 1 and 6). The single-rank kernel and the vocab-parallel cross-rank combine must
// use exactly this function, in the same pairwise tree order, so that every TP size gives
// the same bits. Header-only and dependency-free so src/kernels can include it.
//
// A chunk that is all padding has (max, sum) = (-inf, 0). Writing the scale of the side
// that holds the max as exactly 1 (instead of exp(m - m)) keeps (-inf, 0) + (-inf, 0)
// = (-inf, 0) instead of NaN; for finite values exp(0) == 1 so nothing else changes.
#pragma once
#include <cmath>

namespace lockstep {

inline void combine_maxsum(float am, float as, float bm, float bs, float& m, float& s) {
  m = am > bm ? am : bm;
  const float ea = am == m ? 1.0f : std::exp(am - m);
  const float eb = bm == m ? 1.0f : std::exp(bm - m);
  s = as * ea + bs * eb;
}

// Pairwise tree over `count` (a power of two) consecutive pairs, the same shape as
// pairwise_tree in kernels/canonical.h: ((p0 p1)(p2 p3))((p4 p5)(p6 p7)) for count 8.
inline void pairwise_maxsum(const float* max, const float* sum, int count, float& m, float& s) {
  if (count == 1) {
    m = max[0];
    s = sum[0];
    return;
  }
  const int half = count / 2;
  float am, as, bm, bs;
  pairwise_maxsum(max, sum, half, am, as);
  pairwise_maxsum(max + half, sum + half, half, bm, bs);
  combine_maxsum(am, as, bm, bs, m, s);
}

}  // namespace lockstep
