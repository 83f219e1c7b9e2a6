// The trainer side of `lockstep train`, the one interface for every topology and the single
// rank (a world of one): this rank's shards in a Qwen3Moe, the backward by ParallelGrad, a
// sharded AdamW, and the bucketed weight sync of its shards to the rollout engine's own
// topology (parallel/weight_sync.h; the engine is a single-rank engine on every rank or a
// ParallelRunner over the same ranks). Every rank drives the same rollout engine on the
// same seeds, so every rank knows every sample; what only the last stage computes
// (per-sample loss records, log-probs) is broadcast, so every rank takes the same
// decisions and the numbers equal one rank's (docs/numerics.md, D4).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "parallel/parallel_backward.h"
#include "parallel/parallel_score.h"
#include "parallel/weight_sync.h"
#include "train/optimizer.h"

namespace lockstep {
class CudaTrainState;  // model/cuda/cuda_trainer.h
}  // namespace lockstep

namespace lockstep::rl {

class Policy {
 public:
  // Collective over world. `full` is the initial model (identical on every rank), kept as the
  // policy's full weights without a copy. device: the policy will run on a CUDA runner
  // (use_device_runner), so no host model or host optimizer state is made (at 8 layers of
  // Qwen3-30B-A3B those are ~110 GB of host memory).
  Policy(dist::Communicator& world, const ResolvedTopology& topo, ModelWeights full, Precision precision,
         const OptimizerConfig& oc, bool device = false);
  ~Policy();

  bool root() const { return world_.rank() == 0; }

  // From now on the policy runs on `runner`, a CUDA runner that is also the rollout engine's
  // (model/cuda/cuda_trainer.h): one rank, one GPU, the engine's weights. Gradients and the
  // optimizer state live on the device (uploaded from this policy's optimizer or a resumed
  // checkpoint's, else a fresh state made on the device); each step
  // writes the runner's weights in place, so the engine's weight sync is a version bump.
  // recompute_num_layers: the trainer's activation recomputation (cuda_step_grads).
  void use_device_runner(ModelRunner* runner, int64_t recompute_num_layers = -1);
  bool on_device() const { return device_runner_ != nullptr; }
  // On the GPU, how the last compute_grads ran: the layers it recomputed and whether its
  // micro-batches went layer by layer (one gradient buffer; train/train_memory.h).
  struct DeviceStepInfo {
    int64_t recomputed_layers = 0;
    bool layer_major = false;
  };
  DeviceStepInfo device_step_info() const;
  const Topology& topology() const { return layout_.topo; }

  // Per-token log-probs (n - 1 each) of every sequence by the parallel forward, on every rank.
  std::vector<std::vector<float>> score_all(const std::vector<std::vector<int32_t>>& seqs);

  // The loss of sample i (its index in the step's batch) at the last stage, from its full
  // per-token log-probs and entropy: returns the upstream gradient and fills `record` with
  // record_size(i) values that every rank receives afterwards.
  using SampleLoss = std::function<SequenceGradInput(int64_t i, const std::vector<float>& logp,
                                                     const std::vector<float>& entropy, std::vector<double>& record)>;
  // Gradients of one optimizer step over `seqs` cut into `num_microbatches` canonical
  // micro-batches (replica d takes its contiguous run). Returns every sample's record on
  // every rank; the gradients wait for apply(). Collective. Without `want_entropy` the loss
  // gets an empty entropy (no vocabulary-wide entropy pass; the SFT warm start needs none).
  std::vector<std::vector<double>> compute_grads(const std::vector<std::vector<int32_t>>& seqs,
                                                 int64_t num_microbatches, const SampleLoss& loss,
                                                 const std::function<size_t(int64_t)>& record_size,
                                                 bool want_entropy = true);
  // The canonical global norm and the sharded AdamW step of the last compute_grads. A
  // non-finite gradient fails on every rank (naming the tensor where it is held).
  OptimizerStepResult apply(bool inject_nan);

  // Streams the current shards to the engine's layout (this rank's), bucket by bucket, into
  // load_bucket (parallel/weight_sync.h). Collective.
  WeightSyncStats stream_weights(const ShardLayout& engine_layout,
                                 const std::function<void(std::vector<WeightPiece>&&)>& load_bucket,
                                 const WeightSyncOptions& options);
  // The current weights, full, on every rank (gathered by global name, broadcast): only for
  // what needs a whole model on every rank (the KL reference). Collective.
  const ModelWeights& sync_full();
  // The current weights, full, on world rank 0 only (checkpoints); other ranks get the
  // weights of the last sync_full or the initial ones. Collective.
  const ModelWeights& gather_to_root();
  const ModelWeights& full() const { return full_; }
  // What writes the optimizer state to a checkpoint's optimizer.safetensors on world rank 0:
  // the gathered state's save, or on the device the device state's own (tensor by tensor,
  // no host copy). Collective (the gather); the writer is called on rank 0 only.
  std::function<void(const std::string& path)> optimizer_writer();
  // Continues from a checkpoint's optimizer.safetensors (read on every rank), the policy made
  // from that checkpoint's weights: keeps this rank's slices; on the device (called before
  // use_device_runner) the state is read into the device tensor by tensor.
  void load_optimizer(const std::string& optimizer_file);

 private:
  // Device mode: full_ takes the runner's current weights (the host model is not used there).
  void pull_device_weights();
  // The host optimizer state gathered by global name: complete on world rank 0 (a full AdamW
  // over full()), the initial state elsewhere. Collective; host mode only.
  AdamW gather_optimizer();
  // The host model's paths: refused in device mode, which keeps no host model.
  void require_host_model(const char* what) const;

  dist::Communicator& world_;
  ShardLayout layout_;
  Precision precision_;
  OptimizerConfig oc_;
  std::unique_ptr<Qwen3Moe> model_;
  std::unique_ptr<ParallelGrad> grad_;
  AdamW optimizer_;
  std::string resumed_optimizer_;  // device mode: a checkpoint's state file until use_device_runner reads it
  ModelWeights full_;
  ModelWeights grads_;  // of the last compute_grads, in the structure of the rank's weights
  ModelRunner* device_runner_ = nullptr;
  int64_t recompute_num_layers_ = -1;
  std::shared_ptr<CudaTrainState> device_state_;  // shared_ptr: complete only in CUDA builds
};

}  // namespace lockstep::rl
