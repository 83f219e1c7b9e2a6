// The GPU trainer's step (cuda_trainer.h) as a class over a CUDA runner, shared by the
// trainer's sources (cuda_trainer.cu, cuda_train_state.cu). CUDA sources only.
#pragma once
#include <algorithm>
#include <vector>

#include "model/cuda/cuda_layer_backward.h"
#include "model/cuda/cuda_trainer.h"

namespace lockstep::cuda_model {

class CudaTrainer {
 public:
  // recompute_num_layers: the first that many layers are recomputed in the backward from
  // their kept input, the others keep the forward's intermediates; kRecomputeAuto: as few as
  // the free memory allows, chosen per step (train/train_memory.h).
  explicit CudaTrainer(CudaRunner& runner, int64_t recompute_num_layers = kRecomputeAuto)
      : r_(runner), c_(runner.config_), recompute_num_layers_(recompute_num_layers) {}

  // The layers a step of T tokens recomputes (`backward`: a training step; else scoring, which
  // keeps nothing); `grads_held` and `micro_batches` as for check_memory.
  int64_t recomputed_layers(int64_t T, int64_t micro_batches, bool backward, bool grads_held) const;

  // Refuses, before any allocation, a step whose buffers do not fit the free GPU memory.
  // (`backward`: with the gradients and the backward's scratch; else the forward's alone.)
  // `grads_held`: the gradients' buffers are already allocated (not counted); else those of a
  // step of `micro_batches` (train/train_memory.h).
  void check_memory(int64_t T, int64_t micro_batches, bool backward, bool grads_held) const;

  // Gradients into `grads` (allocated for the model; overwritten), or with a null `upstream`
  // the forward alone: the log-probs go to `scored`.
  void step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy, const UpstreamFn& upstream,
                  DeviceFloats* grads, std::vector<std::vector<float>>* scored = nullptr);
  // The layers the last step recomputed (at most every layer).
  int64_t last_recomputed_layers() const { return std::min(recomputed_layers_, c_.num_hidden_layers); }

 private:
  template <typename T>
  T* alloc(int64_t n) {
    return r_.step_arena_.alloc<T>(n);
  }
  BackwardScratch scratch(int64_t T);
  // check_memory with `recomputed` layers recomputed.
  void check_fits(int64_t T, int64_t micro_batches, int64_t recomputed, bool backward, bool grads_held) const;
  // The device's free bytes for a step: what cudaMemGetInfo reports plus the step arena's
  // block, which the next step reuses.
  double free_step_bytes() const;

  // Whether layer l is recomputed in this step's backward (else the forward keeps its
  // intermediates).
  bool recomputed(int64_t l) const { return l < recomputed_layers_; }

  CudaRunner& r_;
  const ModelConfig& c_;
  int64_t recompute_num_layers_;               // the flag
  int64_t recomputed_layers_ = kRecomputeAll;  // this step's
};

// Device tensors in the weights' structure on the host (a tied lm_head shares the embedding's).
ModelWeights download_named(const DeviceFloats& d, const ModelConfig& c, cudaStream_t st);

}  // namespace lockstep::cuda_model
