// The MoE block under expert parallelism (docs/numerics.md, rule 4): tokens move to the
// ranks that own their experts (all-to-all over the EP group) and back; under ETP each
// expert's intermediate dimension is split (gate/up column-parallel, down in the canonical
// row form completed over the ETP group). Moving tokens changes no number: each expert's
// MLP is batch invariant and each token's outputs are combined in ascending expert id by
// the same combine_experts as on one rank.
#pragma once
#include <cstdint>

#include "model/weights.h"
#include "parallel/parallel_context.h"

namespace lockstep {

// out[R, H] = the MoE block of rows h[R, H] (this rank's tokens) for local layer weights L;
// the fp32 router logits [R, E] are left in router_logits when given. Collective over the
// EP and ETP groups (every member calls it, with R possibly 0).
void expert_parallel_moe(const ParallelContext& ctx, const LayerWeights& L, const ModelConfig& cfg, const float* h,
                         int64_t R, float* out, bool bf16, float* router_logits = nullptr);

// One expert (or dense) SwiGLU MLP whose intermediate columns [cols] of I are held here as
// `num_chunks` canonical chunks: out[n, H] is this holder's subtree partial of down_proj
// (with all 8 chunks, the full value, before any bf16 rounding of the output).
void swiglu_partial(const float* x, const float* gate_w, const float* up_w, const float* down_w, float* out,
                    int64_t n, int64_t H, int64_t I, int64_t cols, int num_chunks, bool bf16);

}  // namespace lockstep
