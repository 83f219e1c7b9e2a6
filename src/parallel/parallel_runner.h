// The rollout engine's ModelRunner under a parallel topology (docs/numerics.md, D3 + D5): every
// rank runs the same Engine on the same requests (its scheduling is deterministic), so
// page tables and batches agree across ranks; each rank computes its shards of the
// forward (model/qwen3_moe.h), the last stage gathers the sampled rows' fp32 logits to full
// rows (column form, exact) and samples them with the single-rank cpu::sample_row, and
// the results are broadcast so every rank's engine stays in lockstep. Tokens and
// log-probs are therefore the bits of the single-rank CPU runner.
//
// Data parallel: when no forward collective spans DP replicas (expert groups inside one
// replica: ep * etp divides tp), the replicas are independent engines: results stay inside
// each replica, so each may run its own requests (rollout/replica_split.h gives replica r
// its share and gathers the outcomes). When expert parallelism spans replicas (e.g. EP2 on
// 2 ranks of TP1) every replica runs the whole batch in lockstep (replicas() == 1).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "model/runner.h"
#include "model/qwen3_moe.h"
#include "parallel/parallel_score.h"

namespace lockstep {

class ParallelRunner final : public ModelRunner {
 public:
  // Collective over world (splits it into groups). `local` holds this rank's shards
  // (shard_plan.h). `world` must outlive the runner. Every call below is collective.
  ParallelRunner(dist::Communicator& world, const ShardLayout& layout, ModelWeights local, Precision precision);

  const ModelConfig& config() const override { return model_.config(); }
  Device device() const override { return Device::cpu; }
  Precision precision() const override { return model_.precision(); }
  const ShardLayout& layout() const { return model_.context().layout; }

  // This rank's pages: its stage's layers and its KV heads.
  void allocate_kv(int64_t num_pages, int64_t page_size) override;
  // The same SampleResults on every rank.
  std::vector<SampleResult> forward_sample(const ForwardBatch& batch,
                                           const std::vector<SampleRequest>& requests) override;
  // The same log-probs on every rank.
  std::vector<float> forward_logprobs(const ForwardBatch& batch, const std::vector<int32_t>& targets) override;
  // Full weights (identical on every rank) -> this rank's shards.
  void load_weights(const ModelWeights& weights) override;
  // Pieces of global tensors -> the parts of them this rank holds (each piece's intersection
  // with each of its shards); pieces of tensors it does not hold are ignored. Local: ranks
  // may be given different pieces (the weight sync gives each only what its shards need).
  void load_weight_bucket(const std::vector<WeightPiece>& pieces) override;
  // The full weights gathered by global name, on every rank.
  ModelWeights export_weights() const override;

  // Independent replicas (1 when the DP replicas run in lockstep) and this rank's.
  int replicas() const { return replicas_; }
  int replica() const { return replicas_ > 1 ? layout().coords.dp : 0; }
  // Every replica's `blob` (the same on the ranks of one replica) on every rank, in replica
  // order. Collective over the world.
  std::vector<std::string> gather_from_replicas(const std::string& blob) const;

 private:
  // The final-norm hidden states [T, H] of every token on the last stage's ranks (empty
  // elsewhere): the forward through this rank's layers, stage to stage.
  std::vector<float> forward_hidden(const ForwardBatch& batch);
  // Last stage: fp32 logits [rows, V] of the given rows of `hidden`, full rows on every TP
  // rank (each rank's vocab slice by the column form, then all-gathered). Collective over TP.
  std::vector<float> full_logits(const std::vector<float>& hidden, const std::vector<int64_t>& rows) const;
  void check_batch(const ForwardBatch& batch) const;

  Qwen3Moe model_;
  KvCache cache_;
  int replicas_ = 1;
  // Results go from TP rank 0 of the last stage (of this replica when replicas are
  // independent, else of replica 0) to every rank of result_comm_.
  std::unique_ptr<dist::Communicator> replica_comm_;
  dist::Communicator* result_comm_ = nullptr;
  int result_root_ = 0;  // in result_comm_
};

// This rank's runner from full weights (identical on every rank). Collective.
std::unique_ptr<ParallelRunner> make_parallel_runner(dist::Communicator& world, const ResolvedTopology& topo,
                                                     const ModelWeights& full, Precision precision);
// This rank's runner reading only its pieces of a checkpoint (Hugging Face or sharded,
// open_checkpoint_for). Collective.
std::unique_ptr<ParallelRunner> load_parallel_runner(dist::Communicator& world, const std::string& model_dir,
                                                     const ModelConfig& cfg, const ResolvedTopology& topo,
                                                     Precision precision);

}  // namespace lockstep
