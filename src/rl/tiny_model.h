// The embedded default model: a tiny Qwen3-MoE over the task vocabulary, random init from a
// fixed seed, so `lockstep train` runs with no download.
#pragma once
#include "model/config.h"

namespace lockstep::rl {

// vocab 32 (the task tokens and spare ids), hidden 64, 2 layers, 4 query / 2 KV heads of
// 16, 8 experts of width 64, top-2 with renormalised routing; EOS is the task <eos>.
ModelConfig tiny_task_model_config();

}  // namespace lockstep::rl
