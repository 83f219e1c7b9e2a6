// Parallel topology (docs/numerics.md and docs/parallel.md): sizes, validation against a model,
// Megatron-Core style rank groups, and the pipeline layer split.
//
// Rank layout (one process per rank):
//   dense parts:  rank = tp_rank + tp * (dp_rank + dp * pp_rank)      (tp fastest, then dp, pp)
//   experts:      inside a pipeline stage, the tp*dp ranks of the stage (local index
//                 i = rank % (tp*dp)) are re-cut as i = etp_rank + etp * (ep_rank + ep * edp_rank)
//                 (etp fastest, then ep, then expert-data-parallel), edp = tp*dp / (ep*etp).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "dist/communicator.h"

namespace lockstep {

struct ModelConfig;

struct RankCoords {
  int tp = 0, pp = 0, dp = 0, ep = 0, etp = 0, edp = 0;
};

enum class GroupKind {
  TP,   // tensor parallel: same pp, dp
  PP,   // pipeline: same tp, dp
  DP,   // data parallel (dense grads): same tp, pp
  EP,   // expert parallel: same pp, etp, edp
  ETP,  // expert tensor parallel: same pp, ep, edp
  EDP,  // expert data parallel (expert grads): same pp, etp, ep
  MP,   // model parallel (tp x pp, one model replica): same dp
};
const char* group_kind_name(GroupKind kind);

struct Topology {
  int tp = 1;
  bool sp = false;
  int pp = 1;
  int ep = 1;
  int etp = 1;
  int dp = 1;

  int world_size() const { return tp * pp * dp; }
  int edp() const { return tp * dp / (ep * etp); }  // valid after validate()

  // "tp2_sp_pp2_ep2_etp1_dp1" (no "_sp" when sp is off).
  std::string name() const;
  // Inverse of name(); throws lockstep::Error on anything else.
  static Topology parse(const std::string& name);
  // dp = world_size / (tp * pp); throws when that does not divide.
  static Topology from_world(int world_size, int tp, bool sp, int pp, int ep, int etp,
                             std::string_view flag_prefix = "");

  // Refuses (throws lockstep::Error saying what to change) a topology that cannot run
  // this model bitwise-canonically on world_size ranks. Call before any work. Messages name
  // the command-line flags as --<flag_prefix><flag> (the rollout engine's are "rollout-").
  void validate(const ModelConfig& cfg, int world_size, std::string_view flag_prefix = "") const;
  // The model-independent part of validate (sizes and their products).
  void validate_sizes(int world_size, std::string_view flag_prefix = "") const;

  RankCoords coords(int rank) const;
  // Global rank of the dense coordinates (tp, dp, pp).
  int rank_of(int tp_rank, int dp_rank, int pp_rank) const;
  // The ranks of `kind`'s group that contains `rank`, in group-rank order (the position
  // of a rank in this list is its rank inside the group communicator).
  std::vector<int> group_ranks(GroupKind kind, int rank) const;
  // Every group of `kind`, each in group-rank order; together they partition the world.
  std::vector<std::vector<int>> all_groups(GroupKind kind) const;
  // (color, key) for Communicator::split: color numbers the group, key is the position.
  std::pair<int, int> group_color_key(GroupKind kind, int rank) const;

  bool operator==(const Topology&) const = default;
};

// Splits `world` (whose ranks are the topology's global ranks) into this rank's group of
// `kind`. Collective over world.
std::unique_ptr<dist::Communicator> make_group(dist::Communicator& world, const Topology& topo,
                                               GroupKind kind);

// Layers per pipeline stage. Without `explicit_split`, an even split with the first
// (num_layers % pp) stages taking one more layer; with it (e.g. parsed from
// `--pipeline-layer-split 1,3`), the given counts, checked: pp entries, each >= 1, summing
// to num_layers.
std::vector<int64_t> pipeline_layer_split(
    int64_t num_layers, int pp, const std::optional<std::vector<int64_t>>& explicit_split = {});
// "1,3" -> {1, 3}.
std::vector<int64_t> parse_layer_split(const std::string& text);
// The first global layer of stage pp_rank, and the stage that owns a global layer.
int64_t first_layer(const std::vector<int64_t>& split, int pp_rank);
int stage_of_layer(const std::vector<int64_t>& split, int64_t global_layer);

}  // namespace lockstep
