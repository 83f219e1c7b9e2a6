#include "parallel/shard_plan.h"

#include <functional>

#include "core/error.h"
#include "core/finite.h"
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

// The box of the full tensor of `kind` that the rank holds.
Box piece_box(const ModelConfig& c, const ShardLayout& s, ParamKind kind) {
  using K = ParamKind;
  const int64_t H = c.hidden_size, D = c.head_dim;
  auto rows = [&](int64_t b, int64_t e, int64_t cols) { return Box{{b, e}, {0, cols}}; };
  auto cols = [&](int64_t n_rows, int64_t b, int64_t e) { return Box{{0, n_rows}, {b, e}}; };
  const dist::RowRange q{s.q_head_begin * D, (s.q_head_begin + s.q_heads) * D};
  const dist::RowRange kv{s.kv_head_begin * D, (s.kv_head_begin + s.kv_heads) * D};
  switch (kind) {
    case K::embed:
    case K::lm_head: return rows(s.vocab.begin, s.vocab.end, H);
    case K::q_proj: return rows(q.begin, q.end, H);
    case K::k_proj:
    case K::v_proj: return rows(kv.begin, kv.end, H);
    case K::o_proj: return cols(H, q.begin, q.end);
    case K::expert_gate:
    case K::expert_up: return rows(s.expert_cols.begin, s.expert_cols.end, H);
    case K::expert_down: return cols(H, s.expert_cols.begin, s.expert_cols.end);
    case K::dense_gate:
    case K::dense_up: return rows(s.dense_cols.begin, s.dense_cols.end, H);
    case K::dense_down: return cols(H, s.dense_cols.begin, s.dense_cols.end);
    default: return full_box(param_shape(c, kind));  // norms and the router: replicated
  }
}

// Calls f(global name, box, local slot) for every piece of the rank, in the names table's
// order. A tied lm_head on the embedding's own stage is the embedding's tensor (one piece,
// one gradient, one optimizer state); on another stage it is a copy of that slice.
void for_each_piece(const ModelConfig& c, const ShardLayout& s, ModelWeights& w,
                    const std::function<void(const std::string&, const Box&, Tensor&)>& f) {
  w.config = c;
  w.layers.resize(s.num_layers);
  for (int64_t i = 0; i < s.num_layers; ++i) {
    w.layers[i].is_moe = c.is_moe_layer(s.first_layer + i);
    w.layers[i].experts.resize(w.layers[i].is_moe ? s.experts : 0);
  }
  for_each_param(
      w, [&](const ParamSlot& slot, Tensor& t) { f(param_name(c, slot), piece_box(c, s, slot.kind), t); }, s.scope());
  if (tied_on_one_stage(c, s)) w.lm_head = w.embed;
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
    const DType t = src.dtype(name);
    LS_CHECK(t == DType::f32 || t == DType::bf16 || t == DType::f16 || t == DType::f64, src.describe(), ": tensor '",
             name, "' has dtype ", dtype_name(t), ", expected a floating type (F32, BF16, F16)");
  }
}

ModelWeights load_local_weights(const CheckpointSource& src, const ModelConfig& cfg, const ShardLayout& layout,
                                Precision precision) {
  check_checkpoint_matches(src, cfg);
  ModelWeights w;
  w.config = cfg;
  for_each_piece(cfg, layout, w, [&](const std::string& name, const Box& box, Tensor& slot) {
    slot = src.read(name, box).to_f32();
    check_finite(slot, src.describe(), name);
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
