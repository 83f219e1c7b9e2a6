// The RL loop of `lockstep train`: one rollout engine and one trainer
// sharing the model's kernels. Per RL step: sample n answers for each prompt, score them,
// compute advantages, check the trainer's log-probs equal the engine's bit for bit, train
// (canonical micro-batches, pairwise gradient tree, AdamW), and load the new weights into
// the engine (bumping its version). Metrics go to OUTPUT_DIR/metrics.jsonl and train.png.
#pragma once
#include <cstdint>

#include "rl/train_config.h"

namespace lockstep::dist {
class Communicator;
}

namespace lockstep::rl {

struct TrainSummary {
  int64_t steps_run = 0;            // RL steps executed by this call
  double first_reward = 0, last_reward = 0;
  double max_abs_diff = 0;          // largest train/train_rollout_logprob_abs_diff seen
  double seconds = 0;
};

// Runs the whole job; throws lockstep::Error on bad input (before any work) or on a failed
// step (non-finite loss or gradient, a true-on-policy mismatch), naming the step.
// With `world` (mpirun ranks, or threads in tests) and more than one rank or a topology flag,
// the trainer runs at that topology (rl/policy.h) and every number of the run
// (metrics, checkpoints) equals the single-rank run's; world rank 0 writes the outputs. The
// rollout engine runs at its own topology over the same ranks (the --rollout-* keys; by
// default a single-rank engine on every rank), and each weight sync streams the trainer's
// shards to the engine's in buckets by global name (parallel/weight_sync.h).
TrainSummary run_training(const TrainConfig& config, dist::Communicator* world = nullptr);

}  // namespace lockstep::rl
