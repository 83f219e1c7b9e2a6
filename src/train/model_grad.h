// The model backward: the trainer's forward over one micro-batch, and the gradient of a
// per-token objective with respect to every parameter (docs/numerics.md, rules 8-11).
//
// A micro-batch is ONE packed forward: all sequences of a train_forward call, whole and in
// call order, packed into one token stream of T tokens (each sequence on its own contiguous
// run of KV pages, positions 0..n-1). Weight gradients reduce over that stream by the
// canonical token-chunk tree (8 chunks of canonical_chunk(T) tokens), so the same packing
// gives the same bits for any thread count; summing micro-batches is the caller's job
// (train/grad_accumulate.h).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/qwen3_moe.h"

namespace lockstep {

// Upstream gradients of one sequence, one value per predicted token (n - 1):
// d objective / d logp[t] and, optionally (empty = none), d objective / d entropy[t].
struct SequenceGradInput {
  std::vector<float> dlogp;
  std::vector<float> dentropy;
};

// The forward of one micro-batch and what the backward needs from it. Move-only (the batch
// points into the page tables it owns).
struct TrainForward {
  std::vector<std::vector<float>> logprobs;  // per sequence: log p(seq[t+1] | seq[<=t]), n - 1 values
  std::vector<std::vector<float>> entropy;   // per sequence, n - 1 values (when asked for)

  // Saved state: the sequences, packed, and the layer inputs.
  std::vector<std::vector<int32_t>> seqs;
  PackedSequences packed;
  ForwardTrace trace;

  TrainForward() = default;
  TrainForward(TrainForward&&) = default;
  TrainForward& operator=(TrainForward&&) = default;
  TrainForward(const TrainForward&) = delete;
  TrainForward& operator=(const TrainForward&) = delete;
};

// One packed forward of all `seqs` (non-empty, each within max_position_embeddings).
// logprobs are bitwise equal to score_sequences(model, seqs) (the same kernels; D1 makes them
// independent of the packing). With want_entropy, entropy of each predicting position's
// softmax (canonical over the vocabulary).
TrainForward train_forward(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs, bool want_entropy);

// grads[global name] = d(sum over sequences and t of dlogp[t] logp[t] + dentropy[t] entropy[t])
// / d(parameter), fp32 in the parameter's shape, for every parameter of model.weights().named().
// Entries are created if absent and OVERWRITTEN (not accumulated). Recomputes each layer's
// internals from its saved input with the forward's kernels (the same bits), then runs the
// layer backward in reverse. The bfloat16 recipe's cast points are straight-through.
// Tied embeddings: the embedding gradient is (embedding lookup part) + (lm_head part),
// added elementwise in that order.
void backward(const Qwen3Moe& model, const TrainForward& fwd, const std::vector<SequenceGradInput>& upstream,
              std::map<std::string, Tensor>& grads);

}  // namespace lockstep
