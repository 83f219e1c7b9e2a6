#include "model/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_int.h"
#include "core/json_parse.h"

namespace lockstep {

bool ModelConfig::is_moe_layer(int64_t layer) const {
  if (num_experts <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return decoder_sparse_step > 0 && (layer + 1) % decoder_sparse_step == 0;
}

namespace {

const nlohmann::json* find(const nlohmann::json& j, std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    if (j.contains(k) && !j[k].is_null()) return &j[k];
  return nullptr;
}

int64_t get_int(const nlohmann::json& j, const std::string& where, std::initializer_list<const char*> keys,
                bool required, int64_t fallback = 0) {
  const nlohmann::json* v = find(j, keys);
  if (!v) {
    LS_CHECK(!required, where, ": missing required field '", *keys.begin(), "'");
    return fallback;
  }
  return json_int(*v, INT64_MIN, INT64_MAX, where + ": field '" + *keys.begin() + "'");
}

double get_num(const nlohmann::json& j, const std::string& where, std::initializer_list<const char*> keys,
               double fallback) {
  const nlohmann::json* v = find(j, keys);
  if (!v) return fallback;
  LS_CHECK(v->is_number(), where, ": field '", *keys.begin(), "' must be a number, got ", v->dump());
  return v->get<double>();
}

bool get_bool(const nlohmann::json& j, const std::string& where, const char* key, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  LS_CHECK(j[key].is_boolean(), where, ": field '", key, "' must be true or false, got ", j[key].dump());
  return j[key].get<bool>();
}

}  // namespace

ModelConfig ModelConfig::from_json(const nlohmann::json& j, const std::string& where) {
  LS_CHECK(j.is_object(), where, ": expected a JSON object");
  if (j.contains("model_type")) {
    auto mt = j["model_type"];
    LS_CHECK(mt.is_string() && (mt == "qwen3_moe" || mt == "qwen3"), where,
             ": model_type must be 'qwen3_moe' (or 'qwen3'), got ", mt.dump());
  }
  ModelConfig c;
  c.vocab_size = get_int(j, where, {"vocab_size"}, true);
  c.hidden_size = get_int(j, where, {"hidden_size"}, true);
  c.num_hidden_layers = get_int(j, where, {"num_hidden_layers"}, true);
  c.num_attention_heads = get_int(j, where, {"num_attention_heads"}, true);
  c.num_key_value_heads = get_int(j, where, {"num_key_value_heads"}, false, c.num_attention_heads);
  c.head_dim = get_int(j, where, {"head_dim"}, false, 0);
  if (c.head_dim == 0 && c.num_attention_heads > 0) c.head_dim = c.hidden_size / c.num_attention_heads;
  c.intermediate_size = get_int(j, where, {"intermediate_size"}, false, 0);
  c.num_experts = get_int(j, where, {"num_experts", "num_local_experts"}, false, 0);
  c.moe_intermediate_size = get_int(j, where, {"moe_intermediate_size"}, c.num_experts > 0, 0);
  c.num_experts_per_tok = get_int(j, where, {"num_experts_per_tok"}, c.num_experts > 0, 0);
  c.decoder_sparse_step = get_int(j, where, {"decoder_sparse_step"}, false, 1);
  c.max_position_embeddings = get_int(j, where, {"max_position_embeddings"}, false, 32768);
  c.norm_topk_prob = get_bool(j, where, "norm_topk_prob", true);
  c.tie_word_embeddings = get_bool(j, where, "tie_word_embeddings", false);
  c.rms_norm_eps = get_num(j, where, {"rms_norm_eps"}, 1e-6);
  // Hub style keeps rope_theta at the top; transformers 5 nests it in rope_parameters.
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    c.rope_theta = get_num(j["rope_parameters"], where + " (rope_parameters)", {"rope_theta"}, 10000.0);
  } else {
    c.rope_theta = get_num(j, where, {"rope_theta"}, 10000.0);
  }
  if (j.contains("mlp_only_layers") && !j["mlp_only_layers"].is_null()) {
    LS_CHECK(j["mlp_only_layers"].is_array(), where, ": field 'mlp_only_layers' must be a list of layer indices");
    for (const auto& v : j["mlp_only_layers"]) {
      LS_CHECK(v.is_number_integer(), where, ": mlp_only_layers entries must be integers, got ", v.dump());
      c.mlp_only_layers.push_back(v.get<int64_t>());
    }
  }
  if (j.contains("eos_token_id")) {
    const auto& e = j["eos_token_id"];
    if (e.is_number_integer()) c.eos_token_ids.push_back(e.get<int64_t>());
    if (e.is_array())
      for (const auto& v : e)
        if (v.is_number_integer()) c.eos_token_ids.push_back(v.get<int64_t>());
  }

  auto positive = [&](int64_t v, const char* name) {
    LS_CHECK(v > 0, where, ": field '", name, "' must be positive, got ", v);
  };
  // Upper bounds far above any real model keep every size product (a tensor's elements, a
  // KV cache's bytes) far from int64 overflow, and refuse absurd sizes before allocation.
  auto at_most = [&](int64_t v, int64_t hi, const char* name) {
    LS_CHECK(v <= hi, where, ": field '", name, "' = ", v, " is absurdly large (at most ", hi, ")");
  };
  constexpr int64_t k4K = 1 << 12, k1M = 1 << 20;
  positive(c.vocab_size, "vocab_size");
  at_most(c.vocab_size, INT32_MAX, "vocab_size");  // token ids are 32-bit
  positive(c.hidden_size, "hidden_size");
  at_most(c.hidden_size, k1M, "hidden_size");
  positive(c.num_hidden_layers, "num_hidden_layers");
  at_most(c.num_hidden_layers, k4K, "num_hidden_layers");
  positive(c.num_attention_heads, "num_attention_heads");
  at_most(c.num_attention_heads, k4K, "num_attention_heads");
  positive(c.num_key_value_heads, "num_key_value_heads");
  at_most(c.num_key_value_heads, k4K, "num_key_value_heads");
  positive(c.head_dim, "head_dim");
  at_most(c.head_dim, k4K, "head_dim");
  positive(c.max_position_embeddings, "max_position_embeddings");
  at_most(c.max_position_embeddings, 16 * k1M, "max_position_embeddings");
  LS_CHECK(c.num_experts >= 0 && c.num_experts <= 64 * 1024, where, ": field 'num_experts' must be in [0, 65536], got ",
           c.num_experts);
  for (auto [v, name] :
       {std::pair{c.intermediate_size, "intermediate_size"}, {c.moe_intermediate_size, "moe_intermediate_size"}})
    LS_CHECK(v >= 0 && v <= 4 * k1M, where, ": field '", name, "' must be in [0, ", 4 * k1M, "], got ", v);
  LS_CHECK(c.decoder_sparse_step >= 0 && c.decoder_sparse_step <= k4K, where,
           ": field 'decoder_sparse_step' must be in [0, 4096], got ", c.decoder_sparse_step);
  LS_CHECK(c.vocab_size * c.hidden_size <= (int64_t(1) << 40), where,
           ": vocab_size x hidden_size = ", c.vocab_size * c.hidden_size, " elements is absurdly large");
  // NaN fails every comparison, so "!(v > 0)" also refuses it; JSON has no infinity, but a
  // config built in code might.
  auto positive_finite = [&](double v, const char* name) {
    LS_CHECK(v > 0 && std::isfinite(v), where, ": field '", name, "' must be a positive finite number, got ", v);
  };
  positive_finite(c.rms_norm_eps, "rms_norm_eps");
  positive_finite(c.rope_theta, "rope_theta");
  LS_CHECK(c.head_dim % 2 == 0, where, ": head_dim must be even for rotary embeddings, got ", c.head_dim);
  LS_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, where, ": num_attention_heads (",
           c.num_attention_heads, ") must be a multiple of num_key_value_heads (", c.num_key_value_heads, ")");
  if (c.num_experts > 0) {
    positive(c.moe_intermediate_size, "moe_intermediate_size");
    LS_CHECK(c.num_experts_per_tok > 0 && c.num_experts_per_tok <= c.num_experts, where,
             ": num_experts_per_tok must be in [1, num_experts=", c.num_experts, "], got ", c.num_experts_per_tok);
  }
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    if (!c.is_moe_layer(l)) positive(c.intermediate_size, "intermediate_size (needed by dense layers)");
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) {
  LS_CHECK(std::ifstream(path), path, ": cannot open the model config");
  return from_json(read_json_file(path), path);
}

nlohmann::json ModelConfig::to_json() const {
  nlohmann::json j;
  j["architectures"] = {"Qwen3MoeForCausalLM"};
  j["model_type"] = "qwen3_moe";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["num_experts"] = num_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["decoder_sparse_step"] = decoder_sparse_step;
  j["mlp_only_layers"] = mlp_only_layers;
  j["norm_topk_prob"] = norm_topk_prob;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["rope_theta"] = rope_theta;
  j["max_position_embeddings"] = max_position_embeddings;
  j["hidden_act"] = "silu";
  j["torch_dtype"] = "bfloat16";
  if (!eos_token_ids.empty()) j["eos_token_id"] = eos_token_ids.size() == 1 ? nlohmann::json(eos_token_ids[0]) : nlohmann::json(eos_token_ids);
  return j;
}

}  // namespace lockstep
