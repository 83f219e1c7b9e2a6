// The Qwen3-MoE model: one definition of the decoder layer (model/layer.h, here with
// the CPU op set; train/layer_backward.h for its backward) over a parallel context. A single
// rank is the context of one rank (topology 1, a SelfCommunicator), so `lockstep score`, the
// rollout engine, the trainer and every parallel form run the same lines; each op's
// arithmetic is in src/kernels.
//
// Under a topology (docs/parallel.md) each rank holds its shards of the tensors
// (shard_plan.h) and the context's collectives complete each split reduction in the
// canonical order (docs/numerics.md, rules 1, 4 and 7), so every topology gives the bits of one
// rank:
//   TP  q/k/v column-parallel by heads (KV heads replicated when tp > kv heads), o_proj and
//       dense down_proj row-parallel (subtree + canonical_all_reduce), lm_head
//       vocab-parallel with the canonical max/sum combine; the embedding vocab-parallel.
//   SP  the residual stream is split at the canonical token chunks (sp_row_range):
//       all-gather entering attention/MLP, canonical reduce-scatter leaving them.
//   EP  tokens go to their experts' ranks by all-to-all and come back (expert_parallel.h).
//   ETP each expert's intermediate dim split (gate/up columns, down canonical rows).
//   PP  stages hold contiguous layers; the residual stream goes stage to stage.
//   DP  whole sequences split across replicas; results gathered in input order.
//
// Shapes: T tokens in a step, R = the rows of the residual stream this rank holds (its SP
// rows, else T), H hidden, D head_dim, E experts; q/k/v widths are this rank's heads.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/cpu/rope.h"
#include "model/kv_cache.h"
#include "model/weights.h"
#include "parallel/parallel_context.h"

namespace lockstep {

// The tokens of one forward step, packed: any mix of sequences, each contributing a run of
// consecutive positions. K/V of every token is written to its page before attention reads.
struct ForwardBatch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<const int32_t*> page_tables;  // per token: its sequence's page list
  int64_t size() const { return int64_t(tokens.size()); }
};

// Sequences packed into one whole-sequence step: each on its own run of pages of kAttnBlock
// positions, positions 0..n-1. Move-only (the batch points into the page tables).
struct PackedSequences {
  std::vector<std::vector<int32_t>> page_tables;
  ForwardBatch batch;
  int32_t num_pages = 1;  // at least one, so an empty step still has a cache

  PackedSequences() = default;
  PackedSequences(PackedSequences&&) = default;
  PackedSequences& operator=(PackedSequences&&) = default;
  PackedSequences(const PackedSequences&) = delete;
  PackedSequences& operator=(const PackedSequences&) = delete;
};
// The only packer of whole sequences for scoring and training (every sequence non-empty).
PackedSequences pack_sequences(const std::vector<std::vector<int32_t>>& seqs);
// Scoring steps over seqs[begin, end): [first, last) runs of whole sequences of at most
// max_batch_tokens tokens each (a longer sequence is a step of its own).
std::vector<std::pair<size_t, size_t>> score_steps(const std::vector<std::vector<int32_t>>& seqs, size_t begin,
                                                   size_t end, int64_t max_batch_tokens);

// Values a caller may ask the forward to keep (tests).
struct ForwardTrace {
  std::vector<std::vector<float>> layer_inputs;   // residual stream entering each layer [R, H]
  std::vector<std::vector<float>> router_logits;  // per MoE layer [R, E]
  std::vector<float> final_hidden;                // after the final norm [R, H]
  std::vector<float> final_norm_input;            // residual stream entering the final norm [R, H]
};

// One decoder layer's intermediates, after each cast, as the forward computed them: its
// working buffers, which the backward's recomputation keeps (src/train/layer_backward.h).
struct LayerActivations {
  std::vector<float> attn_in;         // input_layernorm output, all T rows [T, H]
  std::vector<float> q_proj, k_proj;  // q/k projections before q_norm/k_norm [T, q width], [T, kv width]
  std::vector<float> q, k, v;         // attention inputs: q/k after norm and rope, v
  std::vector<float> attn;            // attention output [T, q width]
  std::vector<float> mid;             // residual stream after the attention block [R, H]
  std::vector<float> mlp_in;          // post_attention_layernorm output [R, H]
  std::vector<float> router_logits;   // MoE layers: [R, E]
};

class Qwen3Moe {
 public:
  // One rank: full weights.
  Qwen3Moe(ModelWeights weights, Precision precision);
  // A rank of a topology: `local` holds this rank's shards (shard_plan.h). Collective over
  // world (it splits it into groups); world must outlive the model.
  Qwen3Moe(dist::Communicator& world, const ShardLayout& layout, ModelWeights local, Precision precision);

  const ModelConfig& config() const { return weights_.config; }
  Precision precision() const { return precision_; }
  bool bf16() const { return precision_ == Precision::bfloat16; }
  // This rank's weights (all of them on one rank).
  ModelWeights& weights() { return weights_; }
  const ModelWeights& weights() const { return weights_; }
  const ParallelContext& context() const { return *ctx_; }
  const cpu::RopeTable& rope_table() const { return rope_; }

  // Final-norm hidden states of this rank's rows [R, H] of a step (no pipeline split).
  std::vector<float> forward(const ForwardBatch& batch, KvCache& cache, ForwardTrace* trace = nullptr) const;
  // fp32 logits [T, V] = hidden . lm_head^T (column form over the vocabulary; one rank).
  std::vector<float> logits(const float* hidden, int64_t T) const;

  // Local layer l in place on this rank's rows x [R, H] of a T-token step; the layer's
  // intermediates are left in `acts` when given (the same kernels, the same bits).
  void layer_forward(int64_t local_layer, std::vector<float>& x, const ForwardBatch& batch, KvCache& cache,
                     LayerActivations* acts = nullptr) const;
  // Checks token ids and positions before any work.
  void validate(const ForwardBatch& batch) const;

  // Per-token log-probs of each sequence by whole-sequence forwards of at most
  // max_batch_tokens tokens (a sequence is never split): result[i][t] = log p(seq_i[t + 1] |
  // seq_i[<= t]). Collective: the full result on world rank 0, an empty vector elsewhere.
  // Under PP the sequences go through the stages in several steps (a pipelined forward).
  std::vector<std::vector<float>> score(const std::vector<std::vector<int32_t>>& seqs,
                                        int64_t max_batch_tokens = 8192) const;
  // The forward steps of the last score() call.
  int64_t last_score_steps() const { return last_score_steps_; }

 private:
  void cast(float* x, int64_t n) const;
  // The last stage: log-probs of each sequence of the step from this rank's rows.
  std::vector<std::vector<float>> stage_logprobs(const std::vector<float>& x, const ForwardBatch& batch,
                                                 const std::vector<std::vector<int32_t>>& seqs) const;

  std::unique_ptr<dist::Communicator> own_world_;  // one rank: the model's own world
  std::unique_ptr<ParallelContext> ctx_;
  ModelWeights weights_;
  Precision precision_;
  cpu::RopeTable rope_;
  mutable int64_t last_score_steps_ = 0;
};

// model.score(seqs, max_batch_tokens): the trainer's scoring path.
std::vector<std::vector<float>> score_sequences(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs,
                                                int64_t max_batch_tokens = 8192);

}  // namespace lockstep
