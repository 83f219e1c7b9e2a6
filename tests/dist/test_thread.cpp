// The same checks as the mpirun worker, on ranks that are threads of this process; plus
// the volume the collectives move, measured by the counting decorator.
#include <gtest/gtest.h>

#include "dist/counting_communicator.h"
#include "dist/thread_communicator.h"
#include "dist_checks.h"

namespace lockstep {
namespace {

using namespace lockstep::dist;

class ThreadRanks : public ::testing::TestWithParam<int> {};

TEST_P(ThreadRanks, Primitives) { run_threads(GetParam(), test::check_primitives); }
TEST_P(ThreadRanks, CanonicalCollectives) { run_threads(GetParam(), test::check_canonical); }
TEST_P(ThreadRanks, TopologyGroups) { run_threads(GetParam(), test::check_topology_groups); }

// The all-reduce moves 2(T-1)/T x bytes per rank (a ring all-reduce's volume), the SP
// reduce-scatter and all-gather (T-1)/T x bytes each.
TEST_P(ThreadRanks, VolumeMatchesRing) {
  const int t = GetParam();
  const int64_t rows = 256, len = 64, n = rows * len;
  const uint64_t bytes = n * sizeof(float);
  run_threads(t, [&](Communicator& inner) {
    CountingCommunicator c(inner);
    std::vector<float> x(n, 1.0f), part(n);
    canonical_all_reduce(c, x.data(), n);
    EXPECT_EQ(c.volume().total(), 2 * (t - 1) * bytes / t);
    c.reset();
    canonical_reduce_scatter(c, x.data(), rows, len, part.data());
    EXPECT_EQ(c.volume().all_to_all, (t - 1) * bytes / t);
    c.reset();
    sp_all_gather(c, part.data(), rows, len, x.data());
    EXPECT_EQ(c.volume().all_gather, (t - 1) * bytes / t);
  });
}

INSTANTIATE_TEST_SUITE_P(Sizes, ThreadRanks, ::testing::Values(2, 4, 8));

TEST(ThreadCommunicator, FailureOfOneRankReachesTheCaller) {
  // Rank 1 throws; the others are blocked in a barrier and must be released.
  EXPECT_THROW(run_threads(4,
                           [](Communicator& c) {
                             if (c.rank() == 1) fail("rank 1 broke");
                             c.barrier();
                           }),
               Error);
  try {
    run_threads(3, [](Communicator& c) {
      if (c.rank() == 2) fail("rank 2 broke");
      std::vector<int> x(3), y(9);
      c.all_gather_n(x.data(), y.data(), 3);
    });
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "rank 2 broke");
  }
}

TEST(ThreadCommunicator, MismatchedAllToAllIsAnError) {
  EXPECT_THROW(run_threads(2,
                           [](Communicator& c) {
                             std::vector<size_t> sc{4, 4}, sd{0, 4}, rc{4, c.rank() == 0 ? 8u : 4u},
                                 rd{0, 4};
                             std::vector<uint8_t> s(8), r(12);
                             c.all_to_all_v(s.data(), sc, sd, r.data(), rc, rd);
                           }),
               Error);
}

}  // namespace
}  // namespace lockstep
