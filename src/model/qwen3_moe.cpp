#include "model/qwen3_moe.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/canonical.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/moe.h"
#include "model/layer.h"
#include "parallel/expert_parallel.h"

namespace lockstep {

namespace {
constexpr int kResultTag = 1 << 20;
}

PackedSequences pack_sequences(const std::vector<std::vector<int32_t>>& seqs) {
  PackedSequences p;
  p.page_tables.resize(seqs.size());
  int32_t next_page = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const int64_t n = int64_t(seqs[i].size());
    LS_CHECK(n >= 1, "sequence ", i, " is empty");
    for (int64_t page = 0; page < (n + kAttnBlock - 1) / kAttnBlock; ++page) p.page_tables[i].push_back(next_page++);
  }
  p.num_pages = std::max<int32_t>(next_page, 1);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (size_t t = 0; t < seqs[i].size(); ++t) {
      p.batch.tokens.push_back(seqs[i][t]);
      p.batch.positions.push_back(int32_t(t));
      p.batch.page_tables.push_back(p.page_tables[i].data());
    }
  return p;
}

std::vector<std::pair<size_t, size_t>> score_steps(const std::vector<std::vector<int32_t>>& seqs, size_t begin,
                                                   size_t end, int64_t max_batch_tokens) {
  std::vector<std::pair<size_t, size_t>> steps;
  for (size_t next = begin; next < end;) {
    size_t stop = next;
    int64_t tokens = 0;
    while (stop < end && (stop == next || tokens + int64_t(seqs[stop].size()) <= max_batch_tokens))
      tokens += int64_t(seqs[stop++].size());
    steps.push_back({next, stop});
    next = stop;
  }
  return steps;
}

Qwen3Moe::Qwen3Moe(ModelWeights weights, Precision precision)
    : own_world_(std::make_unique<dist::SelfCommunicator>()), weights_(std::move(weights)), precision_(precision) {
  const auto& c = weights_.config;
  ctx_ = std::make_unique<ParallelContext>(*own_world_, ShardLayout::make(c, Topology{}, {c.num_hidden_layers}, 0));
  rope_ = cpu::RopeTable::build(c.head_dim, std::max<int64_t>(c.max_position_embeddings, 1), c.rope_theta);
}

