#include "model/qwen3_moe.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/moe.h"

namespace lockstep {

Qwen3Moe::Qwen3Moe(ModelWeights weights, Precision precision)
    : weights_(std::move(weights)), precision_(precision) {
  const auto& c = weights_.config;
  rope_ = cpu::RopeTable::build(c.head_dim, std::max<int64_t>(c.max_position_embeddings, 1), c.rope_theta);
}

void Qwen3Moe::cast(float* x, int64_t n) const {
  if (bf16()) cpu::round_to_bf16(x, n);
}

void Qwen3Moe::validate(const ForwardBatch& batch) const {
  const auto& c = weights_.config;
  LS_CHECK(batch.positions.size() == batch.tokens.size() && batch.page_tables.size() == batch.tokens.size(),
           "forward batch: tokens, positions and page tables must have the same length");
  for (size_t t = 0; t < batch.tokens.size(); ++t) {
    LS_CHECK(batch.tokens[t] >= 0 && batch.tokens[t] < c.vocab_size, "token id ", batch.tokens[t],
             " is out of range: the model's vocab_size is ", c.vocab_size);
    LS_CHECK(batch.positions[t] >= 0 && batch.positions[t] < rope_.max_positions, "position ", batch.positions[t],
             " is beyond max_position_embeddings (", rope_.max_positions, ")");
  }
}

void Qwen3Moe::layer_forward(int64_t l, float* x, const ForwardBatch& batch, KvCache& cache,
                             std::vector<float>* router_logits, LayerActivations* acts) const {
  const auto& c = weights_.config;
  const auto& L = weights_.layers[l];
  const int64_t T = batch.size(), H = c.hidden_size, D = c.head_dim;
  const int64_t nq = c.num_attention_heads, nkv = c.num_key_value_heads;
  const float eps = float(c.rms_norm_eps);

  // Attention block.
  std::vector<float> h(T * H), q(T * nq * D), k(T * nkv * D), v(T * nkv * D), attn(T * nq * D), o(T * H);
  cpu::rmsnorm(x, L.input_norm.data<float>(), h.data(), T, H, eps, bf16());
  cast(h.data(), T * H);
  cpu::linear(h.data(), L.q_proj.data<float>(), q.data(), T, nq * D, H);
  cpu::linear(h.data(), L.k_proj.data<float>(), k.data(), T, nkv * D, H);
  cpu::linear(h.data(), L.v_proj.data<float>(), v.data(), T, nkv * D, H);
  cast(q.data(), q.size());
  cast(k.data(), k.size());
  cast(v.data(), v.size());
  if (acts) {
    acts->attn_norm_out = h;
    acts->q_proj = q;
    acts->k_proj = k;
  }
  cpu::rmsnorm(q.data(), L.q_norm.data<float>(), q.data(), T * nq, D, eps, bf16());
  cpu::rmsnorm(k.data(), L.k_norm.data<float>(), k.data(), T * nkv, D, eps, bf16());
  cast(q.data(), q.size());
  cast(k.data(), k.size());
  cpu::rope(q.data(), batch.positions.data(), T, nq, rope_);
  cpu::rope(k.data(), batch.positions.data(), T, nkv, rope_);
  cast(q.data(), q.size());
  cast(k.data(), k.size());

  if (acts) {
    acts->q = q;
    acts->k = k;
    acts->v = v;
  }
  PagedKvLayer kv = cache.layer(l);
  TokenSlots slots{batch.positions.data(), batch.page_tables.data()};
  cpu::kv_write(kv, slots, k.data(), v.data(), T);
  cpu::paged_attention(q.data(), attn.data(), kv, slots, T, nq, 1.0f / std::sqrt(float(D)));
  cast(attn.data(), attn.size());
  if (acts) acts->attn = attn;
  cpu::linear_row(attn.data(), L.o_proj.data<float>(), o.data(), T, H, nq * D);
  cast(o.data(), o.size());
  cpu::add_inplace(x, o.data(), T * H);
  cast(x, T * H);

  // MLP block.
  if (acts) acts->mid.assign(x, x + T * H);
  cpu::rmsnorm(x, L.post_attention_norm.data<float>(), h.data(), T, H, eps, bf16());
  cast(h.data(), T * H);
  if (acts) acts->mlp_norm_out = h;
  std::vector<float> local_router;
  if (acts && L.is_moe && !router_logits) router_logits = &local_router;
  if (L.is_moe) {
    std::vector<const float*> gate(c.num_experts), up(c.num_experts), down(c.num_experts);
    for (int64_t e = 0; e < c.num_experts; ++e) {
      gate[e] = L.experts[e].gate.data<float>();
      up[e] = L.experts[e].up.data<float>();
      down[e] = L.experts[e].down.data<float>();
    }
    if (router_logits) router_logits->resize(T * c.num_experts);
    cpu::moe_forward(h.data(), L.router.data<float>(), gate.data(), up.data(), down.data(), o.data(), T, H,
                     c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, bf16(),
                     router_logits ? router_logits->data() : nullptr);
  } else {
    cpu::swiglu_mlp(h.data(), L.dense.gate.data<float>(), L.dense.up.data<float>(), L.dense.down.data<float>(),
                    o.data(), T, H, c.intermediate_size, bf16());
  }
  if (acts && L.is_moe) acts->router_logits = *router_logits;
  cast(o.data(), o.size());
  cpu::add_inplace(x, o.data(), T * H);
  cast(x, T * H);
}

std::vector<float> Qwen3Moe::forward(const ForwardBatch& batch, KvCache& cache, ForwardTrace* trace) const {
  validate(batch);
  const auto& c = weights_.config;
  const int64_t T = batch.size(), H = c.hidden_size;
  std::vector<float> x(T * H);
  cpu::embedding(batch.tokens.data(), weights_.embed.data<float>(), x.data(), T, H);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (trace) trace->layer_inputs.push_back(x);
    std::vector<float> router;
    layer_forward(l, x.data(), batch, cache, trace && weights_.layers[l].is_moe ? &router : nullptr);
    if (trace && weights_.layers[l].is_moe) trace->router_logits.push_back(std::move(router));
  }
  if (trace) trace->final_norm_input = x;
  std::vector<float> out(T * H);
  cpu::rmsnorm(x.data(), weights_.final_norm.data<float>(), out.data(), T, H, float(c.rms_norm_eps), bf16());
  cast(out.data(), T * H);
  if (trace) trace->final_hidden = out;
  return out;
}

