#include "parallel/naming.h"

#include "core/error.h"
#include "parallel/topology.h"

namespace lockstep {

int64_t global_layer(int64_t local, int pp_rank, const std::vector<int64_t>& split) {
  LS_CHECK(pp_rank >= 0 && pp_rank < static_cast<int>(split.size()), "global_layer: pp rank ",
           pp_rank, " out of range [0, ", split.size(), ")");
  LS_CHECK(local >= 0 && local < split[pp_rank], "global_layer: local layer ", local,
           " out of range [0, ", split[pp_rank], ") of pipeline stage ", pp_rank);
  return first_layer(split, pp_rank) + local;
}

LocalLayer local_layer(int64_t global, const std::vector<int64_t>& split) {
  const int stage = stage_of_layer(split, global);
  return {stage, global - first_layer(split, stage)};
}

int64_t global_expert(int64_t local, int ep_rank, int64_t num_experts, int ep) {
  LS_CHECK(ep >= 1 && num_experts % ep == 0, "global_expert: ", num_experts,
           " experts do not divide over ep=", ep);
  const int64_t per_rank = num_experts / ep;
  LS_CHECK(ep_rank >= 0 && ep_rank < ep, "global_expert: ep rank ", ep_rank, " out of range [0, ",
           ep, ")");
  LS_CHECK(local >= 0 && local < per_rank, "global_expert: local expert ", local,
           " out of range [0, ", per_rank, ")");
  return local + ep_rank * per_rank;
}

LocalExpert local_expert(int64_t global, int64_t num_experts, int ep) {
  LS_CHECK(ep >= 1 && num_experts % ep == 0, "local_expert: ", num_experts,
           " experts do not divide over ep=", ep);
  LS_CHECK(global >= 0 && global < num_experts, "local_expert: expert ", global,
           " out of range [0, ", num_experts, ")");
  const int64_t per_rank = num_experts / ep;
  return {static_cast<int>(global / per_rank), global % per_rank};
}

}  // namespace lockstep