Qwen3Moe::Qwen3Moe(dist::Communicator& world, const ShardLayout& layout, ModelWeights local, Precision precision)
    : ctx_(std::make_unique<ParallelContext>(world, layout)), weights_(std::move(local)), precision_(precision) {
  const auto& c = weights_.config;
  rope_ = cpu::RopeTable::build(c.head_dim, std::max<int64_t>(c.max_position_embeddings, 1), c.rope_theta);
  LS_CHECK(int64_t(weights_.layers.size()) == layout.num_layers, "model: rank ", layout.rank, " holds ",
           weights_.layers.size(), " layers but its stage has ", layout.num_layers);
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

namespace {

// The CPU op set of layer_forward.h: fp32 containers that hold bf16 values in the bfloat16
// recipe (rounded at each cast point), over a parallel context (on one rank its
// collectives are copies). Rows: the residual stream holds this rank's R rows; the
// tensor-parallel region (attention heads, the dense MLP's columns) works on all T rows.
// The buffers it leaves in LayerActivations are what the backward needs.
struct CpuLayerOps {
  using Layer = LayerWeights;
  const ParallelContext& ctx;
  const ModelConfig& c;
  const cpu::RopeTable& rope;
  bool bf16;
  const ForwardBatch& batch;
  PagedKvLayer kv;
  std::vector<float>& x;  // [R, H]
  LayerActivations& a;
  int64_t T = batch.size(), H = c.hidden_size, R = int64_t(x.size()) / c.hidden_size;

  void cast(float* p, int64_t n) const {
    if (bf16) cpu::round_to_bf16(p, n);
  }
  // x = cast(x + cast(o)), o the full sums of this rank's rows.
  void residual_add(std::vector<float>& o) {
    cast(o.data(), R * H);
    cpu::add_inplace(x.data(), o.data(), R * H);
    cast(x.data(), R * H);
  }

  void input_norm(const Layer& L) {
    std::vector<float> h(R * H);
    cpu::rmsnorm(x.data(), L.input_norm.data<float>(), h.data(), R, H, float(c.rms_norm_eps), bf16);
    cast(h.data(), R * H);
    a.attn_in = ctx.gather_rows(h, T, H);
  }
  void qkv(const Layer& L) {
    const int64_t qd = ctx.layout.q_heads * c.head_dim, kd = ctx.layout.kv_heads * c.head_dim;
    a.q.resize(T * qd), a.k.resize(T * kd), a.v.resize(T * kd);
    cpu::linear(a.attn_in.data(), L.q_proj.data<float>(), a.q.data(), T, qd, H);
    cpu::linear(a.attn_in.data(), L.k_proj.data<float>(), a.k.data(), T, kd, H);
    cpu::linear(a.attn_in.data(), L.v_proj.data<float>(), a.v.data(), T, kd, H);
    cast(a.q.data(), T * qd);
    cast(a.k.data(), T * kd);
    cast(a.v.data(), T * kd);
  }
  void qk_norm_rope_kv_write(const Layer& L) {
    const int64_t D = c.head_dim, nq = ctx.layout.q_heads, nkv = ctx.layout.kv_heads;
    const float eps = float(c.rms_norm_eps);
    a.q_proj = a.q;
    a.k_proj = a.k;
    cpu::rmsnorm(a.q.data(), L.q_norm.data<float>(), a.q.data(), T * nq, D, eps, bf16);
    cpu::rmsnorm(a.k.data(), L.k_norm.data<float>(), a.k.data(), T * nkv, D, eps, bf16);
    cast(a.q.data(), T * nq * D);
    cast(a.k.data(), T * nkv * D);
    cpu::rope(a.q.data(), batch.positions.data(), T, nq, rope);
    cpu::rope(a.k.data(), batch.positions.data(), T, nkv, rope);
    cast(a.q.data(), T * nq * D);
    cast(a.k.data(), T * nkv * D);
    cpu::kv_write(kv, TokenSlots{batch.positions.data(), batch.page_tables.data()}, a.k.data(), a.v.data(), T);
  }
  void attention() {
    const int64_t D = c.head_dim, nq = ctx.layout.q_heads;
    a.attn.resize(T * nq * D);
    cpu::paged_attention(a.q.data(), a.attn.data(), kv, TokenSlots{batch.positions.data(), batch.page_tables.data()}, T,
                         nq, 1.0f / std::sqrt(float(D)));
    cast(a.attn.data(), T * nq * D);
  }
  // This rank's heads are a run of whole canonical chunks of q_dim: its subtree, completed
  // over TP (reduce-scattered to the rows under SP).
  void o_proj_residual(const Layer& L) {
    std::vector<float> o(T * H);
    cpu::linear_row_canonical(a.attn.data(), L.o_proj.data<float>(), o.data(), T, H, ctx.layout.q_heads * c.head_dim,
                              canonical_chunk(c.q_dim()), kTMax / ctx.layout.topo.tp);
    o = ctx.reduce_rows(std::move(o), T, H);
    residual_add(o);
  }
  void post_attention_norm(const Layer& L) {
    a.mid = x;
    a.mlp_in.resize(R * H);
    cpu::rmsnorm(x.data(), L.post_attention_norm.data<float>(), a.mlp_in.data(), R, H, float(c.rms_norm_eps), bf16);
    cast(a.mlp_in.data(), R * H);
  }
  void moe_residual(const Layer& L) {
    std::vector<float> o(R * H);
    a.router_logits.resize(R * c.num_experts);
    expert_parallel_moe(ctx, L, c, a.mlp_in.data(), R, o.data(), bf16, a.router_logits.data());
    residual_add(o);
  }
  void dense_mlp_residual(const Layer& L) {
    a.router_logits.clear();
    const std::vector<float> h = ctx.gather_rows(a.mlp_in, T, H);
    std::vector<float> part(T * H);
    const int tp = ctx.layout.topo.tp;
    if (tp == 1)
      cpu::swiglu_mlp(h.data(), L.dense.gate.data<float>(), L.dense.up.data<float>(), L.dense.down.data<float>(),
                      part.data(), T, H, c.intermediate_size, bf16);
    else
      swiglu_partial(h.data(), L.dense.gate.data<float>(), L.dense.up.data<float>(), L.dense.down.data<float>(),
                     part.data(), T, H, c.intermediate_size, ctx.layout.dense_cols.size(), kTMax / tp, bf16);
    std::vector<float> o = ctx.reduce_rows(std::move(part), T, H);
    if (tp > 1) cast(o.data(), R * H);  // swiglu_mlp's output cast, on the full sums
    residual_add(o);
  }
};

}  // namespace

void Qwen3Moe::layer_forward(int64_t local_layer, std::vector<float>& x, const ForwardBatch& batch, KvCache& cache,
                             LayerActivations* acts) const {
  LayerActivations local;
  CpuLayerOps ops{*ctx_, weights_.config, rope_, bf16(), batch, cache.layer(local_layer), x, acts ? *acts : local};
  lockstep::layer_forward(ops, weights_.layers.at(local_layer));
}

std::vector<float> Qwen3Moe::forward(const ForwardBatch& batch, KvCache& cache, ForwardTrace* trace) const {
  validate(batch);
  const auto& c = weights_.config;
  const ShardLayout& s = ctx_->layout;
  LS_CHECK(s.topo.pp == 1, "Qwen3Moe::forward runs every layer: it takes no pipeline split (", s.topo.name(), ")");
  const int64_t T = batch.size(), H = c.hidden_size;
  std::vector<float> x = ctx_->embed_rows(batch.tokens.data(), T, weights_.embed.data<float>(), c.vocab_size, H);
  const int64_t R = int64_t(x.size()) / H;
  LayerActivations acts;  // the layers' working buffers, reused
  for (int64_t l = 0; l < s.num_layers; ++l) {
    if (trace) trace->layer_inputs.push_back(x);
    layer_forward(l, x, batch, cache, &acts);
    if (trace && weights_.layers[l].is_moe) trace->router_logits.push_back(acts.router_logits);
  }
  if (trace) trace->final_norm_input = x;
  std::vector<float> out(R * H);
  cpu::rmsnorm(x.data(), weights_.final_norm.data<float>(), out.data(), R, H, float(c.rms_norm_eps), bf16());
  cast(out.data(), R * H);
  if (trace) trace->final_hidden = out;
  return out;
}

std::vector<float> Qwen3Moe::logits(const float* hidden, int64_t T) const {
  const auto& c = weights_.config;
  LS_CHECK(ctx_->layout.vocab.size() == c.vocab_size, "Qwen3Moe::logits needs the whole lm_head (tp 1)");
  std::vector<float> out(T * c.vocab_size);
  cpu::linear(hidden, weights_.lm_head.data<float>(), out.data(), T, c.vocab_size, c.hidden_size);
  return out;
}

std::vector<std::vector<float>> Qwen3Moe::stage_logprobs(const std::vector<float>& x, const ForwardBatch& batch,
                                                         const std::vector<std::vector<int32_t>>& seqs) const {
  const auto& c = weights_.config;
  const ShardLayout& s = ctx_->layout;
  const int64_t T = batch.size(), H = c.hidden_size, V = c.vocab_size, R = int64_t(x.size()) / H;
  std::vector<float> normed(R * H);
  cpu::rmsnorm(x.data(), weights_.final_norm.data<float>(), normed.data(), R, H, float(c.rms_norm_eps), bf16());
  cast(normed.data(), R * H);
  const std::vector<float> hidden = ctx_->gather_rows(normed, T, H);

  // Rows with a next token, and their targets.
  std::vector<int64_t> row_of;
  std::vector<int32_t> target;
  int64_t offset = 0;
  for (const auto& seq : seqs) {
    for (size_t t = 0; t + 1 < seq.size(); ++t) {
      row_of.push_back(offset + int64_t(t));
      target.push_back(seq[t + 1]);
    }
    offset += int64_t(seq.size());
  }
  const int64_t M = int64_t(row_of.size());
  std::vector<float> lp(M);
  const int tp = s.topo.tp;
  const int64_t VL = s.vocab.size();
  if (tp == 1) {
    // Only the rows with a target, a block at a time: with a 151936-entry vocabulary the
    // logits of a whole batch are gigabytes. A row's logits do not depend on the rows beside
    // it (batch invariance), so the log-probs are the bits of the whole-batch form.
    constexpr int64_t kBlockRows = 64;
    std::vector<float> block_hidden(kBlockRows * H), rows(kBlockRows * V);
    for (int64_t i0 = 0; i0 < M; i0 += kBlockRows) {
      const int64_t n = std::min(kBlockRows, M - i0);
      for (int64_t i = 0; i < n; ++i)
        std::copy_n(hidden.data() + row_of[i0 + i] * H, H, block_hidden.data() + i * H);
      cpu::linear(block_hidden.data(), weights_.lm_head.data<float>(), rows.data(), n, V, H);
      cpu::log_softmax_gather(rows.data(), target.data() + i0, lp.data() + i0, n, V);
    }
  } else {
    std::vector<float> logits(T * VL);
    cpu::linear(hidden.data(), weights_.lm_head.data<float>(), logits.data(), T, VL, H);
    // Vocab-parallel: this rank's subtree of (max, sum), completed over TP; the target
    // logit comes from the rank that owns it.
    std::vector<float> mx(M), sm(M), tl(M, 0.0f);
    for (int64_t i = 0; i < M; ++i) {
      const float* row = logits.data() + row_of[i] * VL;
      MaxSum ms = cpu::vocab_subtree(row, VL, canonical_chunk(V), kTMax / tp);
      mx[i] = ms.max;
      sm[i] = ms.sum;
      if (target[i] >= s.vocab.begin && target[i] < s.vocab.end) tl[i] = row[target[i] - s.vocab.begin];
    }
    dist::canonical_all_reduce_maxsum(*ctx_->tp, mx.data(), sm.data(), M);
    std::vector<float> all_tl(M * tp);
    ctx_->tp->all_gather_n(tl.data(), all_tl.data(), M);
    const int64_t per_rank = canonical_chunk(V) * (kTMax / tp);
    for (int64_t i = 0; i < M; ++i) {
      const float logit = all_tl[(target[i] / per_rank) * M + i];
      const float z = mx[i] + std::log(sm[i]);  // = log_normalizer
      lp[i] = logit - z;
    }
  }
  std::vector<std::vector<float>> out(seqs.size());
  int64_t next = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const size_t n = seqs[i].empty() ? 0 : seqs[i].size() - 1;
    out[i].assign(lp.begin() + next, lp.begin() + next + int64_t(n));
    next += int64_t(n);
  }
  return out;
}

