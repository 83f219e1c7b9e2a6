// Backward of the MoE block under expert (and expert-tensor) parallelism
// (docs/numerics.md, rule 10). The token owner recomputes the routing and, through the forward's
// own all-to-all, each (token, expert) output, so d(weight) is the single-rank dot; the
// owners of each expert receive the rows, their upstream gradients and, per row, the
// token's position in its source micro-batch. An expert's weight gradient is then the
// token-chunk tree of each source micro-batch on its own (rows sorted by position), so it
// has the bits of one rank whatever the EP/ETP/DP layout; rows of TP replicas (no SP) are
// run for their dx but counted once.
#pragma once
#include <cstdint>
#include <functional>

#include "model/weights.h"
#include "parallel/parallel_context.h"

namespace lockstep {

// Which source micro-batches an expert owner sees: the dp replicas of its EP/ETP block.
struct ExpertSpan {
  int64_t dp_first = 0;  // first DP replica whose tokens reach this rank's experts
  int count = 1;         // how many (a power of two)
};
ExpertSpan expert_span(const ShardLayout& s);

// Where the gradient of local expert j, source replica d (0 <= d < span.count) goes:
// which = 0 gate [cols, H], 1 up [cols, H], 2 down [H, cols]; overwritten.
using ExpertGradSlot = std::function<float*(int64_t j, int d, int which)>;

// h, dout: this rank's rows [R, H] (token positions row_begin.. of a T-token micro-batch)
// of the block input and d(block output). dh [R, H] overwritten with d(input); drouter
// [E, H] overwritten with the token-chunk tree over this rank's rows only (zero elsewhere;
// the caller completes it over SP ranks). Collective over EP and ETP.
void expert_parallel_moe_backward(const ParallelContext& ctx, const LayerWeights& L, const ModelConfig& cfg,
                                  const float* h, const float* dout, int64_t R, int64_t T, int64_t row_begin,
                                  bool bf16, float* dh, float* drouter, const ExpertGradSlot& expert_grad);

}  // namespace lockstep
