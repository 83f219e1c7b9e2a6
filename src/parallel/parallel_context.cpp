#include "parallel/parallel_context.h"

#include "core/error.h"

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

}  // namespace lockstep
