#include "parallel/parallel_backward.h"

#include <algorithm>
#include <cmath>
#include <deque>

#include "core/error.h"
#include "kernels/canonical.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_backward.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/log_softmax_backward.h"
#include "kernels/cpu/rope.h"
#include "kernels/cpu/rope_backward.h"
#include "parallel/expert_parallel_backward.h"
#include "train/grad_accumulate.h"
#include "train/optimizer.h"

namespace lockstep {

namespace {

constexpr int kGatherTag = 3 << 20;

// The token chunks of a T-token stream restricted to this rank's rows (empty elsewhere:
// their partials are exact zeros, so the 8-chunk tree equals the subtree of its chunks).
cpu::TokenChunks local_chunks(int64_t T, dist::RowRange rows) {
  cpu::TokenChunks c = cpu::token_chunks(T);
  for (auto& r : c.rows) r = std::clamp<int64_t>(r - rows.begin, 0, rows.size());
  return c;
}

// Rows [rows] of a [T, width] array.
std::vector<float> slice_rows(const std::vector<float>& full, dist::RowRange rows, int64_t width) {
  return std::vector<float>(full.begin() + rows.begin * width, full.begin() + rows.end * width);
}

// All-gathers per-rank blocks [T, w_r * D] (w_r heads on rank r, equal on every rank) into
// [T, sum w, D], taking the ranks listed in `from` in that order.
std::vector<float> gather_heads(dist::Communicator& tp, const std::vector<float>& mine, int64_t T, int64_t width,
                                const std::vector<int>& from) {
  std::vector<float> all(mine.size() * tp.size());
  tp.all_gather_n(mine.data(), all.data(), mine.size());
  const int64_t W = width * int64_t(from.size());
  std::vector<float> out(T * W);
  for (int64_t t = 0; t < T; ++t)
    for (size_t i = 0; i < from.size(); ++i)
      std::copy_n(all.data() + from[i] * mine.size() + t * width, width, out.data() + t * W + int64_t(i) * width);
  return out;
}

std::vector<float> head_block(const std::vector<float>& full, int64_t T, int64_t full_width, int64_t begin,
                              int64_t width) {
  std::vector<float> out(T * width);
  for (int64_t t = 0; t < T; ++t) std::copy_n(full.data() + t * full_width + begin, width, out.data() + t * width);
  return out;
}

float* slot(std::map<std::string, Tensor>& g, const std::string& name, const Tensor& param) {
  auto it = g.find(name);
  if (it == g.end()) it = g.emplace(name, Tensor::zeros(param.shape(), DType::f32)).first;
  return it->second.data<float>();
}

// In place: `buf` becomes the pairwise tree over the members of its run of `run`
// consecutive ranks of comm (all-gather, then the tree in rank order).
void run_tree(dist::Communicator& comm, std::vector<float>& buf, int run) {
  if (run <= 1 || buf.empty()) return;
  std::vector<float> all(buf.size() * comm.size());
  comm.all_gather_n(buf.data(), all.data(), buf.size());
  const int first = comm.rank() / run * run;
  dist::pairwise_tree_blocks(all.data() + size_t(first) * buf.size(), run, int64_t(buf.size()));
  std::copy_n(all.data() + size_t(first) * buf.size(), buf.size(), buf.data());
}

// In place: the pairwise tree over the ranks first, first + stride, ... of comm.
void strided_tree(dist::Communicator& comm, std::vector<float>& buf, int stride) {
  const int count = comm.size() / stride;
  if (count <= 1 || buf.empty()) return;
  std::vector<float> all(buf.size() * comm.size()), picked(buf.size() * count);
  comm.all_gather_n(buf.data(), all.data(), buf.size());
  for (int i = 0; i < count; ++i)
    std::copy_n(all.data() + size_t(i * stride) * buf.size(), buf.size(), picked.data() + size_t(i) * buf.size());
  dist::pairwise_tree_blocks(picked.data(), count, int64_t(buf.size()));
  std::copy_n(picked.data(), buf.size(), buf.data());
}

std::vector<float> flatten(const std::map<std::string, Tensor>& m) {
  std::vector<float> out;
  for (const auto& [n, t] : m) out.insert(out.end(), t.data<float>(), t.data<float>() + t.numel());
  return out;
}
void unflatten(const std::vector<float>& flat, std::map<std::string, Tensor>& m) {
  size_t at = 0;
  for (auto& [n, t] : m) {
    std::copy_n(flat.data() + at, t.numel(), t.data<float>());
    at += size_t(t.numel());
  }
}

}  // namespace

struct ParallelGrad::MicroState {
  std::vector<std::vector<int32_t>> seqs;
  std::vector<std::vector<int32_t>> tables;
  ForwardBatch batch;
  int32_t num_pages = 1;
  int64_t T = 0, index = 0;
  dist::RowRange rows;
  std::vector<std::vector<float>> layer_inputs;  // this rank's rows
  std::vector<float> final_in, hidden;           // last stage
  std::vector<float> logits;                     // last stage: [T, this rank's vocab slice]
  std::vector<float> lse, entropy;               // last stage: per token (entropy when asked)
  std::vector<SequenceGradInput> upstream;       // last stage
  std::unique_ptr<KvCache> cache;
};

struct ParallelGrad::Partial {
  std::map<std::string, Tensor> dense;
  std::vector<std::map<std::string, Tensor>> expert;  // per source replica of the expert span
};

ParallelGrad::ParallelGrad(ParallelQwen3Moe& model) : model_(model) {
  const ParallelContext& ctx = model.context();
  LS_CHECK(!model.config().tie_word_embeddings,
           "parallel backward: tied word embeddings are not supported under a topology yet");
  edp_ = make_group(*ctx.world, ctx.layout.topo, GroupKind::EDP);
}

void ParallelGrad::prepare(MicroState& m, int64_t index) const {
  const ParallelContext& ctx = model_.context();
  const auto& c = model_.config();
  m.index = index;
  m.tables.resize(m.seqs.size());
  int32_t next_page = 0;
  for (size_t i = 0; i < m.seqs.size(); ++i) {
    const int64_t n = int64_t(m.seqs[i].size());
    LS_CHECK(n >= 1 && n <= c.max_position_embeddings, "parallel backward: sequence ", i, " has ", n,
             " tokens (expected 1..", c.max_position_embeddings, ")");
    for (int64_t p = 0; p < (n + kAttnBlock - 1) / kAttnBlock; ++p) m.tables[i].push_back(next_page++);
  }
  m.num_pages = std::max<int32_t>(next_page, 1);
  for (size_t i = 0; i < m.seqs.size(); ++i)
    for (size_t t = 0; t < m.seqs[i].size(); ++t) {
      m.batch.tokens.push_back(m.seqs[i][t]);
      m.batch.positions.push_back(int32_t(t));
      m.batch.page_tables.push_back(m.tables[i].data());
    }
  m.T = m.batch.size();
  m.rows = ctx.local_rows(m.T);
}

std::vector<float> ParallelGrad::forward(MicroState& m, std::vector<float> x, bool want_entropy,
                                         const UpstreamFn& upstream) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const auto& c = model_.config();
  const ModelWeights& W = model_.local_weights();
  const bool bf16 = model_.precision() == Precision::bfloat16;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const int64_t T = m.T, R = m.rows.size();
  m.cache = std::make_unique<KvCache>(s.local_cache_config(c), m.num_pages, kAttnBlock);
  if (s.first_stage) x = ctx.embed_rows(m.batch.tokens.data(), T, W.embed.data<float>(), V, H);
  LS_CHECK(int64_t(x.size()) == R * H, "parallel backward: stage input of micro-batch ", m.index, " has ", x.size(),
           " values, expected ", R * H);
  for (int64_t l = 0; l < s.num_layers; ++l) {
    m.layer_inputs.push_back(x);
    model_.layer_forward(l, x, m.batch, *m.cache);
  }
  // No K/V is kept past the forward: the backward recomputes it in a fresh cache.
  m.cache.reset();
  if (!s.last_stage) return x;
  // Head, vocab-parallel: each TP rank keeps the logits of its vocab slice (whole canonical
  // chunks); the log-normaliser, the target logit and the entropy's chunk leaves are
  // completed across TP by the single-rank trees, so every number is the single-rank one.
  m.final_in = x;
  std::vector<float> normed(R * H);
  cpu::rmsnorm(x.data(), W.final_norm.data<float>(), normed.data(), R, H, float(c.rms_norm_eps), bf16);
  if (bf16) cpu::round_to_bf16(normed.data(), R * H);
  m.hidden = ctx.gather_rows(normed, T, H);
  const int64_t VL = s.vocab.size();
  m.logits.assign(T * VL, 0.0f);
  cpu::linear(m.hidden.data(), W.lm_head.data<float>(), m.logits.data(), T, VL, H);
  head_normalizers(m);
  if (want_entropy) head_entropy(m);
  // Per-token log-probs: the target's logit (from the rank whose slice holds it) minus the
  // row's log-normaliser, as log_softmax_gather.
  std::vector<float> target_logit(T, 0.0f);
  std::vector<int32_t> targets(T, -1);
  int64_t offset = 0;
  for (const auto& seq : m.seqs) {
    for (size_t t = 0; t + 1 < seq.size(); ++t) targets[offset + int64_t(t)] = seq[t + 1];
    offset += int64_t(seq.size());
  }
  for (int64_t t = 0; t < T; ++t)
    if (targets[t] >= s.vocab.begin && targets[t] < s.vocab.end)
      target_logit[t] = m.logits[t * VL + (targets[t] - s.vocab.begin)];
  if (s.topo.tp > 1) {
    std::vector<float> all(size_t(T) * s.topo.tp);
    ctx.tp->all_gather_n(target_logit.data(), all.data(), size_t(T));
    for (int64_t t = 0; t < T; ++t)
      if (targets[t] >= 0) {
        int owner = 0;
        while (!(targets[t] < chunk_range(V, s.topo.tp, owner).end)) ++owner;
        target_logit[t] = all[size_t(owner) * T + t];
      }
  }
  std::vector<std::vector<float>> lp(m.seqs.size()), ent(want_entropy ? m.seqs.size() : 0);
  offset = 0;
  for (size_t i = 0; i < m.seqs.size(); ++i) {
    const int64_t n = int64_t(m.seqs[i].size());
    lp[i].resize(n - 1);
    for (int64_t t = 0; t + 1 < n; ++t) lp[i][t] = target_logit[offset + t] - m.lse[offset + t];
    if (want_entropy) ent[i].assign(m.entropy.begin() + offset, m.entropy.begin() + offset + (n - 1));
    offset += n;
  }
  m.upstream = upstream(m.index, lp, ent);
  LS_CHECK(m.upstream.size() == m.seqs.size(), "parallel backward: ", m.upstream.size(),
           " upstream gradients for ", m.seqs.size(), " sequences");
  return {};
}

