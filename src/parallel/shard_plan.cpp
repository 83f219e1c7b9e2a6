#include "parallel/shard_plan.h"

#include <functional>

#include "core/error.h"
#include "kernels/canonical.h"
#include "kernels/cpu/elementwise.h"

namespace lockstep {

bool tied_on_one_stage(const ModelConfig& cfg, const ShardLayout& layout) {
  return cfg.tie_word_embeddings && layout.first_stage && layout.last_stage;
}

dist::RowRange chunk_range(int64_t n, int parts, int part) {
  LS_CHECK(is_power_of_two(parts) && kTMax % parts == 0 && part >= 0 && part < parts, "chunk_range: part ", part,
           " of ", parts, " is not a split at the 8 canonical chunks");
  const int64_t per = canonical_chunk(n) * (kTMax / parts);
  return {std::min(n, part * per), std::min(n, (part + 1) * per)};
}

ShardLayout ShardLayout::make(const ModelConfig& cfg, const Topology& topo, const std::vector<int64_t>& layer_split,
                              int rank) {
  ShardLayout s;
  s.topo = topo;
  s.rank = rank;
  s.coords = topo.coords(rank);
  s.layer_split = layer_split;
  s.first_layer = lockstep::first_layer(layer_split, s.coords.pp);
  s.num_layers = layer_split.at(s.coords.pp);
  s.first_stage = s.coords.pp == 0;
  s.last_stage = s.coords.pp == topo.pp - 1;
  const int tp = topo.tp, r = s.coords.tp;
  const int64_t nq = cfg.num_attention_heads, nkv = cfg.num_key_value_heads;
  s.q_heads = nq / tp;
  s.q_head_begin = r * s.q_heads;
  if (tp <= nkv) {
    s.kv_heads = nkv / tp;
    s.kv_head_begin = r * s.kv_heads;
  } else {  // each KV head is replicated on tp / nkv ranks
    s.kv_heads = 1;
    s.kv_head_begin = s.q_head_begin / (nq / nkv);
  }
  if (cfg.num_experts > 0) {
    s.experts = cfg.num_experts / topo.ep;
    s.expert_begin = s.coords.ep * s.experts;
  }
  s.vocab = chunk_range(cfg.vocab_size, tp, r);
  s.dense_cols = chunk_range(cfg.intermediate_size, tp, r);
  s.expert_cols = chunk_range(cfg.moe_intermediate_size, topo.etp, s.coords.etp);
  return s;
}

ModelConfig ShardLayout::local_cache_config(const ModelConfig& cfg) const {
  ModelConfig c = cfg;
  c.num_hidden_layers = num_layers;
  c.num_key_value_heads = kv_heads;
  return c;
}

namespace {

// Calls f(global name, box, local slot) for every piece of the rank, in a fixed order.
void for_each_piece(const ModelConfig& c, const ShardLayout& s, ModelWeights& w,
                    const std::function<void(const std::string&, const Box&, Tensor&)>& f) {
  const int64_t H = c.hidden_size, D = c.head_dim;
  auto rows = [&](int64_t b, int64_t e, int64_t cols) { return Box{{b, e}, {0, cols}}; };
  auto cols = [&](int64_t n_rows, int64_t b, int64_t e) { return Box{{0, n_rows}, {b, e}}; };
  if (s.first_stage) f("model.embed_tokens.weight", rows(s.vocab.begin, s.vocab.end, H), w.embed);
  if (s.last_stage) {
    f("model.norm.weight", full_box({H}), w.final_norm);
    // A tied lm_head on the embedding's own stage is the embedding's tensor (one piece,
    // one gradient, one optimizer state); on another stage it is a copy of that slice.
    if (tied_on_one_stage(c, s))
      w.lm_head = w.embed;
    else
      f(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", rows(s.vocab.begin, s.vocab.end, H),
        w.lm_head);
  }
  w.layers.resize(s.num_layers);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    const int64_t l = s.first_layer + i;
    auto& L = w.layers[i];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    f(p + "input_layernorm.weight", full_box({H}), L.input_norm);
    f(p + "post_attention_layernorm.weight", full_box({H}), L.post_attention_norm);
    f(p + "self_attn.q_proj.weight", rows(s.q_head_begin * D, (s.q_head_begin + s.q_heads) * D, H), L.q_proj);
    f(p + "self_attn.k_proj.weight", rows(s.kv_head_begin * D, (s.kv_head_begin + s.kv_heads) * D, H), L.k_proj);
    f(p + "self_attn.v_proj.weight", rows(s.kv_head_begin * D, (s.kv_head_begin + s.kv_heads) * D, H), L.v_proj);
    f(p + "self_attn.o_proj.weight", cols(H, s.q_head_begin * D, (s.q_head_begin + s.q_heads) * D), L.o_proj);
    f(p + "self_attn.q_norm.weight", full_box({D}), L.q_norm);
    f(p + "self_attn.k_norm.weight", full_box({D}), L.k_norm);
    L.is_moe = c.is_moe_layer(l);
    if (L.is_moe) {
      f(p + "mlp.gate.weight", full_box({c.num_experts, H}), L.router);
      L.experts.resize(s.experts);
      const dist::RowRange ic = s.expert_cols;
      for (int64_t j = 0; j < s.experts; ++j) {
        const std::string q = p + "mlp.experts." + std::to_string(s.expert_begin + j) + ".";
        f(q + "gate_proj.weight", rows(ic.begin, ic.end, H), L.experts[j].gate);
        f(q + "up_proj.weight", rows(ic.begin, ic.end, H), L.experts[j].up);
        f(q + "down_proj.weight", cols(H, ic.begin, ic.end), L.experts[j].down);
      }
    } else {
      const dist::RowRange ic = s.dense_cols;
      f(p + "mlp.gate_proj.weight", rows(ic.begin, ic.end, H), L.dense.gate);
      f(p + "mlp.up_proj.weight", rows(ic.begin, ic.end, H), L.dense.up);
      f(p + "mlp.down_proj.weight", cols(H, ic.begin, ic.end), L.dense.down);
    }
  }
}

}  // namespace

