// The parallel topology flags shared by the subcommands (Megatron/miles names).
#pragma once
#include <CLI/CLI.hpp>

#include "parallel/parallel_score.h"

namespace lockstep::cli {

inline void add_topology_flags(CLI::App& sub, TopologyRequest& t) {
  sub.add_option("--tensor-model-parallel-size", t.tp, "tensor parallel size (1, 2, 4, 8)");
  sub.add_flag("--sequence-parallel", t.sp, "split the token dimension across TP ranks outside attention/MLP");
  sub.add_option("--pipeline-model-parallel-size", t.pp, "pipeline stages");
  sub.add_option("--pipeline-layer-split", t.layer_split, "layers per stage, e.g. 1,3 (default: even)");
  sub.add_option("--expert-model-parallel-size", t.ep, "expert parallel size");
  sub.add_option("--expert-tensor-parallel-size", t.etp, "expert tensor parallel size (1, 2, 4, 8)");
}

}  // namespace lockstep::cli
