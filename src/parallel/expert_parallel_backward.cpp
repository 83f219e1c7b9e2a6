#include "parallel/expert_parallel_backward.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "kernels/canonical.h"
#include "parallel/row_exchange.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/moe_backward.h"
#include "parallel/expert_parallel.h"

namespace lockstep {

ExpertSpan expert_span(const ShardLayout& s) {
  const Topology& t = s.topo;
  const int64_t block = int64_t(t.etp) * t.ep;  // local indices per EP/ETP block
  ExpertSpan span;
  span.dp_first = block * s.coords.edp / t.tp;
  span.count = int(std::max<int64_t>(1, block / t.tp));
  return span;
}

namespace {

using parallel_rows::exchange;
using parallel_rows::gather_v;

std::vector<float> rows_of(const std::vector<float>& src, const std::vector<int64_t>& idx, int64_t width) {
  std::vector<float> out(idx.size() * width);
  for (size_t i = 0; i < idx.size(); ++i) std::copy_n(src.data() + idx[i] * width, width, out.data() + i * width);
  return out;
}

}  // namespace

void expert_parallel_moe_backward(const ParallelContext& ctx, const LayerWeights& L, const ModelConfig& cfg,
                                  const float* h, const float* dout, int64_t R, int64_t T, int64_t row_begin,
                                  bool bf16, float* dh, float* drouter, const ExpertGradSlot& expert_grad) {
  const int64_t H = cfg.hidden_size, E = cfg.num_experts, k = cfg.num_experts_per_tok;
  const int64_t I = cfg.moe_intermediate_size;
  const ShardLayout& s = ctx.layout;
  const Topology& topo = s.topo;
  dist::Communicator& ep = *ctx.ep;
  dist::Communicator& etp = *ctx.etp;
  const int P = ep.size();
  const int64_t EL = s.experts, cols = s.expert_cols.size();
  const int64_t me = s.coords.tp + int64_t(topo.tp) * s.coords.dp;  // local index in the stage

  // Routing, recomputed as the forward does.
  std::vector<float> logits(R * E);
  cpu::linear(h, L.router.data<float>(), logits.data(), R, E, H);
  std::vector<int32_t> ids(R * k);
  std::vector<float> weights(R * k);
  cpu::route_topk(logits.data(), R, E, k, cfg.norm_topk_prob, ids.data(), weights.data());

  // Dispatch rows with (position in the micro-batch, micro-batch length, source index).
  std::vector<std::vector<int64_t>> pairs_to(P);
  for (int64_t p = 0; p < R * k; ++p) pairs_to[ids[p] / EL].push_back(p);
  std::vector<float> send_rows;
  std::vector<int32_t> send_ids;
  std::vector<int64_t> send_meta, send_n(P), recv_n(P);
  for (int d = 0; d < P; ++d) {
    send_n[d] = int64_t(pairs_to[d].size());
    for (int64_t p : pairs_to[d]) {
      const float* row = h + (p / k) * H;
      send_rows.insert(send_rows.end(), row, row + H);
      send_ids.push_back(ids[p]);
      send_meta.insert(send_meta.end(), {row_begin + p / k, T, me});
    }
  }
  ep.all_to_all(send_n.data(), recv_n.data(), sizeof(int64_t));
  std::vector<float> rows = exchange(ep, send_rows, send_n, recv_n, H);
  std::vector<int32_t> eids = exchange(ep, send_ids, send_n, recv_n, 1);
  std::vector<int64_t> meta = exchange(ep, send_meta, send_n, recv_n, 3);
  int64_t n_mine = 0;
  for (int64_t n : recv_n) n_mine += n;
  int64_t offset = 0;
  std::vector<int64_t> counts;
  if (etp.size() > 1) {
    counts.resize(etp.size());
    etp.all_gather_n(&n_mine, counts.data(), 1);
    for (int i = 0; i < etp.rank(); ++i) offset += counts[i];
    rows = gather_v(etp, rows, counts, H);
    eids = gather_v(etp, eids, counts, 1);
    meta = gather_v(etp, meta, counts, 3);
  }
  const int64_t n_all = int64_t(eids.size());
  std::vector<std::vector<int64_t>> picked(EL);
  for (int64_t i = 0; i < n_all; ++i) picked[eids[i] - s.expert_begin].push_back(i);

  // Each (token, expert) output as the forward computed it, back to the token's owner.
  std::vector<float> results(n_all * H);
  for (int64_t j = 0; j < EL; ++j) {
    const int64_t n = int64_t(picked[j].size());
    if (n == 0) continue;
    std::vector<float> x = rows_of(rows, picked[j], H), y(n * H);
    const ExpertWeights& w = L.experts[j];
    if (etp.size() == 1)
      cpu::swiglu_mlp(x.data(), w.gate.data<float>(), w.up.data<float>(), w.down.data<float>(), y.data(), n, H, I,
                      bf16);
    else
      swiglu_partial(x.data(), w.gate.data<float>(), w.up.data<float>(), w.down.data<float>(), y.data(), n, H, I,
                     cols, kTMax / etp.size(), bf16);
    for (int64_t i = 0; i < n; ++i) std::copy_n(y.data() + i * H, H, results.data() + picked[j][i] * H);
  }
  if (etp.size() > 1) {
    dist::canonical_all_reduce(etp, results.data(), n_all * H);
    if (bf16) cpu::round_to_bf16(results.data(), n_all * H);
  }
  std::vector<float> mine(results.begin() + offset * H, results.begin() + (offset + n_mine) * H);
  std::vector<float> back = exchange(ep, mine, recv_n, send_n, H);

  // d(weight) and the expert's upstream rows, on the token owner (as moe_backward).
  std::vector<float> dweights(R * k), send_dy;
  send_dy.reserve(R * k * H);
  int64_t next = 0;
  for (int d = 0; d < P; ++d)
    for (int64_t p : pairs_to[d]) {
      const float* g = dout + (p / k) * H;
      dweights[p] = cpu::dot(g, back.data() + (next++) * H, H);
      const float w = weights[p];
      for (int64_t c = 0; c < H; ++c) send_dy.push_back(w * g[c]);
    }
  std::vector<float> dys = exchange(ep, send_dy, send_n, recv_n, H);
  if (etp.size() > 1) dys = gather_v(etp, dys, counts, H);

  // Expert backward on the owner: dx for every row, weight gradients per source
  // micro-batch from its canonical rows (SP ranks hold distinct tokens; without SP only
  // TP rank 0's copy counts).
  const ExpertSpan span = expert_span(s);
  std::vector<float> gx(n_all * H, 0.0f), ux(n_all * H, 0.0f);
  const int chunks_here = kTMax / etp.size();
  for (int64_t j = 0; j < EL; ++j) {
    const ExpertWeights& w = L.experts[j];
    for (int d = 0; d < span.count; ++d)
      for (int which = 0; which < 3; ++which) {
        float* out = expert_grad(j, d, which);
        std::fill(out, out + cols * H, 0.0f);
      }
    const int64_t n = int64_t(picked[j].size());
    if (n == 0) continue;
    std::vector<float> x = rows_of(rows, picked[j], H), dy = rows_of(dys, picked[j], H);
    std::vector<float> gate(n * cols), up(n * cols), act(n * cols), dact(n * cols), dgate(n * cols), dup(n * cols);
    cpu::linear(x.data(), w.gate.data<float>(), gate.data(), n, cols, H);
    cpu::linear(x.data(), w.up.data<float>(), up.data(), n, cols, H);
    if (bf16) {
      cpu::round_to_bf16(gate.data(), n * cols);
      cpu::round_to_bf16(up.data(), n * cols);
    }
    cpu::swiglu(gate.data(), up.data(), act.data(), n * cols);
    if (bf16) cpu::round_to_bf16(act.data(), n * cols);
    cpu::linear_input_grad(dy.data(), w.down.data<float>(), dact.data(), n, H, cols);  // row form: N = hidden
    cpu::swiglu_backward(gate.data(), up.data(), dact.data(), dgate.data(), dup.data(), n * cols);
    std::vector<float> part(n * H);
    cpu::linear_input_grad_canonical(dgate.data(), w.gate.data<float>(), part.data(), n, cols, H, canonical_chunk(I),
                                     chunks_here);
    for (int64_t i = 0; i < n; ++i) std::copy_n(part.data() + i * H, H, gx.data() + picked[j][i] * H);
    cpu::linear_input_grad_canonical(dup.data(), w.up.data<float>(), part.data(), n, cols, H, canonical_chunk(I),
                                     chunks_here);
    for (int64_t i = 0; i < n; ++i) std::copy_n(part.data() + i * H, H, ux.data() + picked[j][i] * H);

    for (int d = 0; d < span.count; ++d) {
      std::vector<int64_t> sel;  // positions in x
      int64_t Td = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t* mt = meta.data() + picked[j][i] * 3;
        const bool leader = topo.sp || mt[2] % topo.tp == 0;
        if (leader && mt[2] / topo.tp - span.dp_first == d) sel.push_back(i), Td = mt[1];
      }
      if (sel.empty()) continue;
      std::sort(sel.begin(), sel.end(), [&](int64_t a, int64_t b) {
        return meta[picked[j][a] * 3] < meta[picked[j][b] * 3];
      });
      const int64_t m = int64_t(sel.size());
      std::vector<int32_t> pos(m);
      for (int64_t i = 0; i < m; ++i) pos[i] = int32_t(meta[picked[j][sel[i]] * 3]);
      const cpu::TokenChunks chunks = cpu::token_chunks_of(pos.data(), m, Td);
      const auto xs = rows_of(x, sel, H), dys_s = rows_of(dy, sel, H);
      const auto acts = rows_of(act, sel, cols), dgs = rows_of(dgate, sel, cols), dus = rows_of(dup, sel, cols);
      cpu::linear_weight_grad(dys_s.data(), acts.data(), expert_grad(j, d, 2), H, cols, chunks);
      cpu::linear_weight_grad(dgs.data(), xs.data(), expert_grad(j, d, 0), cols, H, chunks);
      cpu::linear_weight_grad(dus.data(), xs.data(), expert_grad(j, d, 1), cols, H, chunks);
    }
  }
  if (etp.size() > 1) {
    dist::canonical_all_reduce(etp, gx.data(), n_all * H);
    dist::canonical_all_reduce(etp, ux.data(), n_all * H);
  }
  cpu::add_inplace(gx.data(), ux.data(), n_all * H);
  std::vector<float> my_dx(gx.begin() + offset * H, gx.begin() + (offset + n_mine) * H);
  std::vector<float> dx_back = exchange(ep, my_dx, recv_n, send_n, H);
  std::vector<float> expert_dx(R * k * H);
  next = 0;
  for (int d = 0; d < P; ++d)
    for (int64_t p : pairs_to[d]) std::copy_n(dx_back.data() + (next++) * H, H, expert_dx.data() + p * H);

  // Router and the token's own dx, as moe_backward.
  std::vector<float> dlogits(R * E);
  cpu::route_topk_backward(logits.data(), ids.data(), weights.data(), dweights.data(), dlogits.data(), R, E, k,
                           cfg.norm_topk_prob);
  cpu::TokenChunks local = cpu::token_chunks(T);
  for (auto& r : local.rows) r = std::clamp<int64_t>(r - row_begin, 0, R);
  cpu::linear_weight_grad(dlogits.data(), h, drouter, E, H, local);
  cpu::linear_input_grad(dlogits.data(), L.router.data<float>(), dh, R, E, H);
  std::vector<int32_t> order(k);
  for (int64_t t = 0; t < R; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return ids[t * k + a] < ids[t * k + b]; });
    for (int32_t slot : order) cpu::add_inplace(dh + t * H, expert_dx.data() + (t * k + slot) * H, H);
  }
}

}  // namespace lockstep
