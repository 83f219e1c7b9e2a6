#include "dist/deterministic_collectives.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "dist/maxsum.h"
#include "kernels/canonical.h"

namespace lockstep::dist {
namespace {

// Below this many gathered floats one all-gather beats reduce-scatter + all-gather.
constexpr int64_t kSmallGather = 8192;

void check_host(const Communicator& comm, const char* what) {
  LS_CHECK(!comm.device_buffers(), what, ": the ", comm.backend(),
           " communicator takes device buffers; deterministic collectives run on host buffers");
}

void check_tp_size(const Communicator& comm, const char* what) {
  const int t = comm.size();
  LS_CHECK(is_power_of_two(t) && kTMax % t == 0, what, ": communicator size ", t,
           " must be 1, 2, 4 or 8 (a power of two dividing kTMax = ", kTMax,
           ") so ranks own whole subtrees of the canonical 8-chunk tree");
}

void check_dp_size(const Communicator& comm, const char* what) {
  LS_CHECK(is_power_of_two(comm.size()), what, ": communicator size ", comm.size(),
           " must be a power of two so ranks own whole subtrees of the micro-batch tree");
}

// Rank `me` gets, from every rank q, elements [begin[me], begin[me]+count[me]) of q's
// `data` and sums them over q in tree order into out (count[me] floats).
void reduce_slices(Communicator& comm, const float* data, const std::vector<int64_t>& begin,
                   const std::vector<int64_t>& count, float* out) {
  const int t = comm.size();
  const int me = comm.rank();
  const int64_t mine = count[me];
  std::vector<size_t> sc(t), sd(t), rc(t), rd(t);
  for (int q = 0; q < t; ++q) {
    sc[q] = count[q] * sizeof(float);
    sd[q] = begin[q] * sizeof(float);
    rc[q] = mine * sizeof(float);
    rd[q] = q * mine * sizeof(float);
  }
  std::vector<float> recv(static_cast<size_t>(t * mine));
  comm.all_to_all_v(data, sc, sd, recv.data(), rc, rd);
  pairwise_tree_blocks(recv.data(), t, mine);
  if (mine) std::memcpy(out, recv.data(), mine * sizeof(float));
}

// All-reduce by one all-gather and a local tree: fewest steps for small n.
void gather_all_reduce(Communicator& comm, float* inout, int64_t n) {
  const int t = comm.size();
  std::vector<float> all(static_cast<size_t>(t * n));
  comm.all_gather(inout, all.data(), n * sizeof(float));
  pairwise_tree_blocks(all.data(), t, n);
  std::memcpy(inout, all.data(), n * sizeof(float));
}

void tree_all_reduce_impl(Communicator& comm, float* inout, int64_t n) {
  const int t = comm.size();
  if (t == 1 || n == 0) return;
  if (n * t <= kSmallGather) return gather_all_reduce(comm, inout, n);
  // Reduce-scatter (all-to-all of slices, local tree) then all-gather of the sums.
  const int64_t slice = (n + t - 1) / t;
  std::vector<int64_t> begin(t), count(t);
  for (int q = 0; q < t; ++q) {
    RowRange r = flat_slice(n, t, q);
    begin[q] = r.begin;
    count[q] = r.size();
  }
  std::vector<float> mine(static_cast<size_t>(slice), 0.0f);
  reduce_slices(comm, inout, begin, count, mine.data());
  if (slice * t == n) {
    comm.all_gather(mine.data(), inout, slice * sizeof(float));
  } else {
    std::vector<float> all(static_cast<size_t>(slice * t));
    comm.all_gather(mine.data(), all.data(), slice * sizeof(float));
    std::memcpy(inout, all.data(), n * sizeof(float));
  }
}

}  // namespace

void pairwise_tree_blocks(float* blocks, int count, int64_t len) {
  LS_CHECK(is_power_of_two(count), "pairwise_tree_blocks: count ", count, " is not a power of two");
  // Level by level: after the level with stride h, block t (t a multiple of 2h) holds the
  // tree of blocks [t, t+2h); this is exactly pairwise_tree's recursion, elementwise.
  for (int h = 1; h < count; h *= 2) {
    for (int t = 0; t < count; t += 2 * h) {
      float* a = blocks + t * len;
      const float* b = blocks + (t + h) * len;
      for (int64_t i = 0; i < len; ++i) a[i] = a[i] + b[i];
    }
  }
}

RowRange flat_slice(int64_t n, int size, int rank) {
  const int64_t slice = (n + size - 1) / size;
  RowRange r;
  r.begin = std::min(n, rank * slice);
  r.end = std::min(n, (rank + 1) * slice);
  return r;
}

RowRange sp_row_range(int64_t n_rows, int tp_size, int tp_rank) {
  LS_CHECK(is_power_of_two(tp_size) && kTMax % tp_size == 0, "sp_row_range: tp size ", tp_size,
           " must be 1, 2, 4 or 8");
  LS_CHECK(tp_rank >= 0 && tp_rank < tp_size, "sp_row_range: rank ", tp_rank, " out of range [0, ",
           tp_size, ")");
  const int64_t per_rank = canonical_chunk(n_rows) * (kTMax / tp_size);
  RowRange r;
  r.begin = std::min(n_rows, tp_rank * per_rank);
  r.end = std::min(n_rows, (tp_rank + 1) * per_rank);
  return r;
}

void canonical_all_reduce(Communicator& comm, float* partials_inout, int64_t n) {
  check_host(comm, "canonical_all_reduce");
  check_tp_size(comm, "canonical_all_reduce");
  tree_all_reduce_impl(comm, partials_inout, n);
}

void tree_all_reduce(Communicator& comm, float* partials_inout, int64_t n) {
  check_host(comm, "tree_all_reduce");
  check_dp_size(comm, "tree_all_reduce");
  tree_all_reduce_impl(comm, partials_inout, n);
}

void tree_reduce_scatter(Communicator& comm, const float* partials, int64_t n, float* out) {
  check_host(comm, "tree_reduce_scatter");
  check_dp_size(comm, "tree_reduce_scatter");
  const int t = comm.size();
  std::vector<int64_t> begin(t), count(t);
  for (int q = 0; q < t; ++q) {
    RowRange r = flat_slice(n, t, q);
    begin[q] = r.begin;
    count[q] = r.size();
  }
  reduce_slices(comm, partials, begin, count, out);
}

void canonical_reduce_scatter(Communicator& comm, const float* partials, int64_t n_rows,
                              int64_t row_len, float* out) {
  check_host(comm, "canonical_reduce_scatter");
  check_tp_size(comm, "canonical_reduce_scatter");
  const int t = comm.size();
  std::vector<int64_t> begin(t), count(t);
  for (int q = 0; q < t; ++q) {
    RowRange r = sp_row_range(n_rows, t, q);
    begin[q] = r.begin * row_len;
    count[q] = r.size() * row_len;
  }
  reduce_slices(comm, partials, begin, count, out);
}

void sp_all_gather(Communicator& comm, const void* local, int64_t n_rows, size_t row_bytes,
                   void* out) {
  check_host(comm, "sp_all_gather");
  check_tp_size(comm, "sp_all_gather");
  const int t = comm.size();
  const RowRange mine = sp_row_range(n_rows, t, comm.rank());
  if (sp_row_range(n_rows, t, t - 1).size() == mine.size() && mine.size() * t == n_rows) {
    comm.all_gather(local, out, mine.size() * row_bytes);  // every rank has equal rows
    return;
  }
  // Uneven tail: an all-gather-v written as an all-to-all of the same local block.
  std::vector<size_t> sc(t, mine.size() * row_bytes), sd(t, 0), rc(t), rd(t);
  for (int q = 0; q < t; ++q) {
    RowRange r = sp_row_range(n_rows, t, q);
    rc[q] = r.size() * row_bytes;
    rd[q] = r.begin * row_bytes;
  }
  comm.all_to_all_v(local, sc, sd, out, rc, rd);
}

void canonical_all_reduce_maxsum(Communicator& comm, float* max_inout, float* sum_inout,
                                 int64_t n) {
  check_host(comm, "canonical_all_reduce_maxsum");
  check_tp_size(comm, "canonical_all_reduce_maxsum");
  const int t = comm.size();
  if (t == 1 || n == 0) return;
  // One gather of [max..., sum...] per rank, then the tree over ranks, level by level.
  std::vector<float> send(static_cast<size_t>(2 * n));
  std::memcpy(send.data(), max_inout, n * sizeof(float));
  std::memcpy(send.data() + n, sum_inout, n * sizeof(float));
  std::vector<float> all(static_cast<size_t>(2 * n * t));
  comm.all_gather(send.data(), all.data(), 2 * n * sizeof(float));
  for (int h = 1; h < t; h *= 2) {
    for (int q = 0; q < t; q += 2 * h) {
      float* a = all.data() + q * 2 * n;
      const float* b = all.data() + (q + h) * 2 * n;
      for (int64_t i = 0; i < n; ++i) combine_maxsum(a[i], a[n + i], b[i], b[n + i], a[i], a[n + i]);
    }
  }
  std::memcpy(max_inout, all.data(), n * sizeof(float));
  std::memcpy(sum_inout, all.data() + n, n * sizeof(float));
}

}  // namespace lockstep::dist
