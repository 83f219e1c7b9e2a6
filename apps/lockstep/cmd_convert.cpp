// lockstep convert: Hugging Face <-> sharded checkpoints (src/checkpoint/sharded.h).
#include <filesystem>
#include <memory>
#include <set>

#include "checkpoint/sharded.h"
#include "command_registry.h"
#include "core/error.h"
#include "core/output_path.h"
#include "model/config.h"
#include "parallel/shard_plan.h"
#include "topology_flags.h"

namespace lockstep::cli {
namespace {

namespace fs = std::filesystem;

struct ConvertOptions {
  std::string input, output, to;
  int dp = 1;
  bool topology_subdir = false;
  TopologyRequest topology;
};

int run_convert(const ConvertOptions& o) {
  LS_CHECK(fs::is_directory(o.input), "--input ", o.input, ": not a checkpoint directory");
  check_output_outside(o.output, o.input, "--output");
  const std::string to = o.to.empty() ? (is_sharded_checkpoint(o.input) ? "hf" : "sharded") : o.to;
  LS_CHECK(to == "hf" || to == "sharded", "--to: expected 'hf' or 'sharded', got '", o.to, "'");
  const ModelConfig cfg = ModelConfig::load(o.input + "/config.json");
  if (to == "hf") {
    auto src = open_checkpoint(o.input);
    check_checkpoint_matches(*src, cfg);
    write_hf_checkpoint(*src, o.output, o.input);
    return 0;
  }
  LS_CHECK(o.dp >= 1, "--data-parallel-size must be >= 1");
  const int world = o.topology.tp * o.topology.pp * o.dp;
  const ResolvedTopology r = resolve_topology(o.topology, cfg, world);  // before reading weights
  auto src = open_checkpoint(o.input);
  check_checkpoint_matches(*src, cfg);
  std::vector<std::vector<ShardPiece>> per_rank(world);
  std::set<std::string> covered;
  for (int rank = 0; rank < world; ++rank) {
    per_rank[rank] = rank_pieces(cfg, ShardLayout::make(cfg, r.topo, r.layer_split, rank));
    for (const auto& p : per_rank[rank]) covered.insert(p.name);
  }
  // Tensors the model does not use (if any) travel whole with rank 0, so nothing is lost.
  for (const std::string& name : src->names())
    if (!covered.count(name)) per_rank[0].push_back({name, full_box(src->shape(name))});
  const std::string out = o.topology_subdir ? (fs::path(o.output) / r.topo.name()).string() : o.output;
  write_sharded_checkpoint(*src, out, r.topo.name(), r.layer_split, per_rank, o.input);
  if (o.topology_subdir) {  // the parent holds the config, so --model DIR finds the subdir
    fs::create_directories(o.output);
    fs::copy_file(fs::path(o.input) / "config.json", fs::path(o.output) / "config.json",
                  fs::copy_options::overwrite_existing);
  }
  return 0;
}

const bool registered = register_command(
    {"convert", "Convert checkpoints between Hugging Face and sharded form", [](CLI::App& sub) {
       auto o = std::make_shared<ConvertOptions>();
       sub.add_option("--input", o->input, "source checkpoint directory (HF or sharded)")->required();
       sub.add_option("--output", o->output, "destination directory")->required();
       sub.add_option("--to", o->to, "hf | sharded (default: the other form of --input)");
       sub.add_option("--data-parallel-size", o->dp, "data-parallel replicas of the sharded topology");
       sub.add_flag("--topology-subdir", o->topology_subdir,
                    "write the shards to OUTPUT/<topology name>/ (loaded by that topology without resharding)");
       add_topology_flags(sub, o->topology);
       return std::function<int()>([o] { return run_convert(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
