// The trainer's backward on the GPU (bfloat16 recipe), over a CUDA runner's own weights: the
// engine and the trainer share one copy of the model on the device.
//
// One micro-batch is one packed forward of whole sequences, as the CPU's ParallelGrad
// (parallel/parallel_backward.h): the runner's forward (model/layer.h with the runner's op
// set) keeps each layer's input, and all the intermediates of the layers that fit; the head's
// log-probs are the score path's bits (the same GEMM and log-softmax kernels); the backward
// recomputes the other layers from their input with that same op set, then runs each layer's
// backward sequence with the CUDA backward op set
// (kernels/cuda/backward.h). Weight gradients reduce over the canonical token chunks
// (docs/numerics.md, rules 8-10); nothing depends on a tile or a launch shape.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "model/runner.h"
#include "parallel/parallel_backward.h"
#include "train/optimizer.h"
#include "train/train_memory.h"

namespace lockstep {

// Gradients (fp32, in the structure of the weights) of one micro-batch of `sequences` (each at
// least 2 tokens) through the CUDA runner `runner` (make_cuda_runner). `upstream` is called
// once (micro-batch 0) with each sequence's log-probs (and entropies when `want_entropy`) and
// returns d objective / d logp (and d entropy) per predicted token, as for ParallelGrad.
// recompute_num_layers: the first that many layers are recomputed in the backward, the others
// keep their forward's intermediates; -1 (kRecomputeAuto): as few as the free memory allows,
// chosen per step (train/train_memory.h). The same bits either way.
ModelWeights cuda_step_grads(ModelRunner& runner, const std::vector<std::vector<int32_t>>& sequences, bool want_entropy,
                             const UpstreamFn& upstream, int64_t recompute_num_layers = kRecomputeAuto);

// Refuses (naming the bytes it needs and the bytes free) a training micro-batch of `tokens`
// tokens, in steps of `micro_batches`, that would not fit the GPU's free memory beside the
// weights and optimizer state already there (train/train_memory.h); run before the first step.
void cuda_check_step_memory(ModelRunner& runner, int64_t tokens, int64_t micro_batches,
                            int64_t recompute_num_layers = kRecomputeAuto);

// Per-token log-probs of whole sequences (at least 2 tokens each) by the trainer's forward, in
// steps of at most max_batch_tokens tokens: the bits of runner_score_sequences on the same
// runner, without touching the rollout engine's KV cache (the trainer has its own pages).
std::vector<std::vector<float>> cuda_score_sequences(ModelRunner& runner,
                                                     const std::vector<std::vector<int32_t>>& sequences,
                                                     int64_t max_batch_tokens = 8192);

// The GPU trainer's state for `train --device cuda`: gradients accumulated over micro-batches
// and AdamW's fp32 masters and moments, on the device in the runner's layout. A step updates
// the runner's weights in place (the bf16 cast written by the update kernel): no host round
// trip. The arithmetic is the host AdamW's (train/optimizer.h) operation for operation, so the
// same gradients give the same bits; the global norm is the canonical one.
class CudaTrainState {
 public:
  // Uploads `optimizer`'s state (fresh: the masters are the weights; or a checkpoint's).
  // recompute_num_layers as for cuda_step_grads.
  CudaTrainState(ModelRunner& runner, const OptimizerConfig& config, const AdamW& optimizer,
                 int64_t recompute_num_layers = kRecomputeAuto);
  // A checkpoint's state (optimizer.safetensors over a model of `like`'s structure), read and
  // uploaded tensor by tensor: one tensor on the host at a time, not 12 bytes a parameter.
  CudaTrainState(ModelRunner& runner, const OptimizerConfig& config, const std::string& optimizer_file,
                 const ModelWeights& like, int64_t recompute_num_layers = kRecomputeAuto);
  // A fresh state made on the device (the bfloat16 recipe): the masters are the runner's
  // weights widened, the moments zero, no step taken: what uploading AdamW(config, the
  // runner's weights) gives, with no host copy of the model or its 12 bytes a parameter.
  CudaTrainState(ModelRunner& runner, const OptimizerConfig& config, int64_t recompute_num_layers = kRecomputeAuto);
  // Gradients only: compute_grads without the optimizer state (12 bytes a parameter fewer, for
  // measurements of slices that would not fit beside it); apply and download refuse.
  CudaTrainState(ModelRunner& runner, int64_t recompute_num_layers);
  ~CudaTrainState();

  // The gradients of the micro-batches (each one packed forward), summed by the pairwise tree
  // over their index on the device; `upstream` as for cuda_step_grads (micro-batch j).
  void compute_grads(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches, bool want_entropy,
                     const UpstreamFn& upstream);
  // The layers the last compute_grads recomputed (its largest micro-batch's count).
  int64_t recomputed_layers() const;
  // The order the last compute_grads ran its micro-batches in (train_memory.h): batch by
  // batch where that fits, else layer by layer (one gradient buffer). The same bits.
  MicroBatchOrder micro_batch_order() const;
  // Test hook: the order every compute_grads takes (nullopt: chosen by the memory).
  void force_micro_batch_order(std::optional<MicroBatchOrder> order);
  // The last compute_grads' gradients on the host, in the weights' structure.
  ModelWeights gradients() const;
  // Test hook: poisons the first gradient element of the first tensor by name.
  void poison_first_gradient();
  // The norm, the finiteness check (naming the first bad tensor, state untouched) and AdamW of
  // the last compute_grads; the runner's weights are the new ones on return.
  OptimizerStepResult apply(Precision precision);
  // The optimizer state on the host, over a model of `like`'s structure.
  AdamW download(const ModelWeights& like) const;
  // The optimizer state written to `path` as AdamW::save writes it (the same bytes), tensor by
  // tensor: checkpoints without a host copy of the state.
  void save_optimizer(const std::string& path, const ModelWeights& like) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace lockstep
