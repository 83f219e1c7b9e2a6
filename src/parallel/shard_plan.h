// What one rank of a topology holds (docs/parallel.md): its pipeline layers, attention
// heads, experts and the canonical-chunk slices of every split dimension, as a list of
// (global name, box) pieces, and the loader that reads exactly those pieces from any
// checkpoint (Hugging Face or sharded) into local weights.
#pragma once
#include <optional>
#include <vector>

#include "checkpoint/sharded.h"
#include "dist/deterministic_collectives.h"
#include "model/weights.h"
#include "parallel/topology.h"

namespace lockstep {

// Part `part` of `parts` (1, 2, 4 or 8) of a dimension of n split at canonical chunk
// boundaries: chunks [part*8/parts, (part+1)*8/parts) of canonical_chunk(n), clamped to n.
dist::RowRange chunk_range(int64_t n, int parts, int part);

struct ShardLayout {
  Topology topo;
  int rank = 0;
  RankCoords coords;
  std::vector<int64_t> layer_split;
  int64_t first_layer = 0, num_layers = 0;  // this stage's global layers
  bool first_stage = false, last_stage = false;
  int64_t q_head_begin = 0, q_heads = 0;    // attention heads (column-parallel q, row-parallel o)
  int64_t kv_head_begin = 0, kv_heads = 0;  // KV heads (replicated when tp > kv heads)
  int64_t expert_begin = 0, experts = 0;    // EP: this rank's experts
  dist::RowRange vocab;                     // embedding and lm_head rows (vocab-parallel)
  dist::RowRange dense_cols;                // TP slice of intermediate_size (dense layers)
  dist::RowRange expert_cols;               // ETP slice of moe_intermediate_size

  // `topo` must have been validated for `cfg`.
  static ShardLayout make(const ModelConfig& cfg, const Topology& topo, const std::vector<int64_t>& layer_split,
                          int rank);
  // The model config as this rank's KV cache sees it (local layers and KV heads).
  ModelConfig local_cache_config(const ModelConfig& cfg) const;
  // Which part of the names table the rank's weights hold (weights.h).
  ParamScope scope() const { return {first_layer, expert_begin, first_stage, last_stage}; }
};

// A tied lm_head held on the embedding's stage: the rank's lm_head is its embedding tensor.
bool tied_on_one_stage(const ModelConfig& cfg, const ShardLayout& layout);

// Every piece the rank holds, by global name (the embedding is vocab-parallel on the
// first stage, the same slice as lm_head; a tied lm_head is that slice of
// model.embed_tokens.weight).
std::vector<ShardPiece> rank_pieces(const ModelConfig& cfg, const ShardLayout& layout);

// The rank's local weights: config is the global config; layers[i] is global layer
// first_layer + i with sliced tensors, experts[j] is global expert expert_begin + j. Each
// piece is read from `src` (only its box), converted to f32 and, in the bfloat16 recipe,
// rounded to bf16. Shapes are checked against config first, naming the tensor.
ModelWeights load_local_weights(const CheckpointSource& src, const ModelConfig& cfg, const ShardLayout& layout,
                                Precision precision);
// The same from in-memory full weights (tests: ModelWeights::random under a topology).
ModelWeights slice_local_weights(const ModelWeights& full, const ShardLayout& layout);

// Refuses a checkpoint whose tensors do not match `cfg` (missing names, other shapes),
// naming the first offender. Called before any work.
void check_checkpoint_matches(const CheckpointSource& src, const ModelConfig& cfg);

}  // namespace lockstep
