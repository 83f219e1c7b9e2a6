#include "model/weights.h"

#include <filesystem>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/philox.h"
#include "kernels/cpu/elementwise.h"

namespace lockstep {

Precision precision_from_name(const std::string& name) {
  if (name == "float32") return Precision::float32;
  if (name == "bfloat16") return Precision::bfloat16;
  fail("--dtype: expected 'float32' or 'bfloat16', got '", name, "'");
}

const char* precision_name(Precision p) { return p == Precision::float32 ? "float32" : "bfloat16"; }

std::map<std::string, Shape> ModelWeights::expected_shapes(const ModelConfig& c) {
  std::map<std::string, Shape> s;
  const int64_t H = c.hidden_size;
  s["model.embed_tokens.weight"] = {c.vocab_size, H};
  s["model.norm.weight"] = {H};
  if (!c.tie_word_embeddings) s["lm_head.weight"] = {c.vocab_size, H};
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    s[p + "input_layernorm.weight"] = {H};
    s[p + "post_attention_layernorm.weight"] = {H};
    s[p + "self_attn.q_proj.weight"] = {c.q_dim(), H};
    s[p + "self_attn.k_proj.weight"] = {c.kv_dim(), H};
    s[p + "self_attn.v_proj.weight"] = {c.kv_dim(), H};
    s[p + "self_attn.o_proj.weight"] = {H, c.q_dim()};
    s[p + "self_attn.q_norm.weight"] = {c.head_dim};
    s[p + "self_attn.k_norm.weight"] = {c.head_dim};
    if (c.is_moe_layer(l)) {
      s[p + "mlp.gate.weight"] = {c.num_experts, H};
      for (int64_t e = 0; e < c.num_experts; ++e) {
        std::string q = p + "mlp.experts." + std::to_string(e) + ".";
        s[q + "gate_proj.weight"] = {c.moe_intermediate_size, H};
        s[q + "up_proj.weight"] = {c.moe_intermediate_size, H};
        s[q + "down_proj.weight"] = {H, c.moe_intermediate_size};
      }
    } else {
      s[p + "mlp.gate_proj.weight"] = {c.intermediate_size, H};
      s[p + "mlp.up_proj.weight"] = {c.intermediate_size, H};
      s[p + "mlp.down_proj.weight"] = {H, c.intermediate_size};
    }
  }
  return s;
}

namespace {

// Binds every tensor slot of `w` to its global name.
template <typename W, typename F>
void for_each_slot(W& w, F&& f) {
  const ModelConfig& c = w.config;
  f("model.embed_tokens.weight", w.embed);
  f("model.norm.weight", w.final_norm);
  if (!c.tie_word_embeddings) f("lm_head.weight", w.lm_head);
  for (int64_t l = 0; l < int64_t(w.layers.size()); ++l) {
    auto& L = w.layers[l];
    std::string p = "model.layers." + std::to_string(l) + ".";
    f(p + "input_layernorm.weight", L.input_norm);
    f(p + "post_attention_layernorm.weight", L.post_attention_norm);
    f(p + "self_attn.q_proj.weight", L.q_proj);
    f(p + "self_attn.k_proj.weight", L.k_proj);
    f(p + "self_attn.v_proj.weight", L.v_proj);
    f(p + "self_attn.o_proj.weight", L.o_proj);
    f(p + "self_attn.q_norm.weight", L.q_norm);
    f(p + "self_attn.k_norm.weight", L.k_norm);
    if (L.is_moe) {
      f(p + "mlp.gate.weight", L.router);
      for (int64_t e = 0; e < int64_t(L.experts.size()); ++e) {
        std::string q = p + "mlp.experts." + std::to_string(e) + ".";
        f(q + "gate_proj.weight", L.experts[e].gate);
        f(q + "up_proj.weight", L.experts[e].up);
        f(q + "down_proj.weight", L.experts[e].down);
      }
    } else {
      f(p + "mlp.gate_proj.weight", L.dense.gate);
      f(p + "mlp.up_proj.weight", L.dense.up);
      f(p + "mlp.down_proj.weight", L.dense.down);
    }
  }
}

void shape_layers(ModelWeights& w) {
  w.layers.resize(w.config.num_hidden_layers);
  for (int64_t l = 0; l < w.config.num_hidden_layers; ++l) {
    w.layers[l].is_moe = w.config.is_moe_layer(l);
    if (w.layers[l].is_moe) w.layers[l].experts.resize(w.config.num_experts);
  }
}

}  // namespace

std::map<std::string, Tensor*> ModelWeights::named() {
  std::map<std::string, Tensor*> out;
  for_each_slot(*this, [&](const std::string& n, Tensor& t) { out[n] = &t; });
  return out;
}

std::map<std::string, const Tensor*> ModelWeights::named() const {
  std::map<std::string, const Tensor*> out;
  for_each_slot(*this, [&](const std::string& n, const Tensor& t) { out[n] = &t; });
  return out;
}

ModelWeights ModelWeights::load(const std::string& dir, Precision precision) {
  namespace fs = std::filesystem;
  LS_CHECK(fs::is_directory(dir), dir, ": not a model directory");
  ModelWeights w;
  w.config = ModelConfig::load((fs::path(dir) / "config.json").string());
  shape_layers(w);
  SafetensorsReader reader = SafetensorsReader::open(dir);
  auto shapes = expected_shapes(w.config);
  for_each_slot(w, [&](const std::string& name, Tensor& slot) {
    slot = reader.get_f32(name, shapes.at(name));
    if (precision == Precision::bfloat16) cpu::round_to_bf16(slot.data<float>(), slot.numel());
  });
  if (w.config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

ModelWeights ModelWeights::random(const ModelConfig& config, uint64_t seed, Precision precision) {
  ModelWeights w;
  w.config = config;
  shape_layers(w);
  auto shapes = expected_shapes(config);
  uint64_t stream = 0;
  for_each_slot(w, [&](const std::string& name, Tensor& slot) {
    slot = Tensor::zeros(shapes.at(name), DType::f32);
    float* p = slot.data<float>();
    bool is_norm = name.find("norm") != std::string::npos;
    float scale = is_norm ? 0.2f : 0.04f;
    for (int64_t i = 0; i < slot.numel(); ++i) {
      float u = philox_uniform(seed, stream, uint64_t(i)) * 2.0f - 1.0f;
      p[i] = is_norm ? 1.0f + scale * u : scale * u;
    }
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
  for_each_slot(w, [&](const std::string& name, Tensor& slot) { slot = src.at(name)->clone(); });
  if (config.tie_word_embeddings) w.lm_head = w.embed;
  return w;
}

}  // namespace lockstep
