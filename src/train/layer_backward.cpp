#include "train/layer_backward.h"

#include <algorithm>
#include <cmath>

#include "kernels/canonical.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_backward.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/rope_backward.h"
#include "model/layer.h"

namespace lockstep {

// Rows [rows] of a [T, width] array.
std::vector<float> slice_rows(const std::vector<float>& full, dist::RowRange rows, int64_t width) {
  return std::vector<float>(full.begin() + rows.begin * width, full.begin() + rows.end * width);
}

cpu::TokenChunks local_chunks(int64_t T, dist::RowRange rows) {
  cpu::TokenChunks c = cpu::token_chunks(T);
  for (auto& r : c.rows) r = std::clamp<int64_t>(r - rows.begin, 0, rows.size());
  return c;
}

namespace {

// All-gathers per-rank blocks [T, width] (equal on every rank) into [T, width * from.size()],
// taking the ranks listed in `from` in that order.
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

// The CPU op set of layer_backward: one layer's step of the backward over the model's
// parallel context. The buffers between ops are members: each op reads what the previous
// one left (model/layer.h).
struct CpuLayerBackwardOps {
  using Layer = LayerWeights;
  const Qwen3Moe& model;
  const int64_t l;
  const ForwardBatch& batch;
  KvCache& cache;
  const std::vector<float>& x_in;
  const LayerActivations& a;
  std::vector<float>& dx;
  const LayerGradPtrs& g;

  const ParallelContext& ctx = model.context();
  const ShardLayout& s = ctx.layout;
  const ModelConfig& c = model.config();
  const bool bf16 = model.precision() == Precision::bfloat16;  // cast points are straight-through
  const int64_t T = batch.size(), H = c.hidden_size, D = c.head_dim;
  const dist::RowRange rows = ctx.local_rows(T);
  const int64_t R = rows.size();
  const int64_t nq = s.q_heads, nkv = s.kv_heads, qd = nq * D, kd = nkv * D;
  const int64_t nq_all = c.num_attention_heads, nkv_all = c.num_key_value_heads;
  const int tp = s.topo.tp;
  const float eps = float(c.rms_norm_eps);
  const cpu::TokenChunks chunks = cpu::token_chunks(T), mine = local_chunks(T, rows);
  const bool kv_replicated = tp > c.num_key_value_heads;
  const int rep = kv_replicated ? int(tp / c.num_key_value_heads) : 1;  // TP ranks per KV head

  std::vector<float> dh = std::vector<float>(R * H);  // d(norm output) on this rank's rows
  std::vector<float> dnorm = std::vector<float>(R * H);
  std::vector<float> dattn{}, dq{}, dk{}, dv{}, dq_proj{}, dk_proj{};
  std::vector<float> dhf{};  // d(input norm output), all T rows

  // dx = d(out) -> dh = d(post-attention norm output); MoE: expert_parallel_backward.h.
  void moe_residual_backward(const Layer& L) {
    expert_parallel_moe_backward(ctx, L, c, a.mlp_in.data(), dx.data(), R, T, rows.begin, bf16, dh.data(), g.router,
                                 g.expert);
    if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, g.router, c.num_experts * H);
  }

