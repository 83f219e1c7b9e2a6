#include "parallel/parallel_context.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/cpu/elementwise.h"

namespace lockstep {

ParallelContext::ParallelContext(dist::Communicator& w, ShardLayout l) : world(&w), layout(std::move(l)) {
  LS_CHECK(w.size() == layout.topo.world_size(), "topology ", layout.topo.name(), " needs ",
           layout.topo.world_size(), " ranks but the world has ", w.size());
  tp = make_group(w, layout.topo, GroupKind::TP);
  pp = make_group(w, layout.topo, GroupKind::PP);
  dp = make_group(w, layout.topo, GroupKind::DP);
  ep = make_group(w, layout.topo, GroupKind::EP);
  etp = make_group(w, layout.topo, GroupKind::ETP);
}

dist::RowRange ParallelContext::local_rows(int64_t T) const {
  if (!sp()) return {0, T};
  return dist::sp_row_range(T, tp->size(), tp->rank());
}

std::vector<float> ParallelContext::gather_rows(const std::vector<float>& local, int64_t T, int64_t width) const {
  if (!sp()) return local;
  std::vector<float> all(T * width);
  dist::sp_all_gather(*tp, local.data(), T, width, all.data());
  return all;
}

std::vector<float> ParallelContext::reduce_rows(std::vector<float> partials, int64_t T, int64_t width) const {
  if (!sp()) {
    dist::canonical_all_reduce(*tp, partials.data(), T * width);
    return partials;
  }
  std::vector<float> mine(local_rows(T).size() * width);
  dist::canonical_reduce_scatter(*tp, partials.data(), T, width, mine.data());
  return mine;
}

std::vector<float> ParallelContext::embed_rows(const int32_t* tokens, int64_t T, const float* local_table,
                                               int64_t vocab_size, int64_t H) const {
  const dist::RowRange mine = local_rows(T);
  std::vector<float> out(mine.size() * H);
  const int P = tp->size(), me = tp->rank();
  if (P == 1) {
    cpu::embedding(tokens + mine.begin, local_table, out.data(), mine.size(), H);
    return out;
  }
  std::vector<dist::RowRange> vocab(P);
  for (int r = 0; r < P; ++r) vocab[r] = chunk_range(vocab_size, P, r);
  auto owner = [&](int32_t id) {
    for (int r = 0; r < P; ++r)
      if (id >= vocab[r].begin && id < vocab[r].end) return r;
    fail("embedding: token id ", id, " is out of range: the model's vocab_size is ", vocab_size);
  };
  auto rows_of = [&](int r) { return sp() ? dist::sp_row_range(T, P, r) : dist::RowRange{0, T}; };
  // Rank r's rows whose token this rank owns, in row order, go to r; this rank's rows come
  // back from their owners, each owner's in row order.
  std::vector<float> send;
  std::vector<size_t> send_counts(P, 0), recv_counts(P, 0);
  const size_t row_bytes = size_t(H) * sizeof(float);
  for (int r = 0; r < P; ++r)
    for (int64_t t = rows_of(r).begin; t < rows_of(r).end; ++t)
      if (owner(tokens[t]) == me) {
        const float* row = local_table + (tokens[t] - vocab[me].begin) * H;
        send.insert(send.end(), row, row + H);
        send_counts[r] += row_bytes;
      }
  for (int64_t t = mine.begin; t < mine.end; ++t) recv_counts[owner(tokens[t])] += row_bytes;
  std::vector<float> recv(mine.size() * H);
  const auto send_displs = dist::displacements(send_counts), recv_displs = dist::displacements(recv_counts);
  tp->all_to_all_v(send.data(), send_counts, send_displs, recv.data(), recv_counts, recv_displs);
  std::vector<size_t> next(P);
  for (int r = 0; r < P; ++r) next[r] = recv_displs[r] / sizeof(float);
  for (int64_t t = mine.begin; t < mine.end; ++t) {
    const int r = owner(tokens[t]);
    std::copy_n(recv.data() + next[r], H, out.data() + (t - mine.begin) * H);
    next[r] += size_t(H);
  }
  return out;
}

}  // namespace lockstep
