// The GPU memory of training on one GPU (the CUDA trainer, model/cuda/cuda_trainer.h), by
// part, from the model's shape and a micro-batch's tokens: what the trainer refuses a step by,
// and what docs/train.md's table of what fits is made from. Host arithmetic only.
#pragma once
#include <cstdint>

#include "model/config.h"

namespace lockstep {

struct TrainMemory {
  double weights = 0;      // the runner's bf16 matrices and fp32 norms
  double optimizer = 0;    // AdamW's fp32 masters and two moments
  double gradients = 0;    // fp32, one buffer per level of the micro-batch tree
  double logits = 0;       // the step's fp32 logits (their gradient in place)
  double activations = 0;  // kept layer inputs, one layer's recomputed intermediates, scratch, and
                           // the intermediates of the layers not recomputed
  double total() const { return weights + optimizer + gradients + logits + activations; }
};

// `tokens`: one micro-batch's packed tokens; `micro_batches`: per optimizer step (a power of
// two; the tree keeps log2 of it plus one gradient buffers); `recompute_num_layers`: the first
// that many layers are recomputed in the backward, the others keep their forward's
// intermediates (-1: every layer is recomputed).
TrainMemory cuda_train_memory(const ModelConfig& c, int64_t tokens, int64_t micro_batches,
                              int64_t recompute_num_layers = -1);

// Refuses (naming --recompute-num-layers) a value below -1, or any but -1 off the GPU: the CPU
// trainer recomputes every layer.
void check_recompute_num_layers(int64_t recompute_num_layers, bool on_cuda);

// Layers whose intermediates the forward keeps: those after the first recompute_num_layers
// (-1: none).
int64_t kept_layer_count(const ModelConfig& c, int64_t recompute_num_layers);

// Bytes of one kept layer's intermediates at `tokens` tokens (what its backward reads: the
// norms' outputs, q/k/v, q after RoPE, the attention output, the router's logits, choices and
// weights, the experts' output rows, the layer's K/V pages).
double kept_layer_bytes(const ModelConfig& c, int64_t tokens);

// Parameters in the trainer's layout (a tied lm_head counted twice: the runner and the state
// keep a head buffer of their own).
double trainer_parameter_count(const ModelConfig& c);

}  // namespace lockstep
