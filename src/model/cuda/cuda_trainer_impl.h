// The GPU trainer's step (cuda_trainer.h) as a class over a CUDA runner, shared by the
// trainer's sources (cuda_trainer.cu, cuda_train_state.cu). CUDA sources only.
#pragma once
#include <algorithm>
#include <vector>

#include "model/cuda/cuda_layer_backward.h"
#include "model/cuda/cuda_trainer.h"
#include "model/qwen3_moe.h"

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
  // The order of a step over `micro_batches` (train_memory.h's micro_batch_order, with
  // `held_bytes` of gradient buffers the caller holds and would free counted as free).
  MicroBatchOrder micro_batch_order_for(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                                        double held_bytes) const;

  // Gradients into `grads` (allocated for the model; overwritten), or with a null `upstream`
  // the forward alone: the log-probs go to `scored`.
  void step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy, const UpstreamFn& upstream,
                  DeviceFloats* grads, std::vector<std::vector<float>>* scored = nullptr);
  // The gradients of `micro_batches` summed by the pairwise tree over their index in the
  // layer-major order (train_memory.h's MicroBatchOrder::layer_major) into `grads`, the same
  // bits as the batch-major tree: every micro-batch's forward and head, then each layer's
  // backward over the micro-batches, each part's tree folded in place as its leaves come
  // (cuda_trainer_layer_major.cu). `upstream` is called with each micro-batch's index.
  void step_grads_layer_major(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches, bool want_entropy,
                              const UpstreamFn& upstream, DeviceFloats* grads);
  // The layers the last step recomputed (at most every layer).
  int64_t last_recomputed_layers() const { return std::min(recomputed_layers_, c_.num_hidden_layers); }

 private:
  // One micro-batch's part of a step, shared by its phases: the packed sequences, their device
  // tables, each layer's input, the final norm's input and output, the residual gradient.
  struct Batch {
    const std::vector<std::vector<int32_t>>* seqs = nullptr;
    PackedSequences packed;
    int64_t T = 0, max_seq_len = 0;
    cuda::ChunkBounds chunks;
    std::vector<int32_t> seq_first;  // host: each sequence's first token, then T
    int32_t *seq_first_d = nullptr, *seq_tokens_d = nullptr;
    bf16_t *x_in = nullptr, *final_in = nullptr, *hidden = nullptr;  // x_in: [layers, T, H]
    float* dx = nullptr;                                             // [T, H]
  };
  // A layer whose forward kept its intermediates (batch-major steps), else all null.
  struct KeptLayer {
    CudaRunner::Workspace* ws = nullptr;
    const cuda::DeviceKvLayer* kv = nullptr;
    const cpu::ExpertRows* sorted_rows = nullptr;
    const int32_t* sorted_pinned = nullptr;
    bool rows_in_order = false;  // the forward placed the expert rows in sorted_rows' order
  };
  // The phases of a step, in order. prepare_batch checks and packs (host only);
  // allocate_batch takes the batch's buffers from the step arena.
  Batch prepare_batch(const std::vector<std::vector<int32_t>>& seqs);
  void allocate_batch(Batch& b);
  // The batch's metadata into the runner's workspace (valid until another batch's upload).
  cuda::DeviceSlots upload(const Batch& b);
  // One layer's K/V pages for the step (`pages` pages), rewritten by every layer.
  cuda::DeviceKvLayer step_kv(int64_t pages);
  // Embedding, layers (each one's input kept; kept_ws/kept_kv: the layers not recomputed run
  // on those buffers), the final norm.
  void forward(Batch& b, const cuda::DeviceSlots& slots, const cuda::DeviceKvLayer& kv,
               std::vector<CudaRunner::Workspace>* kept_ws, std::vector<cuda::DeviceKvLayer>* kept_kv);
  // The head: logits into `logits` ([T, V]), log-probs, and with an upstream its gradients
  // into g_head and g_final_norm and the residual gradient into b.dx, through the scratch `s`.
  // False (nothing written but `scored`; `s` may be null) when scoring.
  bool head(Batch& b, int64_t index, bool want_entropy, const UpstreamFn& upstream, float* logits,
            std::vector<std::vector<float>>* scored, float* g_head, float* g_final_norm, const BackwardScratch* s,
            PhaseClock& clock);
  // Layer l's backward (recomputed from its kept input unless `kept`), b.dx carried down.
  void backward_layer(Batch& b, int64_t l, const cuda::DeviceSlots& slots, CudaRunner::Workspace& train_ws,
                      const cuda::DeviceKvLayer& kv, const DeviceLayerFloats& g, BackwardScratch& s, PhaseClock& clock,
                      const KeptLayer& kept);
  // The embedding's gradient from b.dx (a tied head's part g_head added).
  void embedding_backward(const Batch& b, float* g_embed, const float* g_head, PhaseClock& clock);
  // The runner's workspace with buffers of the step's own for what a recomputed layer's
  // backward reads (mid, the MLP input, the attention's log-sum-exp).
  CudaRunner::Workspace train_workspace(int64_t T);

  template <typename T>
  T* alloc(int64_t n) {
    return r_.step_arena_.alloc<T>(n);
  }
  BackwardScratch scratch(int64_t T);
  // check_memory with `recomputed` layers recomputed, in `order`.
  void check_fits(int64_t T, int64_t micro_batches, int64_t recomputed, bool backward, bool grads_held,
                  MicroBatchOrder order = MicroBatchOrder::batch_major) const;
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
