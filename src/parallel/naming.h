// Local <-> global names of layers and experts (docs/parallel.md). A rank holds local
// layers [0, split[pp_rank]) and local experts [0, num_experts / ep); every export, weight
// sync and audit speaks global indices:
//   L_global = L_local + first_layer(pp_rank)
//   E_global = E_local + ep_rank * num_experts / ep
#pragma once
#include <cstdint>
#include <vector>

namespace lockstep {

struct LocalLayer {
  int pp_rank = 0;
  int64_t local = 0;
};
struct LocalExpert {
  int ep_rank = 0;
  int64_t local = 0;
};

// `split` is the per-stage layer count from pipeline_layer_split (parallel/topology.h).
int64_t global_layer(int64_t local, int pp_rank, const std::vector<int64_t>& split);
LocalLayer local_layer(int64_t global, const std::vector<int64_t>& split);

int64_t global_expert(int64_t local, int ep_rank, int64_t num_experts, int ep);
LocalExpert local_expert(int64_t global, int64_t num_experts, int ep);

}  // namespace lockstep
