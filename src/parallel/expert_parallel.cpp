#include "parallel/expert_parallel.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/canonical.h"
#include "parallel/row_exchange.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/moe.h"

namespace lockstep {

void swiglu_partial(const float* x, const float* gate_w, const float* up_w, const float* down_w, float* out,
                    int64_t n, int64_t H, int64_t I, int64_t cols, int num_chunks, bool bf16) {
  // The steps of cpu::swiglu_mlp on a column slice; only the final rounding is left to the
  // caller, after the tree is complete (rounding a partial would change the bits).
  std::vector<float> gate(n * cols), up(n * cols), act(n * cols);
  cpu::linear(x, gate_w, gate.data(), n, cols, H);
  cpu::linear(x, up_w, up.data(), n, cols, H);
  if (bf16) {
    cpu::round_to_bf16(gate.data(), n * cols);
    cpu::round_to_bf16(up.data(), n * cols);
  }
  cpu::swiglu(gate.data(), up.data(), act.data(), n * cols);
  if (bf16) cpu::round_to_bf16(act.data(), n * cols);
  cpu::linear_row_canonical(act.data(), down_w, out, n, H, cols, canonical_chunk(I), num_chunks);
}

namespace {

using parallel_rows::exchange;
using parallel_rows::gather_v;

}  // namespace

void expert_parallel_moe(const ParallelContext& ctx, const LayerWeights& L, const ModelConfig& cfg, const float* h,
                         int64_t R, float* out, bool bf16, float* router_logits) {
  const int64_t H = cfg.hidden_size, E = cfg.num_experts, k = cfg.num_experts_per_tok;
  const int64_t I = cfg.moe_intermediate_size;
  const ShardLayout& s = ctx.layout;
  dist::Communicator& ep = *ctx.ep;
  dist::Communicator& etp = *ctx.etp;
  const int P = ep.size();
  const int64_t EL = s.experts;

  // Route this rank's tokens (the router is replicated; the same kernels as one rank).
  std::vector<float> logits(R * E);
  cpu::linear(h, L.router.data<float>(), logits.data(), R, E, H);
  std::vector<int32_t> ids(R * k);
  std::vector<float> weights(R * k);
  cpu::route_topk(logits.data(), R, E, k, cfg.norm_topk_prob, ids.data(), weights.data());
  if (router_logits) std::copy(logits.begin(), logits.end(), router_logits);

  // Dispatch: each (token, slot) pair goes to the EP rank owning its expert, in pair order.
  std::vector<std::vector<int64_t>> pairs_to(P);
  for (int64_t p = 0; p < R * k; ++p) pairs_to[ids[p] / EL].push_back(p);
  std::vector<float> send_rows;
  std::vector<int32_t> send_ids;
  std::vector<int64_t> send_n(P), recv_n(P);
  send_rows.reserve(R * k * H);
  for (int d = 0; d < P; ++d) {
    send_n[d] = int64_t(pairs_to[d].size());
    for (int64_t p : pairs_to[d]) {
      const float* row = h + (p / k) * H;
      send_rows.insert(send_rows.end(), row, row + H);
      send_ids.push_back(ids[p]);
    }
  }
  ep.all_to_all(send_n.data(), recv_n.data(), sizeof(int64_t));
  std::vector<float> rows = exchange(ep, send_rows, send_n, recv_n, H);
  std::vector<int32_t> eids = exchange(ep, send_ids, send_n, recv_n, 1);
  int64_t n_mine = 0;
  for (int64_t n : recv_n) n_mine += n;

  // ETP: the members split each expert's columns, so they all run the same rows.
  int64_t offset = 0;
  if (etp.size() > 1) {
    std::vector<int64_t> counts(etp.size());
    etp.all_gather_n(&n_mine, counts.data(), 1);
    for (int i = 0; i < etp.rank(); ++i) offset += counts[i];
    rows = gather_v(etp, rows, counts, H);
    eids = gather_v(etp, eids, counts, 1);
  }
  const int64_t n_all = int64_t(eids.size());

  // Each local expert over its rows (ascending arrival order; rows are independent).
  std::vector<float> results(n_all * H);
  std::vector<float> x, y;
  std::vector<int64_t> picked;
  for (int64_t j = 0; j < EL; ++j) {
    const int32_t e = int32_t(s.expert_begin + j);
    picked.clear();
    for (int64_t i = 0; i < n_all; ++i)
      if (eids[i] == e) picked.push_back(i);
    if (picked.empty()) continue;
    const int64_t n = int64_t(picked.size());
    x.resize(n * H);
    y.resize(n * H);
    for (int64_t i = 0; i < n; ++i) std::copy_n(rows.data() + picked[i] * H, H, x.data() + i * H);
    const ExpertWeights& w = L.experts[j];
    if (etp.size() == 1)
      cpu::swiglu_mlp(x.data(), w.gate.data<float>(), w.up.data<float>(), w.down.data<float>(), y.data(), n, H, I,
                      bf16);
    else
      swiglu_partial(x.data(), w.gate.data<float>(), w.up.data<float>(), w.down.data<float>(), y.data(), n, H, I,
                     s.expert_cols.size(), kTMax / etp.size(), bf16);
    for (int64_t i = 0; i < n; ++i) std::copy_n(y.data() + i * H, H, results.data() + picked[i] * H);
  }
  if (etp.size() > 1) {
    dist::canonical_all_reduce(etp, results.data(), n_all * H);
    if (bf16) cpu::round_to_bf16(results.data(), n_all * H);  // swiglu_mlp's output cast
  }

  // Combine: results return to the tokens' owners, who sum in ascending expert id.
  std::vector<float> mine(results.begin() + offset * H, results.begin() + (offset + n_mine) * H);
  std::vector<float> back = exchange(ep, mine, recv_n, send_n, H);
  std::vector<float> expert_out(R * k * H);
  int64_t next = 0;
  for (int d = 0; d < P; ++d)
    for (int64_t p : pairs_to[d]) std::copy_n(back.data() + (next++) * H, H, expert_out.data() + p * H);
  cpu::combine_experts(ids.data(), weights.data(), expert_out.data(), out, R, H, k);
}

}  // namespace lockstep
