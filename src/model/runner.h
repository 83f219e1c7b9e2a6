// The backend-neutral face of the model that the rollout engine and the trainer's scoring
// drive: a CPU runner (this folder) and a CUDA runner (src/model/cuda) implement it. A
// runner owns the weights on its device and the KV page pool; the caller owns page tables.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "model/qwen3_moe.h"

namespace lockstep {

// How to draw the next token of one row (DESIGN.md D5: randomness is keyed by
// (seed, stream, position), never by the batch).
struct SampleRequest {
  int64_t row = 0;           // token index within the ForwardBatch whose logits are sampled
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off
  uint64_t seed = 0;
  uint64_t stream = 0;    // the request's id
  uint64_t position = 0;  // the position of the token being drawn
};

struct SampleResult {
  int32_t token = 0;
  float logprob = 0.0f;  // log softmax(logits / T) at the token (T = 1 when greedy)
};

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
  // A host copy of the weights the runner computes with (for auditing a weight sync).
  virtual ModelWeights export_weights() const;
};

std::unique_ptr<ModelRunner> make_cpu_runner(ModelWeights weights, Precision precision);
// The CUDA runner when this build has one; throws a clear error otherwise.
std::unique_ptr<ModelRunner> make_runner(Device device, ModelWeights weights, Precision precision);

}  // namespace lockstep
