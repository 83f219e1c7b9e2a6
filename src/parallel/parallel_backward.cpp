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
#include "train/layer_backward.h"
#include "train/optimizer.h"

namespace lockstep {

namespace {

constexpr int kGatherTag = 3 << 20;

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
  PackedSequences packed;
  int64_t T = 0, index = 0;
  dist::RowRange rows;
  std::vector<std::vector<float>> layer_inputs;  // this rank's rows
  std::vector<float> final_in, hidden;           // last stage
  std::vector<float> logits;                     // last stage: [T, this rank's vocab slice]
  std::vector<float> lse, entropy;               // last stage: per token (entropy when asked)
  std::vector<SequenceGradInput> upstream;       // last stage
  std::unique_ptr<KvCache> cache;
};

// One micro-batch's gradients on this rank, in the structure of its weights. An expert's
// gradient is kept per source replica of the expert span (the micro-batch tree is per
// source), so `grads` holds no experts.
struct ParallelGrad::Partial {
  ModelWeights grads;
  std::vector<std::vector<std::vector<ExpertWeights>>> experts;  // [source replica][local layer][local expert]

  Partial(const ModelWeights& weights, int sources) : grads(weights.zeros_like()), experts(sources) {
    for (int d = 0; d < sources; ++d)
      for (const LayerWeights& L : grads.layers) {
        auto& layer = experts[d].emplace_back();
        for (const ExpertWeights& e : L.experts) layer.push_back({e.gate.clone(), e.up.clone(), e.down.clone()});
      }
    for (LayerWeights& L : grads.layers) L.experts.clear();
  }
  // By global name (the names table), as the micro-batch accumulators sum them.
  GradMap named(const ShardLayout& s) {
    GradMap m;
    for_each_param(
        grads, [&](const ParamSlot& slot, Tensor& t) { m.emplace(param_name(grads.config, slot), t); }, s.scope());
    return m;
  }
  GradMap named_experts(const ShardLayout& s, int d) {
    GradMap m;
    for (size_t l = 0; l < experts[d].size(); ++l)
      for (size_t j = 0; j < experts[d][l].size(); ++j) {
        const int64_t layer = s.first_layer + int64_t(l), expert = s.expert_begin + int64_t(j);
        ExpertWeights& e = experts[d][l][j];
        m.emplace(param_name(grads.config, {ParamKind::expert_gate, layer, expert}), e.gate);
        m.emplace(param_name(grads.config, {ParamKind::expert_up, layer, expert}), e.up);
        m.emplace(param_name(grads.config, {ParamKind::expert_down, layer, expert}), e.down);
      }
    return m;
  }
};

ParallelGrad::ParallelGrad(const Qwen3Moe& model) : model_(model) {
  const ParallelContext& ctx = model.context();
  LS_CHECK(!model.config().tie_word_embeddings || tied_on_one_stage(model.config(), ctx.layout),
           "parallel backward: tied word embeddings need the embedding and lm_head on one stage (pipeline size 1)");
  edp_ = make_group(*ctx.world, ctx.layout.topo, GroupKind::EDP);
}

void ParallelGrad::prepare(MicroState& m, int64_t index) const {
  const auto& c = model_.config();
  m.index = index;
  for (size_t i = 0; i < m.seqs.size(); ++i)
    LS_CHECK(int64_t(m.seqs[i].size()) <= c.max_position_embeddings, "parallel backward: sequence ", i, " has ",
             m.seqs[i].size(), " tokens (expected 1..", c.max_position_embeddings, ")");
  m.packed = pack_sequences(m.seqs);
  m.T = m.packed.batch.size();
  m.rows = model_.context().local_rows(m.T);
}

std::vector<float> ParallelGrad::forward(MicroState& m, std::vector<float> x, bool want_entropy,
                                         const UpstreamFn& upstream) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const auto& c = model_.config();
  const ModelWeights& W = model_.weights();
  const bool bf16 = model_.precision() == Precision::bfloat16;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const int64_t T = m.T, R = m.rows.size();
  m.cache = std::make_unique<KvCache>(s.local_cache_config(c), m.packed.num_pages, kAttnBlock);
  if (s.first_stage) x = ctx.embed_rows(m.packed.batch.tokens.data(), T, W.embed.data<float>(), V, H);
  LS_CHECK(int64_t(x.size()) == R * H, "parallel backward: stage input of micro-batch ", m.index, " has ", x.size(),
           " values, expected ", R * H);
  LayerActivations acts;  // the layers' working buffers, reused
  for (int64_t l = 0; l < s.num_layers; ++l) {
    m.layer_inputs.push_back(x);
    model_.layer_forward(l, x, m.packed.batch, *m.cache, &acts);
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
  LS_CHECK(m.upstream.size() == m.seqs.size(), "parallel backward: ", m.upstream.size(), " upstream gradients for ",
           m.seqs.size(), " sequences");
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

namespace {

// The head rows the backward works on (see ParallelGrad::backward), in token order. Their
// logits move to the front of `logits` in place (row index[i] >= i to row i, ascending, so no
// row is overwritten before it is read): no second vocabulary-wide buffer.
struct HeadRows {
  std::vector<int32_t> index, targets;  // token positions; their targets
  std::vector<float> lse, dlogp, dent, entropy, hidden;
};

HeadRows head_rows(std::vector<float>& logits, const std::vector<float>& hidden, const std::vector<float>& lse,
                   int64_t T, int64_t VL, int64_t H, const std::vector<float>& dlogp, const std::vector<float>& dent,
                   const std::vector<float>& entropy, const std::vector<int32_t>& targets, bool any_entropy) {
  HeadRows a;
  for (int64_t t = 0; t < T; ++t)
    if (dlogp[t] != 0.0f || (any_entropy && dent[t] != 0.0f)) a.index.push_back(int32_t(t));
  const int64_t A = int64_t(a.index.size());
  a.hidden.resize(A * H);
  for (int64_t i = 0; i < A; ++i) {
    const int64_t t = a.index[size_t(i)];
    if (t != i) std::copy_n(logits.data() + t * VL, VL, logits.data() + i * VL);
    std::copy_n(hidden.data() + t * H, H, a.hidden.data() + i * H);
    a.targets.push_back(targets[t]);
    a.lse.push_back(lse[t]);
    a.dlogp.push_back(dlogp[t]);
    if (any_entropy) a.dent.push_back(dent[t]), a.entropy.push_back(entropy[t]);
  }
  return a;
}

}  // namespace

std::vector<float> ParallelGrad::backward(MicroState& m, std::vector<float> dy, Partial& g) const {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const auto& c = model_.config();
  const ModelWeights& W = model_.weights();
  const bool bf16 = model_.precision() == Precision::bfloat16;
  const int64_t T = m.T, H = c.hidden_size, V = c.vocab_size, R = m.rows.size();
  const int tp = s.topo.tp;
  std::vector<float> dx(R * H);
  const bool tied = tied_on_one_stage(c, s);
  std::vector<float> tied_head_grad;  // tied: the lm_head part of the embedding's gradient
  if (s.last_stage) {
    std::vector<float> dlogp(T, 0.0f), dent(T, 0.0f), entropy(T, 0.0f);
    std::vector<int32_t> targets(T, 0);
    bool any_entropy = false;
    int64_t offset = 0;
    for (size_t i = 0; i < m.seqs.size(); ++i) {
      const auto& seq = m.seqs[i];
      const size_t n = seq.size() - 1;
      const auto& up = m.upstream[i];
      LS_CHECK(up.dlogp.size() == n && (up.dentropy.empty() || up.dentropy.size() == n), "parallel backward: sequence ",
               i, " has ", n, " predicted tokens but its upstream has ", up.dlogp.size(), " dlogp and ",
               up.dentropy.size(), " dentropy values");
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
    // Only the rows with an upstream gradient (the trained tokens, less those whose gradient
    // is 0): another row's logit gradients are exactly +-0, and adding +-0 to a sum that
    // starts at +0 changes no bit, so its terms are left out of both sums (the token chunks
    // stay those of the whole stream). With a 151936-entry vocabulary this skips most of the
    // head's backward for the prompt tokens.
    const HeadRows a = head_rows(m.logits, m.hidden, m.lse, T, VL, H, dlogp, dent, entropy, targets, any_entropy);
    const int64_t A = int64_t(a.index.size());
    // The logit gradients overwrite the compacted logits (each element is read once, then
    // written): no new vocabulary-wide buffer, whose fresh pages the kernel would zero.
    std::vector<float> dl = std::move(m.logits);
    cpu::log_softmax_gather_backward_slice(dl.data(), a.lse.data(), a.targets.data(), a.dlogp.data(),
                                           any_entropy ? a.dent.data() : nullptr,
                                           any_entropy ? a.entropy.data() : nullptr, dl.data(), A, s.vocab.begin, VL);
    if (tied) tied_head_grad.resize(VL * H);
    float* dhead = tied ? tied_head_grad.data() : g.grads.lm_head.data<float>();
    cpu::linear_weight_grad_subtree(dl.data(), a.hidden.data(), dhead, VL, H,
                                    cpu::token_chunks_of(a.index.data(), A, T).rows, kTMax);
    std::vector<float> dhidden_a(A * H), dhidden(T * H, 0.0f);
    cpu::linear_input_grad_canonical(dl.data(), W.lm_head.data<float>(), dhidden_a.data(), A, VL, H,
                                     canonical_chunk(V), kTMax / tp);
    for (int64_t i = 0; i < A; ++i)
      std::copy_n(dhidden_a.data() + i * H, H, dhidden.data() + int64_t(a.index[size_t(i)]) * H);
    if (tp > 1) dist::canonical_all_reduce(*ctx.tp, dhidden.data(), T * H);
    const std::vector<float> dh_local = slice_rows(dhidden, m.rows, H);
    float* dw = g.grads.final_norm.data<float>();
    cpu::rmsnorm_backward(m.final_in.data(), W.final_norm.data<float>(), dh_local.data(), dx.data(), dw, R, H,
                          float(c.rms_norm_eps), bf16, local_chunks(T, m.rows));
    if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, dw, H);
  } else {
    LS_CHECK(dy.size() == dx.size(), "parallel backward: stage output gradient of micro-batch ", m.index, " has ",
             dy.size(), " values, expected ", dx.size());
    dx = std::move(dy);
  }
  // The backward re-writes each layer's K/V as it recomputes: a fresh cache.
  m.cache = std::make_unique<KvCache>(s.local_cache_config(c), m.packed.num_pages, kAttnBlock);
  for (int64_t l = s.num_layers - 1; l >= 0; --l) layer_grads(l, m, dx, g);
  if (s.first_stage) {
    const std::vector<float> dfull = ctx.gather_rows(dx, T, H);
    float* dembed = g.grads.embed.data<float>();
    cpu::embedding_backward_rows(m.packed.batch.tokens.data(), dfull.data(), dembed, T, V, s.vocab.begin,
                                 s.vocab.size(), H);
    // Tied: the lookup part, then the lm_head part, in that order.
    if (tied) cpu::add_inplace(dembed, tied_head_grad.data(), int64_t(tied_head_grad.size()));
    return {};
  }
  return dx;
}

// Layer l's gradients: its internals recomputed from the saved input by the forward's own
// layer_forward (the same bits), then the one layer backward.
void ParallelGrad::layer_grads(int64_t l, MicroState& m, std::vector<float>& dx, Partial& g) const {
  const LayerWeights& L = model_.weights().layers.at(l);
  const std::vector<float>& x_in = m.layer_inputs[l];
  std::vector<float> x = x_in;
  LayerActivations acts;
  model_.layer_forward(l, x, m.packed.batch, *m.cache, &acts);

  LayerWeights& G = g.grads.layers.at(l);
  LayerGradPtrs grads;
  grads.input_norm = G.input_norm.data<float>();
  grads.post_attention_norm = G.post_attention_norm.data<float>();
  grads.q_proj = G.q_proj.data<float>();
  grads.k_proj = G.k_proj.data<float>();
  grads.v_proj = G.v_proj.data<float>();
  grads.o_proj = G.o_proj.data<float>();
  grads.q_norm = G.q_norm.data<float>();
  grads.k_norm = G.k_norm.data<float>();
  if (L.is_moe) {
    grads.router = G.router.data<float>();
    grads.expert = [&g, l](int64_t j, int d, int which) {
      ExpertWeights& e = g.experts.at(d).at(l).at(j);
      return (which == 0 ? e.gate : which == 1 ? e.up : e.down).data<float>();
    };
  } else {
    grads.dense_gate = G.dense.gate.data<float>();
    grads.dense_up = G.dense.up.data<float>();
    grads.dense_down = G.dense.down.data<float>();
  }
  layer_backward(model_, l, m.packed.batch, *m.cache, x_in, acts, dx, grads);
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

ModelWeights ParallelGrad::step_grads(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                                      bool want_entropy, const UpstreamFn& upstream) {
  const ParallelContext& ctx = model_.context();
  const ShardLayout& s = ctx.layout;
  const Topology& topo = s.topo;
  const int64_t J = int64_t(micro_batches.size());
  std::vector<int64_t> all_j(ctx.world->size());
  ctx.world->all_gather_n(&J, all_j.data(), 1);
  for (int64_t n : all_j)
    LS_CHECK(n == J, "parallel backward: every DP replica must run the same number of micro-batches (", J, " vs ", n,
             ")");
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
    Partial g(model_.weights(), span.count);
    std::vector<float> dx = backward(in_flight.front(), std::move(dy), g);
    in_flight.pop_front();
    for (int d = 0; d < span.count; ++d) {
      // Experts' token trees of one replica's micro-batch split over EDP members (SP
      // chunks, or TP copies that count as zero): complete them before the micro-batch sum.
      GradMap e = g.named_experts(s, d);
      std::vector<float> flat = flatten(e);
      run_tree(*edp_, flat, same_dp_run);
      unflatten(flat, e);
      expert_acc[d].push(std::move(e));
    }
    dense_acc.push(g.named(s));
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
  ModelWeights grads = model_.weights().zeros_like();
  copy_from_named(grads, dense, s.scope());
  return grads;
}

std::vector<std::pair<std::string, Tensor*>> local_named(ModelWeights& local, const ShardLayout& layout) {
  std::vector<std::pair<std::string, Tensor*>> out;
  for_each_param(
      local,
      [&](const ParamSlot& slot, Tensor& t) {
        out.push_back({param_name(local.config, slot), &t});
      },
      layout.scope());
  return out;
}

std::map<std::string, Tensor> gather_full(dist::Communicator& world, const ModelConfig& cfg, const ShardLayout& layout,
                                          const ModelWeights& local_weights) {
  const std::map<std::string, Tensor> local = named_tensors(local_weights, layout.scope());
  // Each (name, box) is sent once, by the lowest rank that holds it.
  const int W = world.size();
  std::vector<std::vector<ShardPiece>> pieces(W);
  for (int r = 0; r < W; ++r) pieces[r] = rank_pieces(cfg, ShardLayout::make(cfg, layout.topo, layout.layer_split, r));
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
  for (const auto& [name, shape] : ModelWeights::expected_shapes(cfg))
    full.emplace(name, Tensor::zeros(shape, DType::f32));
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
                         const ModelWeights& local) {
  auto full = gather_full(world, cfg, layout, local);
  float norm = world.rank() == 0 ? global_grad_norm(full) : 0.0f;
  world.broadcast_n(&norm, 1, 0);
  return norm;
}

std::vector<SequenceGradInput> mean_nll_upstream(const std::vector<std::vector<float>>& logprobs) {
  std::vector<SequenceGradInput> up(logprobs.size());
  for (size_t s = 0; s < logprobs.size(); ++s)
    up[s].dlogp.assign(logprobs[s].size(), -1.0f / float(logprobs[s].size()));
  return up;
}

}  // namespace lockstep
