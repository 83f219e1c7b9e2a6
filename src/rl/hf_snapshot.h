// `lockstep train --save-hf DIR`: the policy as a Hugging Face model directory
// (checkpoint/hf_export.h) at DIR/iter_NNNNNNN every --save-hf-interval RL steps and at the end,
// with the run's tokenizer files, for transformers, `lockstep score` or `lockstep generate`;
// write_hf_weights is the same without the step directory (`lockstep init`).
#pragma once
#include <cstdint>
#include <string>

#include "model/weights.h"

namespace lockstep::rl {

// Writes `weights` as a Hugging Face model directory at `dir` (replacing it). The bfloat16
// recipe's weights are stored as BF16 (exact), the float32 recipe's as F32; torch_dtype in
// config.json says which.
void write_hf_weights(const std::string& dir, const ModelWeights& weights, Precision precision,
                      const std::string& tokenizer_dir, int64_t max_shard_bytes = 5'000'000'000);

// write_hf_weights at the snapshot directory of RL step `step`; returns that directory.
std::string save_hf_snapshot(const std::string& save_hf_dir, int64_t step, const ModelWeights& weights,
                             Precision precision, const std::string& tokenizer_dir,
                             int64_t max_shard_bytes = 5'000'000'000);

}  // namespace lockstep::rl
