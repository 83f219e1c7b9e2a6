// Canonical micro-batches (docs/numerics.md, rule 8): the global batch is cut into a
// fixed power-of-two number of contiguous micro-batches, and their gradients are summed by
// the fixed pairwise tree over the micro-batch index, whatever the order they arrive in
// and however many ranks computed them.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace lockstep {

using GradMap = std::map<std::string, Tensor>;

// [begin, end) sample ranges of the `num_microbatches` micro-batches of a batch of
// `batch_size` samples (equal, contiguous; batch_size must divide).
std::vector<std::pair<int64_t, int64_t>> canonical_microbatches(int64_t batch_size, int64_t num_microbatches);

// a += b, elementwise; names and shapes must match.
void add_grads(GradMap& a, const GradMap& b);

// Sums micro-batch gradients in the tree ((g0+g1)+(g2+g3))+... as they are pushed in index
// order, holding at most log2(count) partials.
class PairwiseGradAccumulator {
 public:
  explicit PairwiseGradAccumulator(int64_t count);
  void push(GradMap grads);
  // The tree sum; requires all `count` micro-batches pushed.
  GradMap finish();

 private:
  int64_t count_, pushed_ = 0;
  std::vector<std::pair<int, GradMap>> stack_;  // (tree level, partial sum)
};

}  // namespace lockstep
