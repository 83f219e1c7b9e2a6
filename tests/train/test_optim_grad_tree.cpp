// Canonical micro-batches and the pairwise gradient tree over the micro-batch index.
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "core/philox.h"
#include "kernels/canonical.h"
#include "train/grad_accumulate.h"

namespace lockstep {
namespace {

GradMap one(uint64_t seed) {
  GradMap g;
  g["x"] = Tensor::zeros({17}, DType::f32);
  for (int i = 0; i < 17; ++i) g["x"].data<float>()[i] = philox_uniform(seed, 0, i) * 1000.0f - 3.3f;
  return g;
}

TEST(OptimGradTree, EqualsTheExplicitPairwiseTree) {
  for (int count : {1, 2, 4, 8}) {
    PairwiseGradAccumulator acc(count);
    for (int m = 0; m < count; ++m) acc.push(one(m));
    GradMap got = acc.finish();
    for (int i = 0; i < 17; ++i) {
      std::vector<float> parts;
      for (int m = 0; m < count; ++m) parts.push_back(one(m)["x"].data<float>()[i]);
      float expected = pairwise_tree(parts.data(), count);
      float v = got["x"].data<float>()[i];
      ASSERT_EQ(std::memcmp(&v, &expected, 4), 0) << count << " " << i;
    }
  }
}

TEST(OptimGradTree, DiffersFromASequentialSumSoTheOrderMatters) {
  // Not a tautology: for these values left-to-right summation gives other bits somewhere.
  PairwiseGradAccumulator acc(8);
  for (int m = 0; m < 8; ++m) acc.push(one(m));
  GradMap tree = acc.finish();
  GradMap seq = one(0);
  for (int m = 1; m < 8; ++m) add_grads(seq, one(m));
  EXPECT_NE(std::memcmp(tree["x"].raw(), seq["x"].raw(), 17 * 4), 0);
}

TEST(OptimGradTree, MicrobatchesAreContiguousAndChecked) {
  auto mb = canonical_microbatches(12, 4);
  ASSERT_EQ(mb.size(), 4u);
  EXPECT_EQ(mb[0], std::make_pair(int64_t(0), int64_t(3)));
  EXPECT_EQ(mb[3], std::make_pair(int64_t(9), int64_t(12)));
  EXPECT_THROW(canonical_microbatches(12, 3), Error);
  EXPECT_THROW(canonical_microbatches(10, 4), Error);
  EXPECT_THROW(PairwiseGradAccumulator(6), Error);
  PairwiseGradAccumulator acc(2);
  acc.push(one(0));
  EXPECT_THROW(acc.finish(), Error);
}

}  // namespace
}  // namespace lockstep
