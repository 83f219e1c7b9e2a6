// Qwen3-MoE under a parallel topology (DESIGN.md level D3): the same kernels in the same
// order as Qwen3Moe::layer_forward, on this rank's shard of every tensor, with the
// canonical collectives completing each split reduction. Every cast point is applied to
// full values after the cross-rank tree is complete, so every topology gives the bits of
// one rank.
//
// What each dimension does:
//   TP  q/k/v column-parallel by heads (KV heads replicated when tp > kv heads), o_proj and
//       dense down_proj row-parallel (subtree + canonical_all_reduce), lm_head
//       vocab-parallel with the canonical max/sum combine; the embedding vocab-parallel
//       (each row copied from the rank that holds it).
//   SP  the residual stream is split at the canonical token chunks (sp_row_range):
//       all-gather entering attention/MLP, canonical reduce-scatter leaving them.
//   EP  tokens go to their experts' ranks by all-to-all and come back (expert_parallel.h).
//   ETP each expert's intermediate dim split (gate/up columns, down canonical rows).
//   PP  stages hold contiguous layers; the residual stream goes stage to stage (scoring
//       cuts a batch into several steps so that stages overlap).
//   DP  whole sequences split across replicas; results gathered in input order.
#pragma once
#include <cstdint>
#include <vector>

#include "model/kv_cache.h"
#include "model/qwen3_moe.h"
#include "parallel/parallel_context.h"

namespace lockstep {

class ParallelQwen3Moe {
 public:
  // `local` holds this rank's shards (shard_plan.h). Collective over world (it splits it).
  ParallelQwen3Moe(dist::Communicator& world, const ShardLayout& layout, ModelWeights local, Precision precision);

  const ParallelContext& context() const { return ctx_; }
  const ModelConfig& config() const { return local_.config; }
  // This rank's shards (for the backward and the optimizer, parallel_backward.h).
  const ModelWeights& local_weights() const { return local_; }
  ModelWeights& local_weights() { return local_; }
  Precision precision() const { return precision_; }
  const cpu::RopeTable& rope_table() const { return rope_; }

  // Per-token log-probs of each sequence (as score_sequences): collective over the world;
  // the full result on world rank 0, an empty vector elsewhere.
  // Under PP the sequences go through the stages in several steps (a pipelined forward).
  std::vector<std::vector<float>> score(const std::vector<std::vector<int32_t>>& seqs,
                                        int64_t max_batch_tokens = 8192);
  // The forward steps of the last score() call.
  int64_t last_score_steps() const { return last_score_steps_; }

  // One local layer in place on this rank's rows x [R, H] of a T-token batch.
  void layer_forward(int64_t local_layer, std::vector<float>& x, const ForwardBatch& batch, KvCache& cache) const;

 private:
  bool bf16() const { return precision_ == Precision::bfloat16; }
  void cast(float* x, int64_t n) const;
  void attention(const LayerWeights& L, int64_t local_layer, std::vector<float>& x, const ForwardBatch& batch,
                 KvCache& cache) const;
  void mlp(const LayerWeights& L, std::vector<float>& x, int64_t T) const;
  // The last stage: log-probs of each sequence of the batch from this rank's rows.
  std::vector<std::vector<float>> stage_logprobs(const std::vector<float>& x, const ForwardBatch& batch,
                                                 const std::vector<std::vector<int32_t>>& seqs) const;

  ParallelContext ctx_;
  ModelWeights local_;
  Precision precision_;
  cpu::RopeTable rope_;
  int64_t last_score_steps_ = 0;
};

}  // namespace lockstep
