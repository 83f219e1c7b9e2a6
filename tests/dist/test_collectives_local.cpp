// Single-process checks: the tree building blocks, the maxsum combine, row ranges, and the
// one-rank communicator (multi-rank runs are in test_mpi.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/deterministic_collectives.h"
#include "dist/maxsum.h"
#include "dist/mpi_communicator.h"
#include "dist_test_util.h"
#include "kernels/canonical.h"

namespace lockstep {
namespace {

using namespace lockstep::dist;
using test::same_bits;
using test::spread_values;

TEST(DistLocal, PairwiseTreeBlocksIsTree8) {
  const int64_t n = 1000;
  auto c = spread_values(1, 8 * n);
  std::vector<float> ref(n), seq(n);
  for (int64_t i = 0; i < n; ++i) {
    float leaves[8];
    for (int k = 0; k < 8; ++k) leaves[k] = c[k * n + i];
    ref[i] = tree8(leaves);
    EXPECT_EQ(pairwise_tree(leaves, 8), ref[i]);
    float s = 0;
    for (int k = 0; k < 8; ++k) s += leaves[k];
    seq[i] = s;
  }
  // The data is order-sensitive: a left-to-right sum differs from the tree somewhere.
  EXPECT_GT(test::count_bit_diffs(ref.data(), seq.data(), n), 0u);
  pairwise_tree_blocks(c.data(), 8, n);
  EXPECT_TRUE(same_bits(c.data(), ref.data(), n));
  EXPECT_THROW(pairwise_tree_blocks(c.data(), 3, n), Error);
}

TEST(DistLocal, MaxsumCombine) {
  const float inf = std::numeric_limits<float>::infinity();
  float m, s;
  combine_maxsum(-inf, 0.0f, -inf, 0.0f, m, s);  // two all-padding chunks
  EXPECT_EQ(m, -inf);
  EXPECT_EQ(s, 0.0f);
  combine_maxsum(-inf, 0.0f, 1.5f, 2.0f, m, s);
  EXPECT_EQ(m, 1.5f);
  EXPECT_EQ(s, 2.0f);
  combine_maxsum(1.0f, 3.0f, 2.0f, 0.5f, m, s);
  EXPECT_EQ(m, 2.0f);
  EXPECT_EQ(s, 3.0f * std::exp(-1.0f) + 0.5f);
  // The recursive tree matches the explicit ((p0 p1)(p2 p3)) shape.
  float mx[4] = {0.5f, 2.0f, -1.0f, 3.0f}, sm[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  float m01, s01, m23, s23, me, se;
  combine_maxsum(mx[0], sm[0], mx[1], sm[1], m01, s01);
  combine_maxsum(mx[2], sm[2], mx[3], sm[3], m23, s23);
  combine_maxsum(m01, s01, m23, s23, me, se);
  pairwise_maxsum(mx, sm, 4, m, s);
  EXPECT_EQ(m, me);
  EXPECT_EQ(s, se);
}

TEST(DistLocal, SpRowRanges) {
  // 37 rows: chunk 5; tp 2 -> 20 + 17; tp 4 -> 10, 10, 10, 7; tp 8 -> 5 x 7 + 2.
  EXPECT_EQ(sp_row_range(37, 2, 0).size(), 20);
  EXPECT_EQ(sp_row_range(37, 2, 1).size(), 17);
  EXPECT_EQ(sp_row_range(37, 4, 3).begin, 30);
  EXPECT_EQ(sp_row_range(37, 4, 3).size(), 7);
  EXPECT_EQ(sp_row_range(37, 8, 7).size(), 2);
  EXPECT_EQ(sp_row_range(3, 8, 5).size(), 0);  // fewer rows than chunks: empty ranks
  for (int t : {1, 2, 4, 8})
    for (int64_t n : {0, 1, 7, 8, 37, 64, 1001}) {
      int64_t next = 0;
      for (int r = 0; r < t; ++r) {
        RowRange rr = sp_row_range(n, t, r);
        EXPECT_EQ(rr.begin, next);
        next = rr.end;
      }
      EXPECT_EQ(next, n);
    }
  EXPECT_THROW(sp_row_range(8, 3, 0), Error);
}

TEST(DistLocal, SelfCommunicator) {
  SelfCommunicator c;
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.rank(), 0);
  int a[3] = {1, 2, 3}, b[3] = {};
  c.all_gather(a, b, sizeof(a));
  EXPECT_EQ(b[2], 3);
  c.broadcast(a, sizeof(a), 0);
  EXPECT_THROW(c.broadcast(a, sizeof(a), 1), Error);
  c.send_n(a, 3, 0, 5);
  int d[3] = {};
  EXPECT_THROW(c.recv_n(d, 3, 0, 6), Error);
  c.recv_n(d, 3, 0, 5);
  EXPECT_EQ(d[1], 2);
  int e[3] = {};
  c.all_to_all(a, e, sizeof(a));
  EXPECT_EQ(e[0], 1);
  EXPECT_NE(c.split(0, 0), nullptr);
  EXPECT_EQ(c.split(-1, 0), nullptr);

  // One-rank collectives are the identity (the rank already holds the whole tree).
  auto v = spread_values(2, 100), w = v;
  canonical_all_reduce(c, w.data(), 100);
  tree_all_reduce(c, w.data(), 100);
  EXPECT_TRUE(same_bits(v.data(), w.data(), 100));
  std::vector<float> out(100);
  canonical_reduce_scatter(c, v.data(), 10, 10, out.data());
  EXPECT_TRUE(same_bits(v.data(), out.data(), 100));
  sp_all_gather(c, v.data(), 10, 10, out.data());
  EXPECT_TRUE(same_bits(v.data(), out.data(), 100));
}

TEST(DistLocal, WorldWithoutLauncherIsSelf) {
  if (MpiRuntime::launched_by_mpirun()) GTEST_SKIP() << "running under a launcher";
  auto w = world_communicator();
  EXPECT_EQ(w->size(), 1);
  EXPECT_EQ(w->backend(), "self");
  EXPECT_FALSE(MpiRuntime::instance().active());
}

}  // namespace
}  // namespace lockstep