  void dense_mlp_residual_backward(const Layer& L) {
    const int64_t cols = s.dense_cols.size(), I = c.intermediate_size;
    const std::vector<float> hmf = ctx.gather_rows(a.mlp_in, T, H), dout = ctx.gather_rows(dx, T, H);
    std::vector<float> gate(T * cols), up(T * cols), act(T * cols), dact(T * cols), dg(T * cols), du(T * cols);
    auto cast = [&](std::vector<float>& v) {
      if (bf16) cpu::round_to_bf16(v.data(), int64_t(v.size()));
    };
    cpu::linear(hmf.data(), L.dense.gate.data<float>(), gate.data(), T, cols, H);
    cpu::linear(hmf.data(), L.dense.up.data<float>(), up.data(), T, cols, H);
    cast(gate), cast(up);
    cpu::swiglu(gate.data(), up.data(), act.data(), T * cols);
    cast(act);
    cpu::linear_weight_grad(dout.data(), act.data(), g.dense_down, H, cols, chunks);
    cpu::linear_input_grad(dout.data(), L.dense.down.data<float>(), dact.data(), T, H, cols);
    cpu::swiglu_backward(gate.data(), up.data(), dact.data(), dg.data(), du.data(), T * cols);
    cpu::linear_weight_grad(dg.data(), hmf.data(), g.dense_gate, cols, H, chunks);
    cpu::linear_weight_grad(du.data(), hmf.data(), g.dense_up, cols, H, chunks);
    std::vector<float> gx(T * H), ux(T * H);
    cpu::linear_input_grad_canonical(dg.data(), L.dense.gate.data<float>(), gx.data(), T, cols, H, canonical_chunk(I),
                                     kTMax / tp);
    cpu::linear_input_grad_canonical(du.data(), L.dense.up.data<float>(), ux.data(), T, cols, H, canonical_chunk(I),
                                     kTMax / tp);
    if (tp > 1) {
      dist::canonical_all_reduce(*ctx.tp, gx.data(), T * H);
      dist::canonical_all_reduce(*ctx.tp, ux.data(), T * H);
    }
    cpu::add_inplace(gx.data(), ux.data(), T * H);
    dh = slice_rows(gx, rows, H);
  }

  // dx = d(out) becomes d(mid) = d(out) + the norm's backward of dh.
  void post_attention_norm_backward(const Layer& L) {
    cpu::rmsnorm_backward(a.mid.data(), L.post_attention_norm.data<float>(), dh.data(), dnorm.data(),
                          g.post_attention_norm, R, H, eps, bf16, mine);
    if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, g.post_attention_norm, H);
    cpu::add_inplace(dx.data(), dnorm.data(), R * H);
  }

  // d(attention output) from d(mid); the o_proj gradient.
  void o_proj_residual_backward(const Layer& L) {
    const std::vector<float> dmid = ctx.gather_rows(dx, T, H);
    dattn.assign(T * qd, 0.0f);
    cpu::linear_weight_grad(dmid.data(), a.attn.data(), g.o_proj, H, qd, chunks);
    cpu::linear_input_grad(dmid.data(), L.o_proj.data<float>(), dattn.data(), T, H, qd);
  }

  // dq, dk, dv (after RoPE) from d(attention output), reading K/V from the cache.
  void attention_backward() {
    dq.assign(T * qd, 0.0f);
    dk.assign(T * kd, 0.0f);
    dv.assign(T * kd, 0.0f);
    PagedKvLayer kv = cache.layer(l);
    TokenSlots slots{batch.positions.data(), batch.page_tables.data()};
    const float scale = 1.0f / std::sqrt(float(D));
    if (!kv_replicated) {
      cpu::paged_attention_backward(a.q.data(), a.attn.data(), dattn.data(), kv, slots, T, nq, scale, dq.data(),
                                    dk.data(), dv.data());
    } else {
      // The query heads of this KV head live on `rep` ranks: gather them, run the group's
      // backward (the per-key sums walk (query, head) in the single-rank order), keep ours.
      std::vector<int> group;
      const int first = s.coords.tp / rep * rep;
      for (int r = first; r < first + rep; ++r) group.push_back(r);
      const int64_t gh = nq * rep;
      const auto gq = gather_heads(*ctx.tp, a.q, T, qd, group), ga = gather_heads(*ctx.tp, a.attn, T, qd, group),
                 gd = gather_heads(*ctx.tp, dattn, T, qd, group);
      std::vector<float> gdq(T * gh * D);
      cpu::paged_attention_backward(gq.data(), ga.data(), gd.data(), kv, slots, T, gh, scale, gdq.data(), dk.data(),
                                    dv.data());
      dq = head_block(gdq, T, gh * D, (s.coords.tp - first) * qd, qd);
    }
  }

