// Row exchanges of the expert-parallel forward and backward: an all-to-all of unequal row
// blocks, and an all-gather of unequal row blocks, with counts in rows of `width` elements.
#pragma once
#include <cstdint>
#include <vector>

#include "dist/communicator.h"

namespace lockstep::parallel_rows {

// all_to_all_v with counts in rows of `width` elements of T.
template <typename T>
std::vector<T> exchange(dist::Communicator& comm, const std::vector<T>& send, const std::vector<int64_t>& send_n,
                        const std::vector<int64_t>& recv_n, int64_t width) {
  const size_t P = send_n.size();
  std::vector<size_t> sc(P), rc(P);
  for (size_t i = 0; i < P; ++i) {
    sc[i] = size_t(send_n[i] * width) * sizeof(T);
    rc[i] = size_t(recv_n[i] * width) * sizeof(T);
  }
  const auto sd = dist::displacements(sc), rd = dist::displacements(rc);
  int64_t total = 0;
  for (int64_t n : recv_n) total += n;
  std::vector<T> recv(size_t(total * width));
  comm.all_to_all_v(send.data(), sc, sd, recv.data(), rc, rd);
  return recv;
}

// Every member's rows, concatenated in member order (an all-gather of unequal blocks).
template <typename T>
std::vector<T> gather_v(dist::Communicator& comm, const std::vector<T>& mine, const std::vector<int64_t>& counts,
                        int64_t width) {
  const size_t P = counts.size();
  std::vector<size_t> sc(P, mine.size() * sizeof(T)), sd(P, 0), rc(P);
  for (size_t i = 0; i < P; ++i) rc[i] = size_t(counts[i] * width) * sizeof(T);
  const auto rd = dist::displacements(rc);
  int64_t total = 0;
  for (int64_t n : counts) total += n;
  std::vector<T> all(size_t(total * width));
  comm.all_to_all_v(mine.data(), sc, sd, all.data(), rc, rd);
  return all;
}

}  // namespace lockstep::parallel_rows
