// The model backward of one optimizer step (docs/numerics.md, D4, rules 8-11), the only one:
// a single rank is the topology of one rank. Gradients of every parameter, each rank holding
// its shard's gradient by global name; at every topology the bits of one rank.
//
// A micro-batch is ONE packed forward of its whole sequences (pack_sequences). Weight
// gradients reduce over its token stream by the canonical token-chunk tree, and over
// micro-batches by the pairwise micro-batch tree (train/grad_accumulate.h). Each layer is
// recomputed from its saved input by the forward's own layer_forward, then runs the one
// layer backward (train/layer_backward.h, which says how TP, SP, EP and ETP keep the
// single-rank trees). The bfloat16 recipe's cast points are straight-through. A tied
// embedding's gradient is its lookup part plus its lm_head part, added in that order.
//
// Across micro-batches and stages:
//   EP  an expert's gradient is the token-chunk tree of each source micro-batch: the owner
//       receives (token position, micro-batch) with every row and sorts them.
//   PP  the 1F1B schedule: stage s runs pp - s - 1 warm-up forwards, then alternates one
//       forward and one backward, then drains; at most pp - s micro-batches are in flight
//       on stage s. Backwards run in micro-batch order, so the gradient trees (and every
//       number) are those of any other schedule.
//   DP  the micro-batch pairwise tree completed across replicas (tree_all_reduce).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/qwen3_moe.h"

namespace lockstep {

// Upstream gradients of one sequence, one value per predicted token (n - 1):
// d objective / d logp[t] and, optionally (empty = none), d objective / d entropy[t].
struct SequenceGradInput {
  std::vector<float> dlogp;
  std::vector<float> dentropy;
};

// What the last stage's loss needs from one micro-batch's forward, and what it returns:
// `logprobs`/`entropy` per sequence (entropy empty unless asked for); the result is the
// upstream gradient per sequence. Called on every last-stage rank with the same values.
using UpstreamFn =
    std::function<std::vector<SequenceGradInput>(int64_t micro_batch, const std::vector<std::vector<float>>& logprobs,
                                                 const std::vector<std::vector<float>>& entropy)>;

// The upstream of loss = sum over sequences of the mean next-token NLL: d loss / d logp =
// -1 / (n - 1) for each sequence's n - 1 log-probs (`lockstep grad`, its tests and benches).
std::vector<SequenceGradInput> mean_nll_upstream(const std::vector<std::vector<float>>& logprobs);

class ParallelGrad {
 public:
  // Collective over the model's world (splits the expert-data-parallel group).
  explicit ParallelGrad(const Qwen3Moe& model);

  // Gradients of one optimizer step: micro_batches[j] are this DP replica's micro-batches
  // (global micro-batch dp_rank * J + j; J equal on every replica and a power of two when
  // dp > 1). Returns this rank's gradients in the structure of its weights (the shapes of
  // its local tensors), complete (every tree finished). Collective over the world.
  ModelWeights step_grads(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches, bool want_entropy,
                          const UpstreamFn& upstream);
  // The most micro-batches whose activations this rank held at once in the last
  // step_grads: min(J, pp - stage) under 1F1B.
  int64_t peak_in_flight() const { return peak_in_flight_; }

 private:
  struct MicroState;
  struct Partial;
  void prepare(MicroState& m, int64_t index) const;
  // This stage's forward of m from its input rows (empty on the first stage); returns its
  // output rows (empty on the last stage, which runs the head and the loss instead).
  std::vector<float> forward(MicroState& m, std::vector<float> x, bool want_entropy, const UpstreamFn& upstream) const;
  // The backward of m from the gradient of its output rows (empty on the last stage);
  // returns the gradient of its input rows (empty on the first stage).
  std::vector<float> backward(MicroState& m, std::vector<float> dy, Partial& g) const;
  void layer_grads(int64_t l, MicroState& m, std::vector<float>& dx, Partial& g) const;
  // Last stage: each token's log-normaliser, and its entropy, from the vocab-slice logits
  // (collective over TP).
  void head_normalizers(MicroState& m) const;
  void head_entropy(MicroState& m) const;
  // Runs forwards and backwards of every micro-batch in the 1F1B order, passing stage
  // boundary tensors between neighbouring stages.
  void run_one_f_one_b(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                       const std::function<std::vector<float>(int64_t, std::vector<float>)>& run_forward,
                       const std::function<std::vector<float>(std::vector<float>)>& run_backward) const;

  const Qwen3Moe& model_;
  std::unique_ptr<dist::Communicator> edp_;
  int64_t peak_in_flight_ = 0;
};

// (global name, local tensor) of every piece this rank holds, in rank_pieces order.
std::vector<std::pair<std::string, Tensor*>> local_named(ModelWeights& local, const ShardLayout& layout);

// Gathers a rank's tensors (`local`, in the structure of its weights: rank_pieces boxes) to
// world rank 0 by global name. Rank 0 gets every full tensor; others an empty map.
std::map<std::string, Tensor> gather_full(dist::Communicator& world, const ModelConfig& cfg, const ShardLayout& layout,
                                          const ModelWeights& local);

// The canonical global gradient norm (optimizer.h) of sharded gradients: per tensor on its
// full value, summed in global-name order. Every rank gets the same float. Collective.
float parallel_grad_norm(dist::Communicator& world, const ModelConfig& cfg, const ShardLayout& layout,
                         const ModelWeights& local);

}  // namespace lockstep
