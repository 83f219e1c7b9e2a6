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
  std::vector<float> final_norm_input;            // residual stream entering the final norm [T, H]
};

// One decoder layer's intermediates, as the forward computed them (after each cast), for
// the backward's activation recomputation (src/train/layer_backward.h).
struct LayerActivations {
  std::vector<float> attn_norm_out;  // input_layernorm output [T, H]
  std::vector<float> q_proj, k_proj; // q/k projections before q_norm/k_norm [T, nq*D], [T, nkv*D]
  std::vector<float> q, k, v;        // attention inputs: q/k after norm and rope, v [T, heads*D]
  std::vector<float> attn;           // attention output [T, nq*D]
  std::vector<float> mid;            // residual stream after the attention block [T, H]
  std::vector<float> mlp_norm_out;   // post_attention_layernorm output [T, H]
  std::vector<float> router_logits;  // MoE layers: [T, E]
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
  // With `acts`, the layer's intermediates are copied out too (same kernels, same bits).
  void layer_forward(int64_t layer, float* x, const ForwardBatch& batch, KvCache& cache,
                     std::vector<float>* router_logits, LayerActivations* acts = nullptr) const;
  const cpu::RopeTable& rope_table() const { return rope_; }
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
