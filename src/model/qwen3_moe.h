// The Qwen3-MoE model: orchestration only; the arithmetic is in src/kernels. The rollout
// engine and the trainer both call this one forward (DESIGN.md levels D1 and D2).
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/cpu/rope.h"
#include "model/kv_cache.h"
#include "model/weights.h"

namespace lockstep {

// The tokens of one forward step, packed: any mix of sequences, each contributing a run of
// consecutive positions. K/V of every token is written to its page before attention reads.
struct ForwardBatch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<const int32_t*> page_tables;  // per token: its sequence's page list
  int64_t size() const { return int64_t(tokens.size()); }
};

// Values a caller may ask the forward to keep (tests, the trainer's backward).
struct ForwardTrace {
  std::vector<std::vector<float>> layer_inputs;   // residual stream entering each layer [T, H]
  std::vector<std::vector<float>> router_logits;  // per MoE layer [T, E]
  std::vector<float> final_hidden;                // after the final norm [T, H]
};

class Qwen3Moe {
 public:
  Qwen3Moe(ModelWeights weights, Precision precision);

  const ModelConfig& config() const { return weights_.config; }
  Precision precision() const { return precision_; }
  ModelWeights& weights() { return weights_; }
  const ModelWeights& weights() const { return weights_; }

  // Final-norm hidden states [T, H] of every token of the batch.
  std::vector<float> forward(const ForwardBatch& batch, KvCache& cache, ForwardTrace* trace = nullptr) const;
  // fp32 logits [T, V] = hidden . lm_head^T (column form over the vocabulary).
  std::vector<float> logits(const float* hidden, int64_t T) const;

  // One decoder layer in place on the residual stream x [T, H].
  void layer_forward(int64_t layer, float* x, const ForwardBatch& batch, KvCache& cache,
                     std::vector<float>* router_logits) const;
  // Checks token ids and positions before any work.
  void validate(const ForwardBatch& batch) const;

 private:
  bool bf16() const { return precision_ == Precision::bfloat16; }
  void cast(float* x, int64_t n) const;

  ModelWeights weights_;
  Precision precision_;
  cpu::RopeTable rope_;
};

// Per-token log-probs of each sequence scored by one whole-sequence forward (the trainer's
// path): result[i][t] = log p(seq_i[t + 1] | seq_i[<= t]). Sequences are packed into forwards of
// at most `max_batch_tokens` tokens (a whole sequence is never split).
std::vector<std::vector<float>> score_sequences(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs,
                                                int64_t max_batch_tokens = 8192);

}  // namespace lockstep
