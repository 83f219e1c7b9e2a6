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
  double gradients = 0;    // fp32: the micro-batch tree's buffers of the model's gradients
  double tree_levels = 0;  // fp32: the layer-major tree's scratch levels (MicroBatchOrder)
  double logits = 0;       // the step's fp32 logits (their gradient in place)
  double activations = 0;  // kept layer inputs, one layer's recomputed intermediates, scratch, and
                           // the intermediates of the layers not recomputed
  double total() const { return weights + optimizer + gradients + tree_levels + logits + activations; }
  // What a step allocates beside the weights and the optimizer state (the gradients too unless
  // they are already held).
  double step_bytes(bool gradients_held) const {
    return logits + (gradients_held ? 0 : gradients) + tree_levels + activations;
  }
};

// Whether a kept MoE layer keeps its experts' input rows, gathered once in the forward: the
// [gate | up] GEMM then reads them contiguously (by TMA) and the backward reads them in place
// instead of gathering them again (a recomputed layer's backward gathers them before its GEMM).
// The same bits either way; 268 MB more a kept layer at 8192 tokens (kept_layer_bytes counts
// them when on). Off: the 8-layer step measured 12 ms slower with it on the H100 (the grouped
// TMA column form on these rows; notes/gpu-trainer.md, session 23).
void set_keep_expert_input_rows(bool on);
bool keep_expert_input_rows();
// Whether the attention backward keeps its dS tiles (bf16) for dq instead of recomputing S and
// dP there (cuda::AttentionDsScratch): the same bits; the step's scratch grows by
// attention_ds_scratch_bytes. On by default: the 8-layer step 1.8 ms faster on the H100
// (notes/gpu-trainer.md, session 23).
void set_keep_attention_ds(bool on);
bool keep_attention_ds();
// The dS scratch of a micro-batch of `tokens` tokens: one sequence's tiles (a 64 x 64 bf16
// tile for each query tile and key tile at or before it, for every head), at most 1 GiB
// (longer micro-batches recompute dS in the dq kernel).
double attention_ds_scratch_bytes(const ModelConfig& c, int64_t tokens);

// --recompute-num-layers' default: as few layers recomputed as the free memory allows.
constexpr int64_t kRecomputeAuto = -1;
// A recomputed-layer count meaning every layer.
constexpr int64_t kRecomputeAll = int64_t(1) << 40;

// How the GPU trainer runs a step of several micro-batches; the gradients have the same bits
// either way (the same tree over micro-batches, rule 8 of docs/numerics.md).
enum class MicroBatchOrder {
  // Each micro-batch's forward and backward in turn, its gradients a leaf of the tree held
  // whole: log2(M) + 1 buffers of the model's gradients.
  batch_major,
  // Every micro-batch's forward and head first, then each layer's backward over the
  // micro-batches, its tree folded as the leaves come: one buffer of the model's gradients and
  // log2(M) of a layer's (or the head's); each micro-batch keeps its layer inputs and residual
  // gradient, and every layer is recomputed.
  layer_major,
};

// `tokens`: one micro-batch's packed tokens (the largest); `micro_batches`: per optimizer step
// (a power of two); `recomputed_layers`: the first that many layers (a count >= 0;
// kRecomputeAll: every one) are recomputed in the backward, the others keep their forward's
// intermediates (batch_major only: layer_major recomputes every layer).
TrainMemory cuda_train_memory(const ModelConfig& c, int64_t tokens, int64_t micro_batches,
                              int64_t recomputed_layers = kRecomputeAll,
                              MicroBatchOrder order = MicroBatchOrder::batch_major);

// The order a step of `micro_batches` micro-batches (of at most `tokens` tokens) takes:
// batch_major for one micro-batch, a tied lm_head (its gradient joins the embedding's per
// micro-batch), or where the batch-major step with every layer recomputed fits
// `available_bytes` less the headroom (recomputed_layer_count's); else layer_major.
MicroBatchOrder micro_batch_order(const ModelConfig& c, int64_t tokens, int64_t micro_batches, bool gradients_held,
                                  double available_bytes);

// Floats of the largest unit the layer-major tree folds at once: a layer's gradients, the
// head's (lm_head and the final norm) or the embedding's.
double largest_gradient_unit(const ModelConfig& c);

// Refuses (naming --recompute-num-layers) a value below -1, or any but -1 off the GPU: the CPU
// trainer recomputes every layer.
void check_recompute_num_layers(int64_t recompute_num_layers, bool on_cuda);

// Layers whose intermediates the forward keeps: those after the first recomputed_layers.
int64_t kept_layer_count(const ModelConfig& c, int64_t recomputed_layers);

// The layers a step recomputes for --recompute-num-layers `recompute_num_layers`: the count
// given (at most every layer), or with kRecomputeAuto the fewest whose step (step_bytes) fits
// `available_bytes` less a headroom (1 GiB or 3%, the larger), else every layer. Keeping
// a layer changes no bit, only the time and the memory.
int64_t recomputed_layer_count(const ModelConfig& c, int64_t tokens, int64_t micro_batches,
                               int64_t recompute_num_layers, bool gradients_held, double available_bytes);

// Bytes of one kept layer's intermediates at `tokens` tokens (what its backward reads: the
// norms' outputs, q/k/v, q after RoPE, the attention output, the router's logits, choices and
// weights, the experts' [gate | up] rows, SwiGLU and output rows, the rows' order, the layer's
// K/V pages; an MoE layer's, the larger).
double kept_layer_bytes(const ModelConfig& c, int64_t tokens);

// Parameters in the trainer's layout (a tied lm_head counted twice: the runner and the state
// keep a head buffer of their own).
double trainer_parameter_count(const ModelConfig& c);

}  // namespace lockstep