std::vector<std::vector<float>> Qwen3Moe::score(const std::vector<std::vector<int32_t>>& seqs,
                                                int64_t max_batch_tokens) const {
  const auto& c = weights_.config;
  const ShardLayout& s = ctx_->layout;
  const Topology& topo = s.topo;
  const int64_t H = c.hidden_size;
  for (size_t i = 0; i < seqs.size(); ++i) {
    LS_CHECK(!seqs[i].empty(), "score: sequence ", i, " is empty");
    LS_CHECK(int64_t(seqs[i].size()) <= rope_.max_positions, "score: sequence ", i, " of ", seqs[i].size(),
             " tokens exceeds max_position_embeddings (", rope_.max_positions, ")");
    for (int32_t t : seqs[i])
      LS_CHECK(t >= 0 && t < c.vocab_size, "score: sequence ", i, ": token id ", t,
               " is out of range: the model's vocab_size is ", c.vocab_size);
  }

  // DP: replica d scores the contiguous sequences [n*d/dp, n*(d+1)/dp).
  const size_t n = seqs.size();
  auto replica_begin = [&](int d) { return n * size_t(d) / size_t(topo.dp); };
  const size_t begin = replica_begin(s.coords.dp), end = replica_begin(s.coords.dp + 1);
  // Steps: whole sequences up to the token budget. Under PP the budget is cut so the
  // replica's tokens take about 4 steps per stage: stage s works on step k while stage s + 1
  // works on step k - 1 (a pipelined forward; the bubble is about (pp - 1) / (5 pp - 1) of
  // the time). The steps change no bit (docs/numerics.md, rule 1).
  if (topo.pp > 1) {
    int64_t replica_tokens = 0;
    for (size_t i = begin; i < end; ++i) replica_tokens += int64_t(seqs[i].size());
    const int64_t target_steps = 4 * int64_t(topo.pp);
    max_batch_tokens =
        std::min(max_batch_tokens, std::max<int64_t>(1, (replica_tokens + target_steps - 1) / target_steps));
  }
  const std::vector<std::pair<size_t, size_t>> steps = score_steps(seqs, begin, end, max_batch_tokens);
  // EP groups span DP replicas, so every rank runs the same number of steps (empty ones
  // when its replica has run out).
  int64_t my_steps = int64_t(steps.size());
  std::vector<int64_t> all_steps(ctx_->world->size());
  ctx_->world->all_gather_n(&my_steps, all_steps.data(), 1);
  const int64_t num_steps = *std::max_element(all_steps.begin(), all_steps.end());
  last_score_steps_ = num_steps;

  std::vector<std::vector<float>> replica;  // this replica's results (last stage)
  const ModelConfig cache_cfg = s.local_cache_config(c);
  LayerActivations acts;  // the layers' working buffers, reused
  for (int64_t step = 0; step < num_steps; ++step) {
    const auto [b, e] = step < my_steps ? steps[step] : std::pair<size_t, size_t>{end, end};
    const std::vector<std::vector<int32_t>> batch_seqs(seqs.begin() + b, seqs.begin() + e);
    const PackedSequences packed = pack_sequences(batch_seqs);
    const ForwardBatch& batch = packed.batch;
    KvCache cache(cache_cfg, packed.num_pages, kAttnBlock);
    const int64_t T = batch.size();
    const dist::RowRange rows = ctx_->local_rows(T);
    std::vector<float> x(rows.size() * H);
    if (s.first_stage)
      x = ctx_->embed_rows(batch.tokens.data(), T, weights_.embed.data<float>(), c.vocab_size, H);
    else
      ctx_->pp->recv_n(x.data(), x.size(), s.coords.pp - 1, int(step));
    for (int64_t l = 0; l < s.num_layers; ++l) layer_forward(l, x, batch, cache, &acts);
    if (!s.last_stage) {
      ctx_->pp->send_n(x.data(), x.size(), s.coords.pp + 1, int(step));
    } else {
      auto lp = stage_logprobs(x, batch, batch_seqs);
      for (auto& v : lp) replica.push_back(std::move(v));
    }
  }

  // Gather to world rank 0 in input order: each replica's (tp 0, last stage) rank sends.
  dist::Communicator& world = *ctx_->world;
  const bool holder = s.last_stage && s.coords.tp == 0;
  if (holder && world.rank() != 0) {
    std::vector<float> flat;
    for (const auto& v : replica) flat.insert(flat.end(), v.begin(), v.end());
    world.send_n(flat.data(), flat.size(), 0, kResultTag);
  }
  std::vector<std::vector<float>> result;
  if (world.rank() != 0) return result;
  result.resize(n);
  for (int d = 0; d < topo.dp; ++d) {
    const int src = topo.rank_of(0, d, topo.pp - 1);
    const size_t rb = replica_begin(d), re = replica_begin(d + 1);
    if (src == 0) {
      for (size_t i = rb; i < re; ++i) result[i] = std::move(replica[i - rb]);
      continue;
    }
    size_t total = 0;
    for (size_t i = rb; i < re; ++i) total += seqs[i].size() - 1;
    std::vector<float> flat(total);
    world.recv_n(flat.data(), total, src, kResultTag);
    size_t at = 0;
    for (size_t i = rb; i < re; ++i) {
      result[i].assign(flat.begin() + at, flat.begin() + at + (seqs[i].size() - 1));
      at += seqs[i].size() - 1;
    }
  }
  return result;
}

std::vector<std::vector<float>> score_sequences(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs,
                                                int64_t max_batch_tokens) {
  return model.score(seqs, max_batch_tokens);
}

}  // namespace lockstep
