// Qwen3-MoE weights by layer, loaded from a Hugging Face checkpoint, and the one table of
// their global (Hugging Face) names (for_each_param): loading, saving, sharding, the weight
// sync, audit, gradients and the optimizer state all name tensors through it.
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
  // fp32 zeros of every tensor's shape (the structure of gradients and optimizer states).
  ModelWeights zeros_like() const;
};

// The kinds of parameter of a Qwen3-MoE model.
enum class ParamKind {
  embed,
  final_norm,
  lm_head,
  input_norm,
  post_attention_norm,
  q_proj,
  k_proj,
  v_proj,
  o_proj,
  q_norm,
  k_norm,
  router,  // MoE layers: the router and each expert's MLP
  expert_gate,
  expert_up,
  expert_down,
  dense_gate,  // dense layers: the MLP
  dense_up,
  dense_down,
};

// One entry of the names table: a parameter's kind, its global layer and its global expert
// (-1 where none).
struct ParamSlot {
  ParamKind kind;
  int64_t layer = -1, expert = -1;
};
// The global (Hugging Face) name of a slot; a tied lm_head bears the embedding's name.
std::string param_name(const ModelConfig& config, const ParamSlot& slot);
// The full (unsharded) shape of a slot's tensor.
Shape param_shape(const ModelConfig& config, ParamKind kind);
// Matrices take weight decay; the norm weights do not.
bool param_is_norm(ParamKind kind);

// What part of the model a ModelWeights holds: the whole model, or one rank's pipeline stage
// and experts (ShardLayout::scope()): w.layers[i] is global layer first_layer + i, and
// w.layers[i].experts[j] global expert first_expert + j.
struct ParamScope {
  int64_t first_layer = 0, first_expert = 0;
  bool embed = true;  // holds the embedding (the first stage)
  bool head = true;   // holds the final norm and lm_head (the last stage)
};

// The names table: calls f(slot, tensor) for every parameter slot of `w` in one fixed order
// (the embedding, the final norm, lm_head, then per layer: the two norms, q/k/v/o, q/k-norm,
// then the router and each expert's gate/up/down, or the dense gate/up/down). A tied lm_head
// held with the embedding is that tensor and is not visited twice.
template <typename W, typename F>
void for_each_param(W& w, F&& f, const ParamScope& scope = {}) {
  using K = ParamKind;
  if (scope.embed) f(ParamSlot{K::embed}, w.embed);
  if (scope.head) {
    f(ParamSlot{K::final_norm}, w.final_norm);
    if (!w.config.tie_word_embeddings || !scope.embed) f(ParamSlot{K::lm_head}, w.lm_head);
  }
  for (size_t i = 0; i < w.layers.size(); ++i) {
    auto& L = w.layers[i];
    const int64_t l = scope.first_layer + int64_t(i);
    f(ParamSlot{K::input_norm, l}, L.input_norm);
    f(ParamSlot{K::post_attention_norm, l}, L.post_attention_norm);
    f(ParamSlot{K::q_proj, l}, L.q_proj);
    f(ParamSlot{K::k_proj, l}, L.k_proj);
    f(ParamSlot{K::v_proj, l}, L.v_proj);
    f(ParamSlot{K::o_proj, l}, L.o_proj);
    f(ParamSlot{K::q_norm, l}, L.q_norm);
    f(ParamSlot{K::k_norm, l}, L.k_norm);
    if (L.is_moe) {
      f(ParamSlot{K::router, l}, L.router);
      for (size_t j = 0; j < L.experts.size(); ++j) {
        const int64_t e = scope.first_expert + int64_t(j);
        f(ParamSlot{K::expert_gate, l, e}, L.experts[j].gate);
        f(ParamSlot{K::expert_up, l, e}, L.experts[j].up);
        f(ParamSlot{K::expert_down, l, e}, L.experts[j].down);
      }
    } else {
      f(ParamSlot{K::dense_gate, l}, L.dense.gate);
      f(ParamSlot{K::dense_up, l}, L.dense.up);
      f(ParamSlot{K::dense_down, l}, L.dense.down);
    }
  }
}

// The tensors of the part `scope` of `w` by global name (shared storage, not copies).
std::map<std::string, Tensor> named_tensors(const ModelWeights& w, const ParamScope& scope = {});
// Copies every tensor of the part `scope` of `w` from `by_name` (fp32, the same shapes);
// names the first tensor missing or of another shape.
void copy_from_named(ModelWeights& w, const std::map<std::string, Tensor>& by_name, const ParamScope& scope = {});

}  // namespace lockstep
