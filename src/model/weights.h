// Qwen3-MoE weights by layer, loaded from a Hugging Face checkpoint and named by their
// global (Hugging Face) names.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/config.h"

namespace lockstep {

// The two precision recipes of docs/numerics.md, rule 5.
enum class Precision { float32, bfloat16 };
Precision precision_from_name(const std::string& name);
const char* precision_name(Precision p);

struct ExpertWeights {
  Tensor gate, up, down;  // [I, H], [I, H], [H, I]
};

struct LayerWeights {
  Tensor input_norm, post_attention_norm;  // [H]
  Tensor q_proj, k_proj, v_proj, o_proj;   // [q_dim, H], [kv_dim, H], [kv_dim, H], [H, q_dim]
  Tensor q_norm, k_norm;                   // [head_dim]
  bool is_moe = false;
  Tensor router;                       // [E, H]
  std::vector<ExpertWeights> experts;  // E
  ExpertWeights dense;                 // a dense layer's MLP
};

// All parameters as fp32 tensors on the CPU. In the bfloat16 recipe every value is a bf16
// value (rounded on load when the checkpoint holds wider types).
struct ModelWeights {
  ModelConfig config;
  Tensor embed;  // [V, H]
  Tensor final_norm;
  Tensor lm_head;  // [V, H]; shares storage with embed when tied
  std::vector<LayerWeights> layers;

  // Loads DIR/config.json and the safetensors in DIR; errors name the file and tensor.
  static ModelWeights load(const std::string& dir, Precision precision);
  // Random weights of the given shape (benchmarks, tests); deterministic in `seed`.
  static ModelWeights random(const ModelConfig& config, uint64_t seed, Precision precision);

  // Every parameter by global name, in sorted name order (lm_head omitted when tied).
  std::map<std::string, Tensor*> named();
  std::map<std::string, const Tensor*> named() const;
  // The expected shape of each global name.
  static std::map<std::string, Shape> expected_shapes(const ModelConfig& config);
  ModelWeights clone() const;
};

}  // namespace lockstep