std::vector<float> Qwen3Moe::logits(const float* hidden, int64_t T) const {
  const auto& c = weights_.config;
  std::vector<float> out(T * c.vocab_size);
  cpu::linear(hidden, weights_.lm_head.data<float>(), out.data(), T, c.vocab_size, c.hidden_size);
  return out;
}

std::vector<std::vector<float>> score_sequences(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs,
                                                int64_t max_batch_tokens) {
  const int64_t page = kAttnBlock;
  std::vector<std::vector<float>> result(seqs.size());
  size_t next = 0;
  while (next < seqs.size()) {
    // Take whole sequences until the token budget is reached (at least one).
    size_t end = next;
    int64_t tokens = 0, pages = 0;
    while (end < seqs.size() && (end == next || tokens + int64_t(seqs[end].size()) <= max_batch_tokens)) {
      tokens += int64_t(seqs[end].size());
      pages += (int64_t(seqs[end].size()) + page - 1) / page;
      ++end;
    }
    KvCache cache(model.config(), std::max<int64_t>(pages, 1), page);
    std::vector<std::vector<int32_t>> tables(end - next);
    ForwardBatch batch;
    int32_t first_page = 0;
    for (size_t s = next; s < end; ++s) {
      auto& table = tables[s - next];
      int64_t n = int64_t(seqs[s].size());
      for (int64_t p = 0; p < (n + page - 1) / page; ++p) table.push_back(first_page++);
      for (int64_t t = 0; t < n; ++t) {
        batch.tokens.push_back(seqs[s][t]);
        batch.positions.push_back(int32_t(t));
        batch.page_tables.push_back(table.data());
      }
    }
    std::vector<float> hidden = model.forward(batch, cache);
    std::vector<float> logits = model.logits(hidden.data(), batch.size());
    const int64_t V = model.config().vocab_size;
    int64_t offset = 0;
    for (size_t s = next; s < end; ++s) {
      int64_t n = int64_t(seqs[s].size());
      result[s].resize(std::max<int64_t>(n - 1, 0));
      if (n > 1)
        cpu::log_softmax_gather(logits.data() + offset * V, seqs[s].data() + 1, result[s].data(), n - 1, V);
      offset += n;
    }
    next = end;
  }
  return result;
}

}  // namespace lockstep