void ParallelGrad::head_normalizers(MicroState& m) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const int64_t T = m.T, V = model_.config().vocab_size, VL = s.vocab.size();
  const int tp = s.topo.tp;
  m.lse.assign(T, 0.0f);
  if (tp == 1) {
    for (int64_t t = 0; t < T; ++t) m.lse[t] = cpu::log_normalizer(m.logits.data() + t * VL, V);
    return;
  }
  // This rank's subtree of (max, sum) over its chunks, completed over TP (as the score path).
  std::vector<float> mx(T), sm(T);
  for (int64_t t = 0; t < T; ++t) {
    const MaxSum ms = cpu::vocab_subtree(m.logits.data() + t * VL, VL, canonical_chunk(V), kTMax / tp);
    mx[t] = ms.max;
    sm[t] = ms.sum;
  }
  dist::canonical_all_reduce_maxsum(*ctx.tp, mx.data(), sm.data(), T);
  for (int64_t t = 0; t < T; ++t) m.lse[t] = mx[t] + std::log(sm[t]);
}

void ParallelGrad::head_entropy(MicroState& m) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const int64_t T = m.T, V = model_.config().vocab_size, VL = s.vocab.size();
  const int tp = s.topo.tp, per = kTMax / tp;
  // The 8 chunk leaves of softmax_entropy's tree: this rank's, then all-gathered over TP.
  std::vector<float> mine(T * per), all(size_t(T) * kTMax);
  cpu::softmax_entropy_parts(m.logits.data(), m.lse.data(), mine.data(), T, V, VL, s.coords.tp * per, per);
  if (tp > 1)
    ctx.tp->all_gather_n(mine.data(), all.data(), mine.size());
  else
    all = mine;
  m.entropy.assign(T, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    float parts[kTMax];
    for (int r = 0; r < tp; ++r)
      for (int i = 0; i < per; ++i) parts[r * per + i] = all[(size_t(r) * T + t) * per + i];
    m.entropy[t] = -tree8(parts);
  }
}

