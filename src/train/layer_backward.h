// Backward of one Qwen3-MoE decoder layer on the CPU: the layer's backward sequence
// (model/layer.h) with the CPU op set, which every topology and the single rank (the context
// of one rank) run, from the intermediates that Qwen3Moe::layer_forward left in
// LayerActivations. Orchestration only: the arithmetic is in src/kernels/cpu/*_backward.h.
//
// How each dimension keeps the single-rank trees (docs/parallel.md, "Backward"):
//   TP  column-parallel dx (q/k/v, gate/up) is canonical over N: each rank's chunk-run
//       subtree, completed by canonical_all_reduce; weight gradients of a shard are
//       per-row/per-column reductions over tokens, unchanged by the split. Norm and
//       q/k-norm weights are replicated: computed once in the canonical order (q/k-norm on
//       all heads, gathered).
//   SP  each rank's rows are whole canonical token chunks, so token-tree weight gradients
//       (norms, router) are subtrees, completed over the TP group.
//   EP/ETP  expert_parallel_backward.h.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/cpu/reduce_backward.h"
#include "model/qwen3_moe.h"
#include "parallel/expert_parallel_backward.h"

namespace lockstep {

// Where one layer's parameter gradients go: fp32, the shapes of this rank's tensors of the
// layer; each is overwritten.
struct LayerGradPtrs {
  float* input_norm = nullptr;
  float* post_attention_norm = nullptr;
  float *q_proj = nullptr, *k_proj = nullptr, *v_proj = nullptr, *o_proj = nullptr;
  float *q_norm = nullptr, *k_norm = nullptr;
  float* router = nullptr;  // MoE layers
  ExpertGradSlot expert;    // MoE layers: local expert j's gradients per source replica
  float *dense_gate = nullptr, *dense_up = nullptr, *dense_down = nullptr;  // dense layers
};

// dx holds d(layer output) on this rank's rows [R, H] on entry and d(layer input) on
// return. x_in is the layer input and acts its intermediates (layer_forward of x_in, which
// also wrote this layer's K/V to `cache`). Weight gradients reduce over the step's
// canonical token chunks. Collective over the model's TP, EP and ETP groups.
void layer_backward(const Qwen3Moe& model, int64_t local_layer, const ForwardBatch& batch, KvCache& cache,
                    const std::vector<float>& x_in, const LayerActivations& acts, std::vector<float>& dx,
                    const LayerGradPtrs& grads);

// Rows [rows] of a [T, width] array (this rank's rows of an all-rows value).
std::vector<float> slice_rows(const std::vector<float>& full, dist::RowRange rows, int64_t width);

// The token chunks of a T-token stream restricted to this rank's rows (empty elsewhere:
// their partials are exact zeros, so the 8-chunk tree equals the subtree of its chunks).
cpu::TokenChunks local_chunks(int64_t T, dist::RowRange rows);

}  // namespace lockstep
