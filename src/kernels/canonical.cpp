#include "kernels/canonical.h"

#include "dist/maxsum.h"

namespace lockstep {

// The one pair combine, shared with the vocab-parallel cross-rank step (dist/maxsum.h).
MaxSum combine_maxsum(MaxSum a, MaxSum b) {
  MaxSum out;
  combine_maxsum(a.max, a.sum, b.max, b.sum, out.max, out.sum);
  return out;
}

}  // namespace lockstep