std::vector<float> ParallelGrad::backward(MicroState& m, std::vector<float> dy, Partial& g) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const auto& c = model_.config();
  const ModelWeights& W = model_.local_weights();
  const bool bf16 = model_.precision() == Precision::bfloat16;
  const int64_t T = m.T, H = c.hidden_size, V = c.vocab_size, R = m.rows.size();
  const int tp = s.topo.tp;
  const cpu::TokenChunks chunks = cpu::token_chunks(T);
  std::vector<float> dx(R * H);
  if (s.last_stage) {
    std::vector<float> dlogp(T, 0.0f), dent(T, 0.0f), entropy(T, 0.0f);
    std::vector<int32_t> targets(T, 0);
    bool any_entropy = false;
    int64_t offset = 0;
    for (size_t i = 0; i < m.seqs.size(); ++i) {
      const auto& seq = m.seqs[i];
      const size_t n = seq.size() - 1;
      const auto& up = m.upstream[i];
      LS_CHECK(up.dlogp.size() == n && (up.dentropy.empty() || up.dentropy.size() == n),
               "parallel backward: sequence ", i, " has ", n, " predicted tokens but its upstream has ",
               up.dlogp.size(), " dlogp and ", up.dentropy.size(), " dentropy values");
      for (size_t t = 0; t < n; ++t) {
        targets[offset + t] = seq[t + 1];
        dlogp[offset + t] = up.dlogp[t];
        if (!up.dentropy.empty()) dent[offset + t] = up.dentropy[t], any_entropy = true;
      }
      offset += int64_t(seq.size());
    }
    if (any_entropy && m.entropy.empty()) head_entropy(m);
    if (any_entropy) entropy = m.entropy;
    const int64_t VL = s.vocab.size();
    std::vector<float> dl(T * VL);
    cpu::log_softmax_gather_backward_slice(m.logits.data(), m.lse.data(), targets.data(), dlogp.data(),
                                           any_entropy ? dent.data() : nullptr, any_entropy ? entropy.data() : nullptr,
                                           dl.data(), T, s.vocab.begin, VL);
    m.logits = {};
    cpu::linear_weight_grad(dl.data(), m.hidden.data(), slot(g.dense, "lm_head.weight", W.lm_head), VL, H, chunks);
    std::vector<float> dhidden(T * H);
    cpu::linear_input_grad_canonical(dl.data(), W.lm_head.data<float>(), dhidden.data(), T, VL, H,
                                     canonical_chunk(V), kTMax / tp);
    if (tp > 1) dist::canonical_all_reduce(*ctx.tp, dhidden.data(), T * H);
    const std::vector<float> dh_local = slice_rows(dhidden, m.rows, H);
    float* dw = slot(g.dense, "model.norm.weight", W.final_norm);
    cpu::rmsnorm_backward(m.final_in.data(), W.final_norm.data<float>(), dh_local.data(), dx.data(), dw, R, H,
                          float(c.rms_norm_eps), bf16, local_chunks(T, m.rows));
    if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, dw, H);
  } else {
    LS_CHECK(dy.size() == dx.size(), "parallel backward: stage output gradient of micro-batch ", m.index, " has ",
             dy.size(), " values, expected ", dx.size());
    dx = std::move(dy);
  }
  // The backward re-writes each layer's K/V as it recomputes: a fresh cache.
  m.cache = std::make_unique<KvCache>(s.local_cache_config(c), m.num_pages, kAttnBlock);
  for (int64_t l = s.num_layers - 1; l >= 0; --l) layer_backward(l, m, dx, g);
  if (s.first_stage) {
    const std::vector<float> dfull = ctx.gather_rows(dx, T, H);
    cpu::embedding_backward_rows(m.batch.tokens.data(), dfull.data(),
                                 slot(g.dense, "model.embed_tokens.weight", W.embed), T, V, s.vocab.begin,
                                 s.vocab.size(), H);
    return {};
  }
  return dx;
}

