#include "model/weights.h"

#include <cstring>
#include <filesystem>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/philox.h"
#include "core/thread_pool.h"
#include "kernels/cpu/elementwise.h"

namespace lockstep {

Precision precision_from_name(const std::string& name) {
  if (name == "float32") return Precision::float32;
  if (name == "bfloat16") return Precision::bfloat16;
  fail("--dtype: expected 'float32' or 'bfloat16', got '", name, "'");
}

const char* precision_name(Precision p) { return p == Precision::float32 ? "float32" : "bfloat16"; }

std::string param_name(const ModelConfig& c, const ParamSlot& slot) {
  using K = ParamKind;
  const std::string layer = "model.layers." + std::to_string(slot.layer) + ".";
  const std::string expert = layer + "mlp.experts." + std::to_string(slot.expert) + ".";
  switch (slot.kind) {
    case K::embed: return "model.embed_tokens.weight";
    case K::final_norm: return "model.norm.weight";
    case K::lm_head: return c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
    case K::input_norm: return layer + "input_layernorm.weight";
    case K::post_attention_norm: return layer + "post_attention_layernorm.weight";
    case K::q_proj: return layer + "self_attn.q_proj.weight";
    case K::k_proj: return layer + "self_attn.k_proj.weight";
    case K::v_proj: return layer + "self_attn.v_proj.weight";
    case K::o_proj: return layer + "self_attn.o_proj.weight";
    case K::q_norm: return layer + "self_attn.q_norm.weight";
    case K::k_norm: return layer + "self_attn.k_norm.weight";
    case K::router: return layer + "mlp.gate.weight";
    case K::expert_gate: return expert + "gate_proj.weight";
    case K::expert_up: return expert + "up_proj.weight";
    case K::expert_down: return expert + "down_proj.weight";
    case K::dense_gate: return layer + "mlp.gate_proj.weight";
    case K::dense_up: return layer + "mlp.up_proj.weight";
    case K::dense_down: return layer + "mlp.down_proj.weight";
  }
  fail("param_name: unknown parameter kind");
}

Shape param_shape(const ModelConfig& c, ParamKind kind) {
  using K = ParamKind;
  const int64_t H = c.hidden_size;
  switch (kind) {
    case K::embed:
    case K::lm_head: return {c.vocab_size, H};
    case K::final_norm:
    case K::input_norm:
    case K::post_attention_norm: return {H};
    case K::q_proj: return {c.q_dim(), H};
    case K::k_proj:
    case K::v_proj: return {c.kv_dim(), H};
    case K::o_proj: return {H, c.q_dim()};
    case K::q_norm:
    case K::k_norm: return {c.head_dim};
    case K::router: return {c.num_experts, H};
    case K::expert_gate:
    case K::expert_up: return {c.moe_intermediate_size, H};
    case K::expert_down: return {H, c.moe_intermediate_size};
    case K::dense_gate:
    case K::dense_up: return {c.intermediate_size, H};
    case K::dense_down: return {H, c.intermediate_size};
  }
  fail("param_shape: unknown parameter kind");
}

bool param_is_norm(ParamKind kind) {
  using K = ParamKind;
  return kind == K::final_norm || kind == K::input_norm || kind == K::post_attention_norm || kind == K::q_norm ||
         kind == K::k_norm;
}

namespace {

void shape_layers(ModelWeights& w) {
  w.layers.resize(w.config.num_hidden_layers);
  for (int64_t l = 0; l < w.config.num_hidden_layers; ++l) {
    w.layers[l].is_moe = w.config.is_moe_layer(l);
    if (w.layers[l].is_moe) w.layers[l].experts.resize(w.config.num_experts);
  }
}

}  // namespace

std::map<std::string, Shape> ModelWeights::expected_shapes(const ModelConfig& c) {
  ModelWeights skeleton;
  skeleton.config = c;
  shape_layers(skeleton);
  std::map<std::string, Shape> s;
  for_each_param(skeleton, [&](const ParamSlot& slot, Tensor&) { s[param_name(c, slot)] = param_shape(c, slot.kind); });
  return s;
}

std::map<std::string, Tensor*> ModelWeights::named() {
  std::map<std::string, Tensor*> out;
  for_each_param(*this, [&](const ParamSlot& slot, Tensor& t) { out[param_name(config, slot)] = &t; });
  return out;
}

std::map<std::string, const Tensor*> ModelWeights::named() const {
  std::map<std::string, const Tensor*> out;
  for_each_param(*this, [&](const ParamSlot& slot, const Tensor& t) { out[param_name(config, slot)] = &t; });
  return out;
}

ModelWeights ModelWeights::load(const std::string& dir, Precision precision) {
  namespace fs = std::filesystem;
  LS_CHECK(fs::is_directory(dir), dir, ": not a model directory");
  ModelWeights w;
  w.config = ModelConfig::load((fs::path(dir) / "config.json").string());
  shape_layers(w);
  SafetensorsReader reader = SafetensorsReader::open(dir);
  for_each_param(w, [&](const ParamSlot& param, Tensor& slot) {
    slot = reader.get_f32(param_name(w.config, param), param_shape(w.config, param.kind));
    if (precision == Precision::bfloat16) cpu::round_to_bf16(slot.data<float>(), slot.numel());
  });
  if (w.config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

ModelWeights ModelWeights::random(const ModelConfig& config, uint64_t seed, Precision precision) {
  ModelWeights w;
  w.config = config;
  shape_layers(w);
  uint64_t stream = 0;
  for_each_param(w, [&](const ParamSlot& param, Tensor& slot) {
    slot = Tensor::zeros(param_shape(config, param.kind), DType::f32);
    float* p = slot.data<float>();
    const bool is_norm = param_is_norm(param.kind);
    const float scale = is_norm ? 0.2f : 0.04f;
    // Each element is its own Philox counter, so splitting over threads changes no bit; at real
    // sizes (billions of parameters, `lockstep init`) one thread would take minutes.
    cpu_pool().parallel_for(slot.numel(), int64_t(1) << 16, [&, stream](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float u = philox_uniform(seed, stream, uint64_t(i)) * 2.0f - 1.0f;
        p[i] = is_norm ? 1.0f + scale * u : scale * u;
      }
    });
    if (precision == Precision::bfloat16) cpu::round_to_bf16(p, slot.numel());
    ++stream;
  });
  if (config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

ModelWeights ModelWeights::clone() const {
  ModelWeights w;
  w.config = config;
  shape_layers(w);
  auto src = named();
  for_each_param(w, [&](const ParamSlot& param, Tensor& slot) { slot = src.at(param_name(config, param))->clone(); });
  if (config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

ModelWeights ModelWeights::zeros_like() const {
  ModelWeights w;
  w.config = config;
  w.layers.resize(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    w.layers[i].is_moe = layers[i].is_moe;
    w.layers[i].experts.resize(layers[i].experts.size());
  }
  // Shapes from this object's own tensors: a rank's shards have their local shapes.
  auto zeros = [](const Tensor& t) { return t.defined() ? Tensor::zeros(t.shape(), DType::f32) : Tensor(); };
  w.embed = zeros(embed);
  w.final_norm = zeros(final_norm);
  w.lm_head = lm_head.defined() && lm_head.raw() == embed.raw() ? w.embed : zeros(lm_head);
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerWeights& s = layers[i];
    LayerWeights& d = w.layers[i];
    for (auto [dst, src] : {std::pair{&d.input_norm, &s.input_norm},
                            {&d.post_attention_norm, &s.post_attention_norm},
                            {&d.q_proj, &s.q_proj},
                            {&d.k_proj, &s.k_proj},
                            {&d.v_proj, &s.v_proj},
                            {&d.o_proj, &s.o_proj},
                            {&d.q_norm, &s.q_norm},
                            {&d.k_norm, &s.k_norm},
                            {&d.router, &s.router},
                            {&d.dense.gate, &s.dense.gate},
                            {&d.dense.up, &s.dense.up},
                            {&d.dense.down, &s.dense.down}})
      *dst = zeros(*src);
    for (size_t j = 0; j < s.experts.size(); ++j) {
      d.experts[j].gate = zeros(s.experts[j].gate);
      d.experts[j].up = zeros(s.experts[j].up);
      d.experts[j].down = zeros(s.experts[j].down);
    }
  }
  return w;
}

std::map<std::string, Tensor> named_tensors(const ModelWeights& w, const ParamScope& scope) {
  std::map<std::string, Tensor> out;
  for_each_param(
      w, [&](const ParamSlot& slot, const Tensor& t) { out.emplace(param_name(w.config, slot), t); }, scope);
  return out;
}

void copy_from_named(ModelWeights& w, const std::map<std::string, Tensor>& by_name, const ParamScope& scope) {
  for_each_param(
      w,
      [&](const ParamSlot& slot, Tensor& t) {
        const std::string name = param_name(w.config, slot);
        auto it = by_name.find(name);
        LS_CHECK(it != by_name.end(), "no tensor ", name);
        LS_CHECK(it->second.dtype() == DType::f32 && it->second.shape() == t.shape(), "tensor ", name, " has shape ",
                 shape_str(it->second.shape()), ", expected fp32 ", shape_str(t.shape()));
        std::memcpy(t.raw(), it->second.raw(), t.nbytes());
      },
      scope);
}

}  // namespace lockstep
