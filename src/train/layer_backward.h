// Backward of one Qwen3-MoE decoder layer from its recomputed intermediates
// (Qwen3Moe::layer_forward with LayerActivations). Orchestration only: the arithmetic is in
// src/kernels/cpu/*_backward.h.
#pragma once
#include <cstdint>
#include <vector>

#include "model/qwen3_moe.h"

namespace lockstep {

// Where one layer's parameter gradients go (fp32, the parameter's shape; overwritten).
struct LayerGradPtrs {
  float* input_norm = nullptr;
  float* post_attention_norm = nullptr;
  float *q_proj = nullptr, *k_proj = nullptr, *v_proj = nullptr, *o_proj = nullptr;
  float *q_norm = nullptr, *k_norm = nullptr;
  float* router = nullptr;                       // MoE layers
  std::vector<float*> expert_gate, expert_up, expert_down;  // MoE layers, per expert
  float *dense_gate = nullptr, *dense_up = nullptr, *dense_down = nullptr;  // dense layers
};

// dx holds d(layer output) [T, H] on entry and d(layer input) on return. `cache` must hold
// this layer's K/V as written by the recompute; x_in is the layer input, acts its internals.
// The micro-batch is `batch` (T tokens, whole sequences); weight gradients reduce over its
// canonical token chunks.
void layer_backward(const Qwen3Moe& model, int64_t layer, const ForwardBatch& batch, KvCache& cache,
                    const float* x_in, const LayerActivations& acts, float* dx, const LayerGradPtrs& grads);

}  // namespace lockstep