void ParallelGrad::layer_backward(int64_t l, MicroState& m, std::vector<float>& dx, Partial& g) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const auto& c = model_.config();
  const LayerWeights& L = model_.local_weights().layers.at(l);
  const bool bf16 = model_.precision() == Precision::bfloat16;
  auto cast = [&](std::vector<float>& v) {
    if (bf16) cpu::round_to_bf16(v.data(), int64_t(v.size()));
  };
  const int64_t T = m.T, H = c.hidden_size, D = c.head_dim, R = m.rows.size();
  const int64_t nq = s.q_heads, nkv = s.kv_heads, qd = nq * D, kd = nkv * D;
  const int tp = s.topo.tp;
  const float eps = float(c.rms_norm_eps);
  const cpu::TokenChunks chunks = cpu::token_chunks(T), mine = local_chunks(T, m.rows);
  const std::string p = "model.layers." + std::to_string(s.first_layer + l) + ".";
  const std::vector<float>& x_in = m.layer_inputs[l];

  // ---- Recompute the layer's internals (ParallelQwen3Moe::attention/mlp, same kernels).
  std::vector<float> h(R * H);
  cpu::rmsnorm(x_in.data(), L.input_norm.data<float>(), h.data(), R, H, eps, bf16);
  cast(h);
  const std::vector<float> hf = ctx.gather_rows(h, T, H);
  std::vector<float> q(T * qd), k(T * kd), v(T * kd), attn(T * qd);
  cpu::linear(hf.data(), L.q_proj.data<float>(), q.data(), T, qd, H);
  cpu::linear(hf.data(), L.k_proj.data<float>(), k.data(), T, kd, H);
  cpu::linear(hf.data(), L.v_proj.data<float>(), v.data(), T, kd, H);
  cast(q), cast(k), cast(v);
  const std::vector<float> q_proj = q, k_proj = k;
  cpu::rmsnorm(q.data(), L.q_norm.data<float>(), q.data(), T * nq, D, eps, bf16);
  cpu::rmsnorm(k.data(), L.k_norm.data<float>(), k.data(), T * nkv, D, eps, bf16);
  cast(q), cast(k);
  cpu::rope(q.data(), m.batch.positions.data(), T, nq, model_.rope_table());
  cpu::rope(k.data(), m.batch.positions.data(), T, nkv, model_.rope_table());
  cast(q), cast(k);
  PagedKvLayer kv = m.cache->layer(l);
  TokenSlots slots{m.batch.positions.data(), m.batch.page_tables.data()};
  cpu::kv_write(kv, slots, k.data(), v.data(), T);
  const float scale = 1.0f / std::sqrt(float(D));
  cpu::paged_attention(q.data(), attn.data(), kv, slots, T, nq, scale);
  cast(attn);
  std::vector<float> o(T * H);
  cpu::linear_row_canonical(attn.data(), L.o_proj.data<float>(), o.data(), T, H, qd, canonical_chunk(c.q_dim()),
                            kTMax / tp);
  o = ctx.reduce_rows(std::move(o), T, H);
  cast(o);
  std::vector<float> mid = x_in;
  cpu::add_inplace(mid.data(), o.data(), R * H);
  cast(mid);
  std::vector<float> hm(R * H);
  cpu::rmsnorm(mid.data(), L.post_attention_norm.data<float>(), hm.data(), R, H, eps, bf16);
  cast(hm);

  // ---- MLP block: out = mid + mlp(norm(mid)); dx is d(out) on this rank's rows.
  std::vector<float> dh(R * H), dnorm(R * H);
  if (L.is_moe) {
    float* drouter = slot(g.dense, p + "mlp.gate.weight", L.router);
    const int64_t cols = s.expert_cols.size();
    const Shape gshape{cols, H}, dshape{H, cols};
    auto expert_grad = [&](int64_t j, int d, int which) {
      const std::string name = p + "mlp.experts." + std::to_string(s.expert_begin + j) + "." +
                               (which == 0 ? "gate_proj.weight" : which == 1 ? "up_proj.weight" : "down_proj.weight");
      auto& map = g.expert.at(d);
      auto it = map.find(name);
      if (it == map.end()) it = map.emplace(name, Tensor::zeros(which == 2 ? dshape : gshape, DType::f32)).first;
      return it->second.data<float>();
    };
    expert_parallel_moe_backward(ctx, L, c, hm.data(), dx.data(), R, T, m.rows.begin, bf16, dh.data(), drouter,
                                 expert_grad);
    if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, drouter, c.num_experts * H);
  } else {
    const int64_t cols = s.dense_cols.size(), I = c.intermediate_size;
    const std::vector<float> hmf = ctx.gather_rows(hm, T, H), dout = ctx.gather_rows(dx, T, H);
    std::vector<float> gate(T * cols), up(T * cols), act(T * cols), dact(T * cols), dg(T * cols), du(T * cols);
    cpu::linear(hmf.data(), L.dense.gate.data<float>(), gate.data(), T, cols, H);
    cpu::linear(hmf.data(), L.dense.up.data<float>(), up.data(), T, cols, H);
    cast(gate), cast(up);
    cpu::swiglu(gate.data(), up.data(), act.data(), T * cols);
    cast(act);
    cpu::linear_weight_grad(dout.data(), act.data(), slot(g.dense, p + "mlp.down_proj.weight", L.dense.down), H, cols,
                            chunks);
    cpu::linear_input_grad(dout.data(), L.dense.down.data<float>(), dact.data(), T, H, cols);
    cpu::swiglu_backward(gate.data(), up.data(), dact.data(), dg.data(), du.data(), T * cols);
    cpu::linear_weight_grad(dg.data(), hmf.data(), slot(g.dense, p + "mlp.gate_proj.weight", L.dense.gate), cols, H,
                            chunks);
    cpu::linear_weight_grad(du.data(), hmf.data(), slot(g.dense, p + "mlp.up_proj.weight", L.dense.up), cols, H,
                            chunks);
    std::vector<float> gx(T * H), ux(T * H);
    cpu::linear_input_grad_canonical(dg.data(), L.dense.gate.data<float>(), gx.data(), T, cols, H,
                                     canonical_chunk(I), kTMax / tp);
    cpu::linear_input_grad_canonical(du.data(), L.dense.up.data<float>(), ux.data(), T, cols, H, canonical_chunk(I),
                                     kTMax / tp);
    if (tp > 1) {
      dist::canonical_all_reduce(*ctx.tp, gx.data(), T * H);
      dist::canonical_all_reduce(*ctx.tp, ux.data(), T * H);
    }
    cpu::add_inplace(gx.data(), ux.data(), T * H);
    dh = slice_rows(gx, m.rows, H);
  }
  float* dw_post = slot(g.dense, p + "post_attention_layernorm.weight", L.post_attention_norm);
  cpu::rmsnorm_backward(mid.data(), L.post_attention_norm.data<float>(), dh.data(), dnorm.data(), dw_post, R, H, eps,
                        bf16, mine);
  if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, dw_post, H);
  cpu::add_inplace(dx.data(), dnorm.data(), R * H);  // d(mid)

  // ---- Attention block.
  const std::vector<float> dmid = ctx.gather_rows(dx, T, H);
  std::vector<float> dattn(T * qd), dq(T * qd), dk(T * kd), dv(T * kd);
  cpu::linear_weight_grad(dmid.data(), attn.data(), slot(g.dense, p + "self_attn.o_proj.weight", L.o_proj), H, qd,
                          chunks);
  cpu::linear_input_grad(dmid.data(), L.o_proj.data<float>(), dattn.data(), T, H, qd);
  const int64_t nq_all = c.num_attention_heads, nkv_all = c.num_key_value_heads;
  const bool kv_replicated = tp > nkv_all;
  const int rep = kv_replicated ? int(tp / nkv_all) : 1;  // TP ranks per KV head
  if (!kv_replicated) {
    cpu::paged_attention_backward(q.data(), attn.data(), dattn.data(), kv, slots, T, nq, scale, dq.data(), dk.data(),
                                  dv.data());
  } else {
    // The query heads of this KV head live on `rep` ranks: gather them, run the group's
    // backward (the per-key sums walk (query, head) in the single-rank order), keep ours.
    std::vector<int> group;
    const int first = s.coords.tp / rep * rep;
    for (int r = first; r < first + rep; ++r) group.push_back(r);
    const int64_t gh = nq * rep;
    const auto gq = gather_heads(*ctx.tp, q, T, qd, group), ga = gather_heads(*ctx.tp, attn, T, qd, group),
               gd = gather_heads(*ctx.tp, dattn, T, qd, group);
    std::vector<float> gdq(T * gh * D);
    cpu::paged_attention_backward(gq.data(), ga.data(), gd.data(), kv, slots, T, gh, scale, gdq.data(), dk.data(),
                                  dv.data());
    dq = head_block(gdq, T, gh * D, (s.coords.tp - first) * qd, qd);
  }
  cpu::rope_backward(dq.data(), m.batch.positions.data(), T, nq, model_.rope_table());
  cpu::rope_backward(dk.data(), m.batch.positions.data(), T, nkv, model_.rope_table());
  // q/k-norm weights are shared by all heads: their token-chunk tree walks (token, head)
  // over every head, so it runs on the gathered heads (the same on every TP rank).
  std::vector<float> dq_proj(T * qd), dk_proj(T * kd);
  float* dqn = slot(g.dense, p + "self_attn.q_norm.weight", L.q_norm);
  float* dkn = slot(g.dense, p + "self_attn.k_norm.weight", L.k_norm);
  if (tp == 1) {
    cpu::rmsnorm_backward(q_proj.data(), L.q_norm.data<float>(), dq.data(), dq_proj.data(), dqn, T * nq, D, eps, bf16,
                          cpu::token_chunks(T, nq));
    cpu::rmsnorm_backward(k_proj.data(), L.k_norm.data<float>(), dk.data(), dk_proj.data(), dkn, T * nkv, D, eps,
                          bf16, cpu::token_chunks(T, nkv));
  } else {
    std::vector<int> all(tp), kv_holders;
    for (int r = 0; r < tp; ++r) all[r] = r;
    for (int r = 0; r < tp; r += rep) kv_holders.push_back(r);
    const auto fq = gather_heads(*ctx.tp, q_proj, T, qd, all), fdq = gather_heads(*ctx.tp, dq, T, qd, all);
    std::vector<float> fdq_proj(T * nq_all * D);
    cpu::rmsnorm_backward(fq.data(), L.q_norm.data<float>(), fdq.data(), fdq_proj.data(), dqn, T * nq_all, D, eps,
                          bf16, cpu::token_chunks(T, nq_all));
    dq_proj = head_block(fdq_proj, T, nq_all * D, s.q_head_begin * D, qd);
    const auto fk = gather_heads(*ctx.tp, k_proj, T, kd, kv_holders), fdk = gather_heads(*ctx.tp, dk, T, kd, kv_holders);
    std::vector<float> fdk_proj(T * nkv_all * D);
    cpu::rmsnorm_backward(fk.data(), L.k_norm.data<float>(), fdk.data(), fdk_proj.data(), dkn, T * nkv_all, D, eps,
                          bf16, cpu::token_chunks(T, nkv_all));
    dk_proj = head_block(fdk_proj, T, nkv_all * D, s.kv_head_begin * D, kd);
  }
  cpu::linear_weight_grad(dq_proj.data(), hf.data(), slot(g.dense, p + "self_attn.q_proj.weight", L.q_proj), qd, H,
                          chunks);
  cpu::linear_weight_grad(dk_proj.data(), hf.data(), slot(g.dense, p + "self_attn.k_proj.weight", L.k_proj), kd, H,
                          chunks);
  cpu::linear_weight_grad(dv.data(), hf.data(), slot(g.dense, p + "self_attn.v_proj.weight", L.v_proj), kd, H,
                          chunks);
  // d(norm output) = q part + k part + v part, each canonical over its N (rank subtrees
  // completed over TP; a replicated KV head counts on its first holder only).
  std::vector<float> dhf(T * H), part(T * H);
  cpu::linear_input_grad_canonical(dq_proj.data(), L.q_proj.data<float>(), dhf.data(), T, qd, H,
                                   canonical_chunk(c.q_dim()), kTMax / tp);
  if (tp > 1) dist::canonical_all_reduce(*ctx.tp, dhf.data(), T * H);
  const int kv_parts = kv_replicated ? int(nkv_all) : tp;
  const bool kv_counts = s.coords.tp % rep == 0;
  for (int which = 0; which < 2; ++which) {
    const float* dy = which == 0 ? dk_proj.data() : dv.data();
    const float* w = which == 0 ? L.k_proj.data<float>() : L.v_proj.data<float>();
    if (kv_counts)
      cpu::linear_input_grad_canonical(dy, w, part.data(), T, kd, H, canonical_chunk(nkv_all * D), kTMax / kv_parts);
    else
      std::fill(part.begin(), part.end(), 0.0f);
    if (tp > 1) dist::canonical_all_reduce(*ctx.tp, part.data(), T * H);
    cpu::add_inplace(dhf.data(), part.data(), T * H);
  }
  const std::vector<float> dh_in = slice_rows(dhf, m.rows, H);
  float* dw_in = slot(g.dense, p + "input_layernorm.weight", L.input_norm);
  cpu::rmsnorm_backward(x_in.data(), L.input_norm.data<float>(), dh_in.data(), dnorm.data(), dw_in, R, H, eps, bf16,
                        mine);
  if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, dw_in, H);
  cpu::add_inplace(dx.data(), dnorm.data(), R * H);
}

