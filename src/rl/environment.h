// The environments of `lockstep train` rollouts (rl/episode.h): the run's reward after one turn
// (the default), the built-in calculator tool (--rollout-tool calculator) or an environment
// server (--rollout-env-url). See docs/rollout.md, "Multi-turn rollouts".
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "rl/episode.h"
#include "rl/train_config.h"

namespace lockstep::dist {
class Communicator;
}

namespace lockstep::rl {

// The run's environment over `source` (the rollouts' prompt source, or the eval sets of an
// evaluation). `world`: an environment server is asked on rank 0 only and its replies (or its
// error) sent to every rank.
std::unique_ptr<Environment> make_environment(const TrainConfig& config, EpisodeData& source,
                                              dist::Communicator* world);

// The tool definitions (JSON text) a --rollout-tool puts in the prompts' tools block ("": none).
std::vector<std::string> rollout_tool_definitions(const std::string& tool);

// The checks of the multi-turn flags that need no file read (part of validate()).
void validate_environment_options(const TrainConfig& config);

}  // namespace lockstep::rl
