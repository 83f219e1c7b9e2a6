// Checkpoints of `lockstep train`: DIR/iter_NNNNNNN/ holds
//   model.safetensors + config.json  (HF layout by global name: `lockstep score --model` loads it)
//   optimizer.safetensors            (AdamW fp32 masters, moments and step count)
//   ref_model.safetensors            (the KL reference, when it is the policy at RL start)
//   trainer_state.json               (RL step, SFT steps, data position, seed, weight version)
//   train_config.toml                (the run-defining options)
// and DIR/latest_checkpointed_iteration.txt names the newest. A checkpoint is written to a
// temporary directory and renamed into place, so a failed step never leaves a partial one.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "model/weights.h"
#include "train/optimizer.h"

namespace lockstep::rl {

struct TrainerState {
  int64_t step = 0;            // RL steps completed
  int64_t sft_steps_done = 0;  // SFT warmup optimizer steps completed
  int64_t data_position = 0;   // prompts consumed
  int64_t weight_version = 0;  // the rollout engine's version
  uint64_t seed = 0;           // every random draw is keyed by (seed, step, sample): no stream state
};

std::string checkpoint_dir(const std::string& save_dir, int64_t step);

// write_optimizer(path) writes optimizer.safetensors (AdamW::save's file).
void save_train_checkpoint(const std::string& save_dir, const TrainerState& state, const ModelWeights& model,
                           Precision precision, const std::function<void(const std::string& path)>& write_optimizer,
                           const ModelWeights* ref, const std::string& config_toml);

// The newest checkpoint directory in save_dir ("" when there is none).
std::string latest_train_checkpoint(const std::string& save_dir);

// Before any work, so no run can clobber another: --resume needs a checkpoint in save_dir;
// a fresh run refuses a save_dir that already holds a run unless `overwrite` (which removes
// its checkpoints); the directory is created and proven writable. Returns the checkpoint to
// resume ("" for a fresh run or no save_dir). Only the `writer` (the rank that writes the
// checkpoints) removes, creates and probes.
std::string prepare_save_dir(const std::string& save_dir, bool resume, bool overwrite, bool writer);

// Throws naming the first run-defining option whose value in the checkpoint's
// train_config.toml differs from `config_toml` (this run's), both values shown.
void check_same_run(const std::string& checkpoint, const std::string& config_toml);

TrainerState load_trainer_state(const std::string& checkpoint);
// Loads model.safetensors (or ref_model.safetensors) of a checkpoint into `weights` (same config).
void load_checkpoint_weights(const std::string& file, ModelWeights& weights, Precision precision);

}  // namespace lockstep::rl