void ParallelGrad::run_one_f_one_b(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                                   const std::function<std::vector<float>(int64_t, std::vector<float>)>& run_forward,
                                   const std::function<std::vector<float>(std::vector<float>)>& run_backward) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const int64_t J = int64_t(micro_batches.size()), H = model_.config().hidden_size;
  const int stages = s.topo.pp, stage = s.coords.pp, prev = stage - 1, next = stage + 1;
  // A stage boundary tensor of micro-batch j: this rank's rows of its tokens (the peer
  // stage's rank with the same TP and DP coordinates holds the same rows).
  auto boundary_size = [&](int64_t j) {
    int64_t T = 0;
    for (const auto& seq : micro_batches[j]) T += int64_t(seq.size());
    return size_t(ctx.local_rows(T).size() * H);
  };
  auto fwd_tag = [](int64_t j) { return int(2 * j); };
  auto bwd_tag = [](int64_t j) { return int(2 * j + 1); };
  auto recv_from = [&](int peer, int64_t j, int tag) {
    std::vector<float> buf(boundary_size(j));
    ctx.pp->recv_n(buf.data(), buf.size(), peer, tag);
    return buf;
  };
  // Warm-up: stage s runs stages - s - 1 forwards ahead of its first backward, so every
  // stage has a micro-batch in flight when the last stage starts backward.
  const int64_t warm = std::min<int64_t>(stages - stage - 1, J), steady = J - warm;
  for (int64_t j = 0; j < warm; ++j) {
    std::vector<float> y = run_forward(j, s.first_stage ? std::vector<float>{} : recv_from(prev, j, fwd_tag(j)));
    ctx.pp->send_n(y.data(), y.size(), next, fwd_tag(j));
  }
  std::vector<float> x;
  if (steady > 0 && !s.first_stage) x = recv_from(prev, warm, fwd_tag(warm));
  // Steady state, one forward then one backward: the output of forward j goes down while
  // the gradient of the oldest micro-batch i comes back (one exchange with the next
  // stage), then the gradient of i goes up while the input of forward j + 1 arrives.
  for (int64_t i = 0; i < steady; ++i) {
    const int64_t j = warm + i;
    std::vector<float> y = run_forward(j, std::move(x)), dy;
    if (!s.last_stage) {
      dy.resize(boundary_size(i));
      ctx.pp->send_recv(y.data(), y.size() * sizeof(float), fwd_tag(j), dy.data(), dy.size() * sizeof(float),
                        bwd_tag(i), next);
    }
    std::vector<float> dx = run_backward(std::move(dy));
    x.clear();
    if (s.first_stage) continue;
    if (i + 1 == steady) {
      ctx.pp->send_n(dx.data(), dx.size(), prev, bwd_tag(i));
    } else {
      x.resize(boundary_size(j + 1));
      ctx.pp->send_recv(dx.data(), dx.size() * sizeof(float), bwd_tag(i), x.data(), x.size() * sizeof(float),
                        fwd_tag(j + 1), prev);
    }
  }
  // Cool-down: the backwards of the warm-up micro-batches.
  for (int64_t i = steady; i < J; ++i) {
    std::vector<float> dx = run_backward(s.last_stage ? std::vector<float>{} : recv_from(next, i, bwd_tag(i)));
    if (!s.first_stage) ctx.pp->send_n(dx.data(), dx.size(), prev, bwd_tag(i));
  }
}

