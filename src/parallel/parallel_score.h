// Entry points of the parallel commands: the topology a command line asks for, checked
// against the model and the checkpoint before any weight is read, and `score` under it.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/sharded.h"
#include "dist/communicator.h"
#include "model/weights.h"
#include "parallel/topology.h"

namespace lockstep {

// The Megatron-style flags (docs/parallel.md).
struct TopologyRequest {
  int tp = 1, pp = 1, ep = 1, etp = 1;
  bool sp = false;
  std::string layer_split;  // "--pipeline-layer-split 1,3"; empty = even
  std::string flag_prefix;  // how errors name the flags: --<flag_prefix>tensor-model-parallel-size ...
  // Whether any flag asks for parallelism.
  bool parallel() const { return tp > 1 || pp > 1 || ep > 1 || etp > 1 || sp || !layer_split.empty(); }
};

struct ResolvedTopology {
  Topology topo;
  std::vector<int64_t> layer_split;
};
// dp = world_size / (tp * pp); validates for cfg (Topology::validate) and the layer split;
// throws lockstep::Error with the validator's message.
ResolvedTopology resolve_topology(const TopologyRequest& req, const ModelConfig& cfg, int world_size);

// Opens the checkpoint to load under `topo`: DIR/<topology name>/ when DIR holds a sharded
// checkpoint written for exactly this topology (read without resharding), else DIR itself
// (Hugging Face or sharded under any topology, resharded by box). Refuses, before any
// work, a checkpoint whose shapes do not match cfg or whose sharding metadata is
// inconsistent (topology invalid for the model, layer split, file count).
std::unique_ptr<CheckpointSource> open_checkpoint_for(const std::string& dir, const ModelConfig& cfg,
                                                      const Topology& topo);
// The checks of open_checkpoint_for on a sharded checkpoint directory's metadata.
void check_sharded_metadata(const std::string& dir, const ModelConfig& cfg);

// `lockstep score` under a topology: collective over world; world rank 0 gets the
// log-probs of every sequence in input order, the other ranks an empty vector.
std::vector<std::vector<float>> parallel_score(dist::Communicator& world, const std::string& model_dir,
                                               const ModelConfig& cfg, const TopologyRequest& req,
                                               Precision precision, const std::vector<std::vector<int32_t>>& seqs,
                                               int64_t max_batch_tokens);

}  // namespace lockstep
