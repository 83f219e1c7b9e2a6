#include "parallel/parallel_model.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/canonical.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/moe.h"
#include "parallel/expert_parallel.h"

namespace lockstep {

namespace {
constexpr int kResultTag = 1 << 20;
}

ParallelQwen3Moe::ParallelQwen3Moe(dist::Communicator& world, const ShardLayout& layout, ModelWeights local,
                                   Precision precision)
    : ctx_(world, layout), local_(std::move(local)), precision_(precision) {
  const auto& c = local_.config;
  rope_ = cpu::RopeTable::build(c.head_dim, std::max<int64_t>(c.max_position_embeddings, 1), c.rope_theta);
  LS_CHECK(int64_t(local_.layers.size()) == layout.num_layers, "parallel model: rank ", layout.rank, " holds ",
           local_.layers.size(), " layers but its stage has ", layout.num_layers);
}

void ParallelQwen3Moe::cast(float* x, int64_t n) const {
  if (bf16()) cpu::round_to_bf16(x, n);
}

// The attention block of Qwen3Moe::layer_forward on this rank's heads.
void ParallelQwen3Moe::attention(const LayerWeights& L, int64_t local_layer, std::vector<float>& x,
                                 const ForwardBatch& batch, KvCache& cache) const {
  const auto& c = local_.config;
  const ShardLayout& s = ctx_.layout;
  const int64_t T = batch.size(), H = c.hidden_size, D = c.head_dim, R = int64_t(x.size()) / H;
  const int64_t nq = s.q_heads, nkv = s.kv_heads;
  const float eps = float(c.rms_norm_eps);
  std::vector<float> h(R * H);
  cpu::rmsnorm(x.data(), L.input_norm.data<float>(), h.data(), R, H, eps, bf16());
  cast(h.data(), R * H);
  const std::vector<float> hf = ctx_.gather_rows(h, T, H);
  std::vector<float> q(T * nq * D), k(T * nkv * D), v(T * nkv * D), attn(T * nq * D);
  cpu::linear(hf.data(), L.q_proj.data<float>(), q.data(), T, nq * D, H);
  cpu::linear(hf.data(), L.k_proj.data<float>(), k.data(), T, nkv * D, H);
  cpu::linear(hf.data(), L.v_proj.data<float>(), v.data(), T, nkv * D, H);
  cast(q.data(), q.size());
  cast(k.data(), k.size());
  cast(v.data(), v.size());
  cpu::rmsnorm(q.data(), L.q_norm.data<float>(), q.data(), T * nq, D, eps, bf16());
  cpu::rmsnorm(k.data(), L.k_norm.data<float>(), k.data(), T * nkv, D, eps, bf16());
  cast(q.data(), q.size());
  cast(k.data(), k.size());
  cpu::rope(q.data(), batch.positions.data(), T, nq, rope_);
  cpu::rope(k.data(), batch.positions.data(), T, nkv, rope_);
  cast(q.data(), q.size());
  cast(k.data(), k.size());
  PagedKvLayer kv = cache.layer(local_layer);
  TokenSlots slots{batch.positions.data(), batch.page_tables.data()};
  cpu::kv_write(kv, slots, k.data(), v.data(), T);
  cpu::paged_attention(q.data(), attn.data(), kv, slots, T, nq, 1.0f / std::sqrt(float(D)));
  cast(attn.data(), attn.size());
  // o_proj: this rank's heads are a run of whole canonical chunks of q_dim.
  std::vector<float> o(T * H);
  cpu::linear_row_canonical(attn.data(), L.o_proj.data<float>(), o.data(), T, H, nq * D,
                            canonical_chunk(c.q_dim()), kTMax / ctx_.layout.topo.tp);
  o = ctx_.reduce_rows(std::move(o), T, H);
  cast(o.data(), R * H);
  cpu::add_inplace(x.data(), o.data(), R * H);
  cast(x.data(), R * H);
}

// The MLP block of Qwen3Moe::layer_forward.
void ParallelQwen3Moe::mlp(const LayerWeights& L, std::vector<float>& x, int64_t T) const {
  const auto& c = local_.config;
  const ShardLayout& s = ctx_.layout;
  const int64_t H = c.hidden_size, R = int64_t(x.size()) / H;
  std::vector<float> h(R * H), o(R * H);
  cpu::rmsnorm(x.data(), L.post_attention_norm.data<float>(), h.data(), R, H, float(c.rms_norm_eps), bf16());
  cast(h.data(), R * H);
  if (L.is_moe) {
    expert_parallel_moe(ctx_, L, c, h.data(), R, o.data(), bf16());
  } else {
    const std::vector<float> hf = ctx_.gather_rows(h, T, H);
    std::vector<float> part(T * H);
    const int tp = s.topo.tp;
    if (tp == 1)
      cpu::swiglu_mlp(hf.data(), L.dense.gate.data<float>(), L.dense.up.data<float>(), L.dense.down.data<float>(),
                      part.data(), T, H, c.intermediate_size, bf16());
    else
      swiglu_partial(hf.data(), L.dense.gate.data<float>(), L.dense.up.data<float>(), L.dense.down.data<float>(),
                     part.data(), T, H, c.intermediate_size, s.dense_cols.size(), kTMax / tp, bf16());
    o = ctx_.reduce_rows(std::move(part), T, H);
    if (tp > 1) cast(o.data(), R * H);  // swiglu_mlp's output cast, on the full sums
  }
  cast(o.data(), R * H);
  cpu::add_inplace(x.data(), o.data(), R * H);
  cast(x.data(), R * H);
}

void ParallelQwen3Moe::layer_forward(int64_t local_layer, std::vector<float>& x, const ForwardBatch& batch,
                                     KvCache& cache) const {
  const LayerWeights& L = local_.layers.at(local_layer);
  attention(L, local_layer, x, batch, cache);
  mlp(L, x, batch.size());
}

std::vector<std::vector<float>> ParallelQwen3Moe::stage_logprobs(const std::vector<float>& x,
                                                                 const ForwardBatch& batch,
                                                                 const std::vector<std::vector<int32_t>>& seqs) const {
  const auto& c = local_.config;
  const ShardLayout& s = ctx_.layout;
  const int64_t T = batch.size(), H = c.hidden_size, V = c.vocab_size, R = int64_t(x.size()) / H;
  std::vector<float> normed(R * H);
  cpu::rmsnorm(x.data(), local_.final_norm.data<float>(), normed.data(), R, H, float(c.rms_norm_eps), bf16());
  cast(normed.data(), R * H);
  const std::vector<float> hidden = ctx_.gather_rows(normed, T, H);

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
  std::vector<float> logits(T * VL);
  cpu::linear(hidden.data(), local_.lm_head.data<float>(), logits.data(), T, VL, H);
  if (tp == 1) {
    std::vector<float> rows(M * V);
    for (int64_t i = 0; i < M; ++i) std::copy_n(logits.data() + row_of[i] * V, V, rows.data() + i * V);
    cpu::log_softmax_gather(rows.data(), target.data(), lp.data(), M, V);
  } else {
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
    dist::canonical_all_reduce_maxsum(*ctx_.tp, mx.data(), sm.data(), M);
    std::vector<float> all_tl(M * tp);
    ctx_.tp->all_gather_n(tl.data(), all_tl.data(), M);
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

std::vector<std::vector<float>> ParallelQwen3Moe::score(const std::vector<std::vector<int32_t>>& seqs,
                                                        int64_t max_batch_tokens) {
  const auto& c = local_.config;
  const ShardLayout& s = ctx_.layout;
  const Topology& topo = s.topo;
  const int64_t H = c.hidden_size, page = kAttnBlock;
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
  // Steps: whole sequences up to the token budget (as score_sequences). Under PP the budget
  // is cut so the replica's tokens take about 4 steps per stage: stage s works on step k
  // while stage s + 1 works on step k - 1 (a pipelined forward; the bubble is about
  // (pp - 1) / (5 pp - 1) of the time). The steps change no bit (D1).
  if (topo.pp > 1) {
    int64_t replica_tokens = 0;
    for (size_t i = begin; i < end; ++i) replica_tokens += int64_t(seqs[i].size());
    const int64_t target_steps = 4 * int64_t(topo.pp);
    max_batch_tokens = std::min(max_batch_tokens, std::max<int64_t>(1, (replica_tokens + target_steps - 1) / target_steps));
  }
  std::vector<std::pair<size_t, size_t>> steps;
  for (size_t next = begin; next < end;) {
    size_t stop = next;
    int64_t tokens = 0;
    while (stop < end && (stop == next || tokens + int64_t(seqs[stop].size()) <= max_batch_tokens))
      tokens += int64_t(seqs[stop++].size());
    steps.push_back({next, stop});
    next = stop;
  }
  // EP groups span DP replicas, so every rank runs the same number of steps (empty ones
  // when its replica has run out).
  int64_t my_steps = int64_t(steps.size());
  std::vector<int64_t> all_steps(ctx_.world->size());
  ctx_.world->all_gather_n(&my_steps, all_steps.data(), 1);
  const int64_t num_steps = *std::max_element(all_steps.begin(), all_steps.end());
  last_score_steps_ = num_steps;

  std::vector<std::vector<float>> replica;  // this replica's results (last stage)
  const ModelConfig cache_cfg = s.local_cache_config(c);
  for (int64_t step = 0; step < num_steps; ++step) {
    const auto [b, e] = step < my_steps ? steps[step] : std::pair<size_t, size_t>{end, end};
    std::vector<std::vector<int32_t>> batch_seqs(seqs.begin() + b, seqs.begin() + e);
    ForwardBatch batch;
    std::vector<std::vector<int32_t>> tables(batch_seqs.size());
    int32_t next_page = 0;
    for (size_t i = 0; i < batch_seqs.size(); ++i) {
      const int64_t len = int64_t(batch_seqs[i].size());
      for (int64_t p = 0; p < (len + page - 1) / page; ++p) tables[i].push_back(next_page++);
      for (int64_t t = 0; t < len; ++t) {
        batch.tokens.push_back(batch_seqs[i][t]);
        batch.positions.push_back(int32_t(t));
        batch.page_tables.push_back(tables[i].data());
      }
    }
    KvCache cache(cache_cfg, std::max<int32_t>(next_page, 1), page);
    const int64_t T = batch.size();
    const dist::RowRange rows = ctx_.local_rows(T);
    std::vector<float> x(rows.size() * H);
    if (s.first_stage) {
      x = ctx_.embed_rows(batch.tokens.data(), T, local_.embed.data<float>(), c.vocab_size, H);
    } else {
      ctx_.pp->recv_n(x.data(), x.size(), s.coords.pp - 1, int(step));
    }
    for (int64_t l = 0; l < s.num_layers; ++l) layer_forward(l, x, batch, cache);
    if (!s.last_stage) {
      ctx_.pp->send_n(x.data(), x.size(), s.coords.pp + 1, int(step));
    } else {
      auto lp = stage_logprobs(x, batch, batch_seqs);
      for (auto& v : lp) replica.push_back(std::move(v));
    }
  }

  // Gather to world rank 0 in input order: each replica's (tp 0, last stage) rank sends.
  dist::Communicator& world = *ctx_.world;
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

}  // namespace lockstep
