// The communicators of one rank under a topology, and the tensor-parallel row regions
// (docs/numerics.md, rules 1 and 7): what the model asks for instead of ranks.
#pragma once
#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "dist/deterministic_collectives.h"
#include "parallel/shard_plan.h"
#include "parallel/topology.h"

namespace lockstep {

struct ParallelContext {
  dist::Communicator* world = nullptr;
  ShardLayout layout;
  std::unique_ptr<dist::Communicator> tp, pp, dp, ep, etp;

  // Collective over world: splits it into this rank's groups.
  ParallelContext(dist::Communicator& world, ShardLayout layout);

  bool sp() const { return layout.topo.sp; }
  // Rows of a T-token step this rank holds in the residual stream: its SP rows under
  // sequence parallel, all T otherwise.
  dist::RowRange local_rows(int64_t T) const;

  // Entering a TP region: local rows [R, width] -> all T rows (SP all-gather; a copy
  // without SP).
  std::vector<float> gather_rows(const std::vector<float>& local, int64_t T, int64_t width) const;
  // Leaving a TP region: this rank's canonical subtree partials [T, width] -> the full
  // tree sums of its local rows (SP reduce-scatter, else all-reduce). Bits equal to the
  // single-rank canonical row form.
  std::vector<float> reduce_rows(std::vector<float> partials, int64_t T, int64_t width) const;
  // The vocab-parallel embedding of this rank's rows (local_rows(T)) of `tokens` [T]: the
  // TP rank whose vocab slice (layout.vocab of [vocab_size, H]) holds a token's row sends
  // it (one all-to-all of exact copies, so the bits are the single-rank lookup's).
  // `local_table` is this rank's slice. Collective over TP.
  std::vector<float> embed_rows(const int32_t* tokens, int64_t T, const float* local_table, int64_t vocab_size,
                                int64_t H) const;
};

}  // namespace lockstep
