// `lockstep audit` (docs/parallel.md): per-tensor fingerprints (a stable 64-bit hash of
// the stored bytes, shape, dtype, L2 norm) and per-layer summaries of a checkpoint in any
// storage, and the first difference between two checkpoints, by global name.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "checkpoint/sharded.h"

namespace lockstep {

struct TensorAudit {
  std::string name;
  Shape shape;
  DType dtype = DType::f32;
  uint64_t hash = 0;  // FNV-1a 64 of the bytes as stored (little-endian, row-major)
  double norm = 0;    // L2 norm of the values, summed in double in element order
  int64_t non_finite = 0;  // NaN and infinite values (a sound checkpoint has none)
};

// A summary per layer and part: "layer 3 attention", "layer 3 router", "layer 3 experts",
// "layer 3 norms", "layer 3 mlp" (dense), and "embedding", "final_norm", "lm_head".
struct GroupAudit {
  std::string group;
  int64_t tensors = 0;
  uint64_t hash = 0;  // FNV-1a 64 over the member hashes in global-name order
  double norm = 0;    // sqrt of the sum of the members' squared norms
};

struct CheckpointAudit {
  std::string source;
  std::vector<TensorAudit> tensors;  // global-name order (layer and expert numbers numerically)
  std::vector<GroupAudit> groups;
};

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t seed = 0xcbf29ce484222325ull);
// Global-name order: like string order, but runs of digits compare as numbers.
bool global_name_less(const std::string& a, const std::string& b);
// The summary group of a global name.
std::string audit_group(const std::string& name);

CheckpointAudit audit_checkpoint(const CheckpointSource& src);

// The first difference between two audits in global-name order (a tensor missing on one
// side, another shape, dtype or hash), as a sentence naming the tensor; nullopt if none.
std::optional<std::string> first_difference(const CheckpointAudit& a, const CheckpointAudit& b);
// Every summary group whose hash differs (or that exists on one side only).
std::vector<std::string> differing_groups(const CheckpointAudit& a, const CheckpointAudit& b);

// "tensor 'x' holds 3 non-finite values" for each tensor that holds any.
std::vector<std::string> non_finite_tensors(const CheckpointAudit& audit);

std::string audit_text(const CheckpointAudit& audit);
nlohmann::json audit_json(const CheckpointAudit& audit);

}  // namespace lockstep