std::map<std::string, Tensor> ParallelGrad::step_grads(
    const std::vector<std::vector<std::vector<int32_t>>>& micro_batches, bool want_entropy,
    const UpstreamFn& upstream) {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const Topology& topo = s.topo;
  const int64_t J = int64_t(micro_batches.size());
  std::vector<int64_t> all_j(ctx.world->size());
  ctx.world->all_gather_n(&J, all_j.data(), 1);
  for (int64_t n : all_j)
    LS_CHECK(n == J, "parallel backward: every DP replica must run the same number of micro-batches (", J, " vs ",
             n, ")");
  LS_CHECK(J >= 1, "parallel backward: no micro-batches");
  const ExpertSpan span = expert_span(s);
  LS_CHECK((topo.dp == 1 && span.count == 1) || is_power_of_two(J), "parallel backward: ", J,
           " micro-batches per DP replica: with dp > 1 it must be a power of two (the micro-batch tree)");
  const int64_t block = int64_t(topo.etp) * topo.ep;
  const int same_dp_run = block < topo.tp ? int(topo.tp / block) : 1;  // EDP members sharing a replica

  PairwiseGradAccumulator dense_acc(J);
  std::vector<PairwiseGradAccumulator> expert_acc;
  for (int d = 0; d < span.count; ++d) expert_acc.emplace_back(J);
  // The backward always takes the oldest micro-batch in flight: gradients join the trees
  // in micro-batch order, the order of the single-rank sum, whatever the schedule.
  std::deque<MicroState> in_flight;
  peak_in_flight_ = 0;
  auto run_forward = [&](int64_t j, std::vector<float> x) {
    MicroState& m = in_flight.emplace_back();
    m.seqs = micro_batches[j];
    prepare(m, j);
    peak_in_flight_ = std::max<int64_t>(peak_in_flight_, int64_t(in_flight.size()));
    return forward(m, std::move(x), want_entropy, upstream);
  };
  auto run_backward = [&](std::vector<float> dy) {
    Partial g;
    g.expert.resize(span.count);
    std::vector<float> dx = backward(in_flight.front(), std::move(dy), g);
    in_flight.pop_front();
    for (auto& e : g.expert) {
      // Experts' token trees of one replica's micro-batch split over EDP members (SP
      // chunks, or TP copies that count as zero): complete them before the micro-batch sum.
      std::vector<float> flat = flatten(e);
      run_tree(*edp_, flat, same_dp_run);
      unflatten(flat, e);
    }
    dense_acc.push(std::move(g.dense));
    for (int d = 0; d < span.count; ++d) expert_acc[d].push(std::move(g.expert[d]));
    return dx;
  };
  run_one_f_one_b(micro_batches, run_forward, run_backward);
  std::map<std::string, Tensor> dense = dense_acc.finish();
  if (topo.dp > 1) {
    std::vector<float> flat = flatten(dense);
    dist::tree_all_reduce(*ctx.dp, flat.data(), int64_t(flat.size()));
    unflatten(flat, dense);
  }
  // Experts: the micro-batch tree over the span's replicas, then across EDP runs.
  std::vector<std::vector<float>> per_d;
  std::map<std::string, Tensor> experts;
  for (int d = 0; d < span.count; ++d) {
    auto e = expert_acc[d].finish();
    per_d.push_back(flatten(e));
    if (d == 0) experts = std::move(e);
  }
  if (!per_d.empty() && !per_d[0].empty()) {
    std::vector<float> blocks;
    for (auto& v : per_d) blocks.insert(blocks.end(), v.begin(), v.end());
    dist::pairwise_tree_blocks(blocks.data(), span.count, int64_t(per_d[0].size()));
    blocks.resize(per_d[0].size());
    strided_tree(*edp_, blocks, same_dp_run);
    unflatten(blocks, experts);
  } else {
    std::vector<float> none;
    strided_tree(*edp_, none, same_dp_run);
  }
  for (auto& [n, t] : experts) dense.emplace(n, std::move(t));
  return dense;
}

