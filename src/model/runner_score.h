// Per-token log-probs of whole sequences through any ModelRunner (the trainer's scoring
// path on a runner, as Qwen3Moe::score on the CPU model): the sequences are cut into steps of
// whole sequences (score_steps) and packed by pack_sequences.
#pragma once
#include <cstdint>
#include <vector>

#include "model/runner.h"

namespace lockstep {

// result[i][t] = log p(seqs[i][t + 1] | seqs[i][<= t]); steps of at most max_batch_tokens
// tokens (a sequence is never split).
std::vector<std::vector<float>> runner_score_sequences(ModelRunner& runner,
                                                       const std::vector<std::vector<int32_t>>& seqs,
                                                       int64_t max_batch_tokens = 8192);

}  // namespace lockstep