  // Through RoPE and q_norm/k_norm to d(q_proj), d(k_proj); the norm weights' gradients.
  void qk_norm_rope_backward(const Layer& L) {
    cpu::rope_backward(dq.data(), batch.positions.data(), T, nq, model.rope_table());
    cpu::rope_backward(dk.data(), batch.positions.data(), T, nkv, model.rope_table());
    // q/k-norm weights are shared by all heads: their token-chunk tree walks (token, head)
    // over every head, so it runs on the gathered heads (the same on every TP rank).
    dq_proj.assign(T * qd, 0.0f);
    dk_proj.assign(T * kd, 0.0f);
    if (tp == 1) {
      cpu::rmsnorm_backward(a.q_proj.data(), L.q_norm.data<float>(), dq.data(), dq_proj.data(), g.q_norm, T * nq, D,
                            eps, bf16, cpu::token_chunks(T, nq));
      cpu::rmsnorm_backward(a.k_proj.data(), L.k_norm.data<float>(), dk.data(), dk_proj.data(), g.k_norm, T * nkv, D,
                            eps, bf16, cpu::token_chunks(T, nkv));
    } else {
      std::vector<int> all(tp), kv_holders;
      for (int r = 0; r < tp; ++r) all[r] = r;
      for (int r = 0; r < tp; r += rep) kv_holders.push_back(r);
      const auto fq = gather_heads(*ctx.tp, a.q_proj, T, qd, all), fdq = gather_heads(*ctx.tp, dq, T, qd, all);
      std::vector<float> fdq_proj(T * nq_all * D);
      cpu::rmsnorm_backward(fq.data(), L.q_norm.data<float>(), fdq.data(), fdq_proj.data(), g.q_norm, T * nq_all, D,
                            eps, bf16, cpu::token_chunks(T, nq_all));
      dq_proj = head_block(fdq_proj, T, nq_all * D, s.q_head_begin * D, qd);
      const auto fk = gather_heads(*ctx.tp, a.k_proj, T, kd, kv_holders),
                 fdk = gather_heads(*ctx.tp, dk, T, kd, kv_holders);
      std::vector<float> fdk_proj(T * nkv_all * D);
      cpu::rmsnorm_backward(fk.data(), L.k_norm.data<float>(), fdk.data(), fdk_proj.data(), g.k_norm, T * nkv_all, D,
                            eps, bf16, cpu::token_chunks(T, nkv_all));
      dk_proj = head_block(fdk_proj, T, nkv_all * D, s.kv_head_begin * D, kd);
    }
  }

  // The q/k/v gradients and d(input norm output) = q part + k part + v part.
  void qkv_backward(const Layer& L) {
    cpu::linear_weight_grad(dq_proj.data(), a.attn_in.data(), g.q_proj, qd, H, chunks);
    cpu::linear_weight_grad(dk_proj.data(), a.attn_in.data(), g.k_proj, kd, H, chunks);
    cpu::linear_weight_grad(dv.data(), a.attn_in.data(), g.v_proj, kd, H, chunks);
    // d(norm output) = q part + k part + v part, each canonical over its N (rank subtrees
    // completed over TP; a replicated KV head counts on its first holder only).
    dhf.assign(T * H, 0.0f);
    std::vector<float> part(T * H);
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
  }

  // dx = d(mid) becomes d(x_in) = d(mid) + the input norm's backward.
  void input_norm_backward(const Layer& L) {
    const std::vector<float> dh_in = slice_rows(dhf, rows, H);
    cpu::rmsnorm_backward(x_in.data(), L.input_norm.data<float>(), dh_in.data(), dnorm.data(), g.input_norm, R, H, eps,
                          bf16, mine);
    if (s.topo.sp) dist::canonical_all_reduce(*ctx.tp, g.input_norm, H);
    cpu::add_inplace(dx.data(), dnorm.data(), R * H);
  }
};

}  // namespace

void layer_backward(const Qwen3Moe& model, int64_t l, const ForwardBatch& batch, KvCache& cache,
                    const std::vector<float>& x_in, const LayerActivations& acts, std::vector<float>& dx,
                    const LayerGradPtrs& grads) {
  CpuLayerBackwardOps ops{model, l, batch, cache, x_in, acts, dx, grads};
  layer_backward(ops, model.weights().layers.at(l));
}

}  // namespace lockstep
