// The GPU trainer's step (cuda_trainer.h) as a class over a CUDA runner, shared by the
// trainer's sources (cuda_trainer.cu, cuda_train_state.cu). CUDA sources only.
#pragma once
#include <vector>

#include "model/cuda/cuda_layer_backward.h"
#include "model/cuda/cuda_trainer.h"

namespace lockstep::cuda_model {

class CudaTrainer {
 public:
  explicit CudaTrainer(CudaRunner& runner) : r_(runner), c_(runner.config_) {}

  // Refuses, before any allocation, a step whose buffers do not fit the free GPU memory.
  // (`backward`: with the gradients and the backward's scratch; else the forward's alone.)
  // `grads_held`: the gradients' buffers are already allocated (not counted); else those of a
  // step of `micro_batches` (train/train_memory.h).
  void check_memory(int64_t T, int64_t micro_batches, bool backward, bool grads_held) const;

  // Gradients into `grads` (allocated for the model; overwritten), or with a null `upstream`
  // the forward alone: the log-probs go to `scored`.
  void step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy, const UpstreamFn& upstream,
                  DeviceFloats* grads, std::vector<std::vector<float>>* scored = nullptr);

 private:
  template <typename T>
  T* alloc(int64_t n) {
    return arena_.alloc<T>(n);
  }
  BackwardScratch scratch(int64_t T);

  CudaRunner& r_;
  const ModelConfig& c_;
  DeviceArena arena_;
};

// Device tensors in the weights' structure on the host (a tied lm_head shares the embedding's).
ModelWeights download_named(const DeviceFloats& d, const ModelConfig& c, cudaStream_t st);

}  // namespace lockstep::cuda_model
