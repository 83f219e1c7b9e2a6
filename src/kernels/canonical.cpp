#include "kernels/canonical.h"

#include <cmath>

namespace lockstep {

MaxSum combine_maxsum(MaxSum a, MaxSum b) {
  if (b.sum == 0.0f) return a;  // an empty (padded) chunk
  if (a.sum == 0.0f) return b;
  float m = a.max > b.max ? a.max : b.max;
  return {m, a.sum * std::exp(a.max - m) + b.sum * std::exp(b.max - m)};
}

}  // namespace lockstep
