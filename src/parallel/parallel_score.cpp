#include "parallel/parallel_score.h"

#include <filesystem>
#include <numeric>

#include "core/error.h"
#include "model/config.h"
#include "model/qwen3_moe.h"
#include "parallel/shard_plan.h"

namespace lockstep {

namespace fs = std::filesystem;

ResolvedTopology resolve_topology(const TopologyRequest& req, const ModelConfig& cfg, int world_size) {
  ResolvedTopology r;
  r.topo = Topology::from_world(world_size, req.tp, req.sp, req.pp, req.ep, req.etp, req.flag_prefix);
  r.topo.validate(cfg, world_size, req.flag_prefix);
  std::optional<std::vector<int64_t>> split;
  if (!req.layer_split.empty()) split = parse_layer_split(req.layer_split);
  r.layer_split = pipeline_layer_split(cfg.num_hidden_layers, req.pp, split);
  return r;
}

void check_sharded_metadata(const std::string& dir, const ModelConfig& cfg) {
  const ShardedInfo info = read_sharded_info(dir);
  const std::string where = (fs::path(dir) / kShardedIndexFile).string();
  Topology written;
  try {
    written = Topology::parse(info.topology);
    written.validate(cfg, written.world_size());
  } catch (const Error& e) {
    fail(where, ": the checkpoint's topology does not fit this model: ", e.what());
  }
  LS_CHECK(info.num_files == written.world_size(), where, ": topology ", info.topology, " has ",
           written.world_size(), " ranks but the checkpoint lists ", info.num_files, " rank files");
  const int64_t layers = std::accumulate(info.layer_split.begin(), info.layer_split.end(), int64_t(0));
  LS_CHECK(int64_t(info.layer_split.size()) == written.pp && layers == cfg.num_hidden_layers, where,
           ": pipeline_layer_split has ", info.layer_split.size(), " stages and ", layers,
           " layers, but topology ", info.topology, " has pp=", written.pp, " and config.json has ",
           cfg.num_hidden_layers, " layers");
}

std::unique_ptr<CheckpointSource> open_checkpoint_for(const std::string& dir, const ModelConfig& cfg,
                                                      const Topology& topo) {
  std::string path = dir;
  const fs::path exact = fs::path(dir) / topo.name();
  if (is_sharded_checkpoint(exact.string())) {
    const ShardedInfo info = read_sharded_info(exact.string());
    LS_CHECK(info.topology == topo.name(), exact.string(), ": this topology directory holds a checkpoint written for ",
             info.topology, ", not ", topo.name(), ": re-run `lockstep convert` for this topology");
    path = exact.string();
  }
  if (is_sharded_checkpoint(path)) check_sharded_metadata(path, cfg);
  auto src = open_checkpoint(path);
  check_checkpoint_matches(*src, cfg);
  return src;
}

std::vector<std::vector<float>> parallel_score(dist::Communicator& world, const std::string& model_dir,
                                               const ModelConfig& cfg, const TopologyRequest& req,
                                               Precision precision, const std::vector<std::vector<int32_t>>& seqs,
                                               int64_t max_batch_tokens) {
  const ResolvedTopology r = resolve_topology(req, cfg, world.size());
  auto src = open_checkpoint_for(model_dir, cfg, r.topo);
  const ShardLayout layout = ShardLayout::make(cfg, r.topo, r.layer_split, world.rank());
  Qwen3Moe model(world, layout, load_local_weights(*src, cfg, layout, precision), precision);
  return model.score(seqs, max_batch_tokens);
}

}  // namespace lockstep
