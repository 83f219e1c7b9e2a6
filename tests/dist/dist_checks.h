// Checks shared by the mpirun worker (test_mpi.cpp) and the in-process thread ranks
// (test_thread.cpp): every primitive, every canonical collective against the single-rank
// tree, and topology groups built by split. Call on every rank of a communicator.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "dist/communicator.h"
#include "dist/deterministic_collectives.h"
#include "dist/maxsum.h"
#include "dist_test_util.h"
#include "kernels/canonical.h"
#include "parallel/topology.h"

namespace lockstep::test {

using namespace lockstep::dist;

inline void check_primitives(Communicator& c) {
  const int t = c.size(), r = c.rank();
  c.barrier();

  for (int root = 0; root < t; ++root) {
    std::vector<int> buf(17, r == root ? root * 7 + 1 : -1);
    c.broadcast_n(buf.data(), buf.size(), root);
    EXPECT_EQ(buf, std::vector<int>(17, root * 7 + 1));
    c.broadcast(nullptr, 0, root);  // zero bytes is legal
  }

  std::vector<int> mine(5), all(5 * t);
  for (int j = 0; j < 5; ++j) mine[j] = r * 100 + j;
  c.all_gather_n(mine.data(), all.data(), 5);
  for (int q = 0; q < t; ++q)
    for (int j = 0; j < 5; ++j) EXPECT_EQ(all[q * 5 + j], q * 100 + j);

  // Uneven all-to-all: rank i sends i + 2j + 1 bytes of value (16i + j) to rank j.
  std::vector<size_t> sc(t), rc(t);
  for (int j = 0; j < t; ++j) sc[j] = r + 2 * j + 1;
  for (int i = 0; i < t; ++i) rc[i] = i + 2 * r + 1;
  auto sd = displacements(sc), rd = displacements(rc);
  std::vector<uint8_t> send(sd.back() + sc.back()), recv(rd.back() + rc.back(), 0xff);
  for (int j = 0; j < t; ++j)
    for (size_t b = 0; b < sc[j]; ++b) send[sd[j] + b] = static_cast<uint8_t>(16 * r + j);
  c.all_to_all_v(send.data(), sc, sd, recv.data(), rc, rd);
  for (int i = 0; i < t; ++i)
    for (size_t b = 0; b < rc[i]; ++b) EXPECT_EQ(recv[rd[i] + b], static_cast<uint8_t>(16 * i + r));

  std::vector<int> blocks(t), got(t);
  for (int j = 0; j < t; ++j) blocks[j] = r * 1000 + j;
  c.all_to_all(blocks.data(), got.data(), sizeof(int));
  for (int i = 0; i < t; ++i) EXPECT_EQ(got[i], i * 1000 + r);

  // Ring send/recv with two tags (even ranks send first, so no rank waits on a cycle).
  const int next = (r + 1) % t, prev = (r + t - 1) % t;
  std::vector<double> out_a(9, r + 0.5), out_b(3, -r), in_a(9), in_b(3);
  auto send_both = [&] {
    c.send_n(out_a.data(), out_a.size(), next, 11);
    c.send_n(out_b.data(), out_b.size(), next, 12);
  };
  auto recv_both = [&] {
    c.recv_n(in_a.data(), in_a.size(), prev, 11);
    c.recv_n(in_b.data(), in_b.size(), prev, 12);
  };
  if (r % 2 == 0) {
    send_both();
    recv_both();
  } else {
    recv_both();
    send_both();
  }
  EXPECT_EQ(in_a, std::vector<double>(9, prev + 0.5));
  EXPECT_EQ(in_b, std::vector<double>(3, -prev));

  // send_recv: partners (0,1), (2,3), ... exchange messages of unequal sizes at once, large
  // enough (4 MiB) that two blocking sends would wait on each other under MPI.
  if (t % 2 == 0) {
    const int partner = r ^ 1;
    const size_t mine = (size_t{1} << 20) + size_t(r), theirs = (size_t{1} << 20) + size_t(partner);
    std::vector<float> out(mine), in(theirs, -1.0f);
    for (size_t i = 0; i < mine; ++i) out[i] = float(r) + float(i % 1000) * 1e-3f;
    c.send_recv(out.data(), mine * sizeof(float), 21, in.data(), theirs * sizeof(float), 21, partner);
    for (size_t i = 0; i < theirs; i += 997) EXPECT_EQ(in[i], float(partner) + float(i % 1000) * 1e-3f);
    EXPECT_EQ(in.back(), float(partner) + float((theirs - 1) % 1000) * 1e-3f);
  }

  // split: two colors, ordered by descending world rank; rank 0 opts out of a second split.
  auto sub = c.split(r % 2, -r);
  LS_CHECK(sub != nullptr, "split returned no group");
  EXPECT_EQ(sub->size(), t / 2);
  std::vector<int> members(sub->size());
  sub->all_gather_n(&r, members.data(), 1);
  for (int k = 0; k < sub->size(); ++k) EXPECT_EQ(members[k], (t - 2 + r % 2) - 2 * k);
  auto opt = c.split(r == 0 ? -1 : 0, r);
  EXPECT_EQ(opt == nullptr, r == 0);
  if (opt) {
    EXPECT_EQ(opt->size(), t - 1);
  }
  c.barrier();
}

// Checks, on comm, every canonical collective against the single-rank tree on data all
// ranks generate from the same seed.
inline void check_canonical_on(Communicator& c, uint64_t seed) {
  const int t = c.size(), r = c.rank();
  const int per = kTMax / t;
  SCOPED_TRACE("T=" + std::to_string(t) + " rank " + std::to_string(r));

  // all-reduce: small n (one all-gather) and large odd n (all-to-all + all-gather).
  for (int64_t n : {int64_t{3}, int64_t{100}, int64_t{5003}}) {
    auto ch = spread_values(seed + n, 8 * n);
    std::vector<float> ref(n), mine(n);
    for (int64_t i = 0; i < n; ++i) {
      float leaves[8];
      for (int k = 0; k < 8; ++k) leaves[k] = ch[k * n + i];
      ref[i] = tree8(leaves);
      mine[i] = pairwise_tree(leaves + r * per, per);
    }
    canonical_all_reduce(c, mine.data(), n);
    EXPECT_TRUE(same_bits(mine.data(), ref.data(), n)) << "canonical_all_reduce n=" << n;
  }

  // reduce-scatter (SP): rows not a multiple of 8, and a multiple.
  for (int64_t rows : {int64_t{37}, int64_t{64}, int64_t{3}}) {
    const int64_t len = 33, n = rows * len;
    auto ch = spread_values(seed + 7 * rows, 8 * n);
    std::vector<float> ref(n), mine(n);
    for (int64_t i = 0; i < n; ++i) {
      float leaves[8];
      for (int k = 0; k < 8; ++k) leaves[k] = ch[k * n + i];
      ref[i] = tree8(leaves);
      mine[i] = pairwise_tree(leaves + r * per, per);
    }
    RowRange rr = sp_row_range(rows, t, r);
    std::vector<float> out(rr.size() * len + 1);
    canonical_reduce_scatter(c, mine.data(), rows, len, out.data());
    EXPECT_TRUE(same_bits(out.data(), ref.data() + rr.begin * len, rr.size() * len))
        << "canonical_reduce_scatter rows=" << rows;

    // ... and the SP all-gather puts the rows back in order.
    std::vector<float> full(n, -1.0f);
    sp_all_gather(c, out.data(), rows, len, full.data());
    EXPECT_TRUE(same_bits(full.data(), ref.data(), n)) << "sp_all_gather rows=" << rows;
  }

  // Vocab-parallel (max, sumexp): 8 chunks of 5 logits; row 0's last 2 chunks are all
  // padding (-inf), row 1 has a partly padded last chunk.
  {
    const int64_t n = 64, chunk = 5;
    const float inf = std::numeric_limits<float>::infinity();
    auto logits = spread_values(seed + 99, n * 8 * chunk);
    for (int64_t k = 6 * chunk; k < 8 * chunk; ++k) logits[k] = -inf;
    for (int64_t k = 8 * chunk - 2; k < 8 * chunk; ++k) logits[8 * chunk + k] = -inf;
    std::vector<float> ref_m(n), ref_s(n), m(n), s(n);
    for (int64_t i = 0; i < n; ++i) {
      float cm[8], cs[8];
      for (int k = 0; k < 8; ++k) {
        const float* x = logits.data() + (i * 8 + k) * chunk;
        float mx = -inf, sum = 0.0f;
        for (int j = 0; j < chunk; ++j) mx = std::max(mx, x[j]);
        for (int j = 0; j < chunk && mx != -inf; ++j) sum += std::exp(x[j] - mx);
        cm[k] = mx;
        cs[k] = sum;
      }
      pairwise_maxsum(cm, cs, 8, ref_m[i], ref_s[i]);
      pairwise_maxsum(cm + r * per, cs + r * per, per, m[i], s[i]);
    }
    canonical_all_reduce_maxsum(c, m.data(), s.data(), n);
    EXPECT_TRUE(same_bits(m.data(), ref_m.data(), n)) << "maxsum max";
    EXPECT_TRUE(same_bits(s.data(), ref_s.data(), n)) << "maxsum sum";
    EXPECT_FALSE(std::isnan(s[0]));
  }

  // DP gradients: 16 canonical micro-batches, rank r owns a run of 16/T.
  for (int64_t n : {int64_t{10}, int64_t{5003}}) {
    const int mb = 16, run = mb / t;
    auto g = spread_values(seed + 3 * n, mb * n);
    std::vector<float> ref(n), mine(n);
    for (int64_t i = 0; i < n; ++i) {
      float leaves[16];
      for (int k = 0; k < mb; ++k) leaves[k] = g[k * n + i];
      ref[i] = pairwise_tree(leaves, mb);
      mine[i] = pairwise_tree(leaves + r * run, run);
    }
    std::vector<float> scattered(flat_slice(n, t, r).size() + 1);
    tree_reduce_scatter(c, mine.data(), n, scattered.data());
    EXPECT_TRUE(same_bits(scattered.data(), ref.data() + flat_slice(n, t, r).begin,
                          flat_slice(n, t, r).size()))
        << "tree_reduce_scatter n=" << n;
    tree_all_reduce(c, mine.data(), n);
    EXPECT_TRUE(same_bits(mine.data(), ref.data(), n)) << "tree_all_reduce n=" << n;
  }
}

// check_canonical_on the whole communicator and on its halves, quarters, ...
inline void check_canonical(Communicator& c) {
  check_canonical_on(c, 1234);
  // Sub-communicators: halves (and quarters) of the world, T = size/2, size/4 >= 2.
  for (int parts = 2; c.size() / parts >= 2; parts *= 2) {
    const int width = c.size() / parts;
    auto sub = c.split(c.rank() / width, c.rank());
    LS_CHECK(sub && sub->size() == width, "split into parts of ", width, " failed");
    check_canonical_on(*sub, 777 + parts);
  }
  // Sizes that are not a power of two dividing 8 are refused, on every rank alike.
  if (c.size() >= 4) {
    auto three = c.split(c.rank() < 3 ? 0 : 1, c.rank());
    if (c.rank() < 3) {
      float x = 1.0f;
      EXPECT_THROW(canonical_all_reduce(*three, &x, 1), Error);
    }
  }
}

// Topology groups built by split have the members group_ranks says, in that order.
inline void check_topology_groups(Communicator& c) {
  const int w = c.size(), r = c.rank();
  Topology topo = w == 8 ? Topology::from_world(8, 2, true, 2, 2, 1)   // dp 2, edp 2
                : w == 4 ? Topology::from_world(4, 2, false, 1, 2, 1)  // dp 2, edp 2
                         : Topology::from_world(2, 1, false, 2, 1, 1);
  topo.validate_sizes(w);
  for (GroupKind k : {GroupKind::TP, GroupKind::PP, GroupKind::DP, GroupKind::EP, GroupKind::ETP,
                      GroupKind::EDP, GroupKind::MP}) {
    SCOPED_TRACE(topo.name() + " " + group_kind_name(k));
    auto g = make_group(c, topo, k);
    LS_CHECK(g != nullptr, "make_group returned no group");
    const auto expect = topo.group_ranks(k, r);
    std::vector<int> members(g->size());
    g->all_gather_n(&r, members.data(), 1);
    EXPECT_EQ(members, expect);
  }
}

}  // namespace lockstep::test
