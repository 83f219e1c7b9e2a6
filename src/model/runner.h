// The backend-neutral face of the model that the rollout engine and the trainer's scoring
// drive: a CPU runner (this folder) and a CUDA runner (src/model/cuda) implement it. A
// runner owns the weights on its device and the KV page pool; the caller owns page tables.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/sharded.h"
#include "model/qwen3_moe.h"

namespace lockstep {

// How to draw the next token of one row (docs/numerics.md, D5: randomness is keyed by
// (seed, stream, position), never by the batch).
struct SampleRequest {
  int64_t row = 0;           // token index within the ForwardBatch whose logits are sampled
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 0;
  uint64_t stream = 0;       // the request's id
  uint64_t position = 0;     // the position of the token being drawn
  int32_t top_logprobs = 0;  // also report this many most likely tokens (<= kMaxTopLogprobs)
};

// A box of one global tensor (docs/parallel.md) and its values: f32, shape
// box_shape(box). What a bucketed weight sync hands a runner (parallel/weight_sync.h).
struct WeightPiece {
  std::string name;
  Box box;
  Tensor value;
};

// One of the most likely tokens of a row, with its log-prob from the same log-softmax as the
// sampled token's.
struct TopLogprob {
  int32_t token = 0;
  float logprob = 0.0f;
};
constexpr int32_t kMaxTopLogprobs = 20;
// Refuses a top_logprobs count outside [0, kMaxTopLogprobs], naming it.
void check_top_logprobs_count(int32_t n);

// Plain data (a parallel runner broadcasts it as bytes).
struct SampleResult {
  int32_t token = 0;
  float logprob = 0.0f;                  // log softmax(logits / T) at the token (T = 1 when greedy)
  int32_t num_top = 0;                   // entries of `top` filled: the request's top_logprobs
  TopLogprob top[kMaxTopLogprobs] = {};  // by log-prob descending, ties to the lower token id
};

// Draws the token of request `r` from its row of fp32 logits (cpu::sample_row) and fills its
// top log-probs: the host sampling that the CPU and parallel runners share.
SampleResult sample_logits_row(const float* logits, int64_t V, const SampleRequest& r);

class ModelRunner {
 public:
  virtual ~ModelRunner() = default;
  virtual const ModelConfig& config() const = 0;
  virtual Device device() const = 0;
  virtual Precision precision() const = 0;

  // (Re)creates the KV page pool; previous contents are lost.
  virtual void allocate_kv(int64_t num_pages, int64_t page_size) = 0;
  // Runs one step over the batch (writing its K/V) and samples the requested rows.
  virtual std::vector<SampleResult> forward_sample(const ForwardBatch& batch,
                                                   const std::vector<SampleRequest>& requests) = 0;
  // Runs one step and returns log p(targets[t]) for each token t with targets[t] >= 0
  // (NaN where targets[t] < 0), from fp32 logits by the canonical log-softmax.
  virtual std::vector<float> forward_logprobs(const ForwardBatch& batch, const std::vector<int32_t>& targets) = 0;
  // Replaces the weights (same config); used by weight sync.
  virtual void load_weights(const ModelWeights& weights) = 0;
  // Replaces only the given boxes of the given tensors (global names), leaving every other
  // value as it is; used by the bucketed weight sync, one bucket at a time. A runner that
  // holds shards copies the intersection of each piece with what it holds. In the bfloat16
  // recipe the values are rounded to bf16 like load_weights does. The default works for any
  // runner that can export its weights: export, replace, load_weights.
  virtual void load_weight_bucket(const std::vector<WeightPiece>& pieces);
  // A host copy of the weights the runner computes with (for auditing a weight sync).
  virtual ModelWeights export_weights() const;
};

// Copies each piece into the full tensor of its name in `weights`; refuses an unknown name
// or a box outside the tensor's shape (naming both). Returns the names touched.
std::vector<std::string> apply_weight_pieces(ModelWeights& weights, const std::vector<WeightPiece>& pieces);

std::unique_ptr<ModelRunner> make_cpu_runner(ModelWeights weights, Precision precision);
// The CUDA runner when this build has one; throws a clear error otherwise.
std::unique_ptr<ModelRunner> make_runner(Device device, ModelWeights weights, Precision precision);
// make_runner over weights the caller keeps: the CPU runner takes a copy, the CUDA runner only
// uploads them (no host copy: at 8 layers of Qwen3-30B-A3B one is 22 GB).
std::unique_ptr<ModelRunner> make_runner_from(Device device, const ModelWeights& weights, Precision precision);

}  // namespace lockstep