std::vector<std::pair<std::string, Tensor*>> local_named(ModelWeights& local, const ShardLayout& layout) {
  const auto pieces = rank_pieces(local.config, layout);
  std::vector<std::pair<std::string, Tensor*>> out;
  // rank_pieces lists pieces in the order of the weights' fields (shard_plan.cpp).
  size_t i = 0;
  auto add = [&](Tensor& t) { out.push_back({pieces.at(i++).name, &t}); };
  if (layout.first_stage) add(local.embed);
  if (layout.last_stage) add(local.final_norm), add(local.lm_head);
  for (auto& L : local.layers) {
    add(L.input_norm), add(L.post_attention_norm), add(L.q_proj), add(L.k_proj), add(L.v_proj), add(L.o_proj);
    add(L.q_norm), add(L.k_norm);
    if (L.is_moe) {
      add(L.router);
      for (auto& e : L.experts) add(e.gate), add(e.up), add(e.down);
    } else {
      add(L.dense.gate), add(L.dense.up), add(L.dense.down);
    }
  }
  LS_CHECK(i == pieces.size(), "local_named: ", i, " tensors for ", pieces.size(), " pieces");
  return out;
}

std::map<std::string, Tensor> gather_full(dist::Communicator& world, const ModelConfig& cfg, const ShardLayout& layout,
                                          const std::map<std::string, Tensor>& local) {
  // Each (name, box) is sent once, by the lowest rank that holds it.
  const int W = world.size();
  std::vector<std::vector<ShardPiece>> pieces(W);
  for (int r = 0; r < W; ++r)
    pieces[r] = rank_pieces(cfg, ShardLayout::make(cfg, layout.topo, layout.layer_split, r));
  auto first_holder = [&](const ShardPiece& piece) {
    for (int r = 0; r < W; ++r)
      for (const auto& q : pieces[r])
        if (q.name == piece.name && q.box == piece.box) return r;
    return -1;
  };
  const int me = world.rank();
  if (me != 0) {
    for (const auto& piece : pieces[me])
      if (first_holder(piece) == me) {
        const Tensor& t = local.at(piece.name);
        world.send_n(t.data<float>(), size_t(t.numel()), 0, kGatherTag);
      }
    return {};
  }
  std::map<std::string, Tensor> full;
  for (const auto& [name, shape] : ModelWeights::expected_shapes(cfg)) full.emplace(name, Tensor::zeros(shape, DType::f32));
  for (int r = 0; r < W; ++r)
    for (const auto& piece : pieces[r]) {
      if (first_holder(piece) != r) continue;
      Tensor part = Tensor::zeros(box_shape(piece.box), DType::f32);
      if (r == 0)
        part = local.at(piece.name);
      else
        world.recv_n(part.data<float>(), size_t(part.numel()), r, kGatherTag);
      Tensor& dst = full.at(piece.name);
      copy_intersection(part, piece.box, dst, full_box(dst.shape()));
    }
  return full;
}

float parallel_grad_norm(dist::Communicator& world, const ModelConfig& cfg, const ShardLayout& layout,
                         const std::map<std::string, Tensor>& local) {
  auto full = gather_full(world, cfg, layout, local);
  float norm = world.rank() == 0 ? global_grad_norm(full) : 0.0f;
  world.broadcast_n(&norm, 1, 0);
  return norm;
}

}  // namespace lockstep