std::vector<ShardPiece> rank_pieces(const ModelConfig& cfg, const ShardLayout& layout) {
  ModelWeights scratch;
  std::vector<ShardPiece> out;
  for_each_piece(cfg, layout, scratch, [&](const std::string& n, const Box& b, Tensor&) { out.push_back({n, b}); });
  return out;
}

void check_checkpoint_matches(const CheckpointSource& src, const ModelConfig& cfg) {
  for (const auto& [name, shape] : ModelWeights::expected_shapes(cfg)) {
    LS_CHECK(src.contains(name), src.describe(), ": has no tensor '", name, "' (config.json expects ", shape_str(shape),
             ")");
    LS_CHECK(src.shape(name) == shape, src.describe(), ": tensor '", name, "' has shape ", shape_str(src.shape(name)),
             " but config.json expects ", shape_str(shape), ": the checkpoint does not match this model");
  }
}

ModelWeights load_local_weights(const CheckpointSource& src, const ModelConfig& cfg, const ShardLayout& layout,
                                Precision precision) {
  check_checkpoint_matches(src, cfg);
  ModelWeights w;
  w.config = cfg;
  for_each_piece(cfg, layout, w, [&](const std::string& name, const Box& box, Tensor& slot) {
    slot = src.read(name, box).to_f32();
    if (precision == Precision::bfloat16) cpu::round_to_bf16(slot.data<float>(), slot.numel());
  });
  return w;
}

ModelWeights slice_local_weights(const ModelWeights& full, const ShardLayout& layout) {
  const auto named = full.named();
  ModelWeights w;
  w.config = full.config;
  for_each_piece(full.config, layout, w, [&](const std::string& name, const Box& box, Tensor& slot) {
    slot = slice_tensor(*named.at(name), box);
  });
  return w;
}

}  // namespace lockstep
