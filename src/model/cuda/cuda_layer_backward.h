// The CUDA op set of the layer's backward (model/layer.h) on one GPU, the backward's scratch
// and the per-phase clock of the GPU trainer. Included by the trainer's CUDA sources only.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/canonical.h"
#include "kernels/cpu/moe.h"
#include "kernels/cpu/reduce_backward.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/outer_sum_split_tma.h"  // outer_sum_input_parts_summed
#include "kernels/cuda/row_ops.cuh"
#include "model/cuda/cuda_runner_impl.h"
#include "model/cuda/device_params.h"
#include "train/train_memory.h"  // keep_expert_input_rows, keep_attention_ds

namespace lockstep::cuda_model {

// Time per phase of a step, when LOCKSTEP_PROFILE_TRAIN is set, printed as one JSON line per
// step to stderr. With "events", each lap records a CUDA event and nothing synchronises, so the
// step runs as unprofiled: a phase's seconds are the GPU's, and `<phase>_lead` is the least, over
// that phase's laps, of the GPU's time since the step's start minus the host's at the lap's end:
// near 0 where the GPU had caught up with the host (it waited for work). Any other value: each
// lap synchronises the stream and times the phase on the host.
class PhaseClock {
 public:
  explicit PhaseClock(cudaStream_t s) : s_(s) {
    const char* mode = std::getenv("LOCKSTEP_PROFILE_TRAIN");
    on_ = mode != nullptr;
    events_ = on_ && std::string(mode) == "events";
    if (events_) record("start");
  }
  ~PhaseClock() {
    if (!on_) return;
    if (events_) fold_events();
    std::string line =
        std::string("{\"event\":\"cuda_train_profile\",\"clock\":\"") + (events_ ? "events" : "sync") + "\"";
    for (const auto& [name, sec] : seconds_) line += ",\"" + name + "\":" + std::to_string(sec);
    for (const auto& [name, sec] : lead_) line += ",\"" + name + "_lead\":" + std::to_string(sec);
    std::fprintf(stderr, "%s}\n", line.c_str());
  }
  void lap(const char* name) {
    if (!on_) return;
    if (events_) return record(name);
    LS_CUDA_CHECK(cudaStreamSynchronize(s_));
    const auto now = std::chrono::steady_clock::now();
    seconds_[name] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  struct Mark {
    const char* name;
    cudaEvent_t event;
    std::chrono::steady_clock::time_point host;
  };
  void record(const char* name) {
    cudaEvent_t event;
    LS_CUDA_CHECK(cudaEventCreate(&event));
    LS_CUDA_CHECK(cudaEventRecord(event, s_));
    marks_.push_back({name, event, std::chrono::steady_clock::now()});
  }
  // At the step's end (its stream synchronised): no exceptions here, a destructor's work.
  void fold_events() {
    cudaEventSynchronize(marks_.back().event);
    for (size_t i = 1; i < marks_.size(); ++i) {
      float phase_ms = 0, since_start_ms = 0;
      cudaEventElapsedTime(&phase_ms, marks_[i - 1].event, marks_[i].event);
      cudaEventElapsedTime(&since_start_ms, marks_[0].event, marks_[i].event);
      const double host = std::chrono::duration<double>(marks_[i].host - marks_[0].host).count();
      const double lead = since_start_ms / 1e3 - host;
      seconds_[marks_[i].name] += phase_ms / 1e3;
      const auto [it, first] = lead_.emplace(marks_[i].name, lead);
      if (!first) it->second = std::min(it->second, lead);
    }
    for (const Mark& m : marks_) cudaEventDestroy(m.event);
  }

  cudaStream_t s_;
  bool on_ = false, events_ = false;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
  std::map<std::string, double> seconds_, lead_;
  std::vector<Mark> marks_;
};

// How the bf16 linears' gradient GEMMs take the fp32 gradient (lm_head, q/k/v, o_proj, the
// experts): rounded to bf16, accumulated in fp32 (docs/numerics.md, "bfloat16 recipe"). The
// exact form (GradientOperand::exact_hi_lo) takes twice the MMAs; the fixture bound holds
// either way.
constexpr cuda::GradientOperand kGradientOperand = cuda::GradientOperand::bf16;

// The backward's fp32 scratch of one step of T tokens (sized for the largest layer).
struct BackwardScratch {
  float *dh, *dhf, *part;                // [T, H]
  float *dattn, *dq, *dq_proj;           // [T, q_dim]
  float *dk, *dv, *dk_proj;              // [T, kv_dim]
  float *inv, *lse, *delta;              // [T * heads]
  bf16_t *q_proj, *k_proj;               // the forward's q/k projections, contiguous [T, q_dim], [T, kv_dim]
  bf16_t* dattn_bf16;                    // [T, q_dim]: d(attention output) rounded for the MMAs
  float* norm_partials;                  // [8, max(H, head_dim)]: a norm weight gradient's chunk partials
  float *dweights, *dlogits_router;      // [T * k], [T, E]
  float *dy_rows, *dx_rows, *part_rows;  // [T * k, H] (dense: [T, H])
  bf16_t *x_rows, *gu_rows, *act_rows;   // [T * k, H], [T * k, 2I], [T * k, I]
  cuda::AttentionDsScratch attention_ds;  // keep_attention_ds: the attention backward's dS tiles
  float *dact, *dgate, *dup;             // [T * k, I]
  int32_t *row_token, *row_pair, *order, *group_rows;  // [T * k], [T * k], [T * k], [E + 1]
  int32_t* kept_row;                                   // [T * k]: a kept layer's forward row of each row
  cuda::OuterSumGroup* groups;                         // [6 E]: the experts' grouped GEMMs
  cuda::SplitOuterSumGroup* split_groups;              // [6 E]: the same of split dy rows
  float* outer_pending;  // outer_sum_split_workspace_floats(): the large-tile outer sums' pending trees
};

// The CUDA op set of layer_backward (model/layer.h) on one GPU: the layer's intermediates are
// those the runner's LayerOps left in `w` when it recomputed the layer from x_in.
struct CudaLayerBackwardOps {
  using Layer = DeviceLayer;
  CudaRunner& r;
  CudaRunner::Workspace& w;
  const bf16_t* x_in;
  const cuda::DeviceKvLayer& kv;
  const cuda::DeviceSlots& slots;
  const int32_t* seq_first;  // device: sequence token runs (attention backward)
  const int32_t* seq_tokens;
  int64_t num_seqs, max_seq_len;  // host: the runs' count and the longest's tokens
  int64_t T;
  float* dx;  // d(layer output) on entry, d(layer input) on return
  const DeviceLayerFloats& g;
  BackwardScratch& s;
  PhaseClock& clock;
  // A kept layer's expert rows, sorted on the host while the GPU ran ahead, and the same in
  // pinned memory as [row_token | row_pair | order | kept_row | offsets], kept_row the forward's
  // row of each, written only where kept_rows_in_order is false (null: read the routing back now).
  const cpu::ExpertRows* sorted_rows = nullptr;
  const int32_t* sorted_pinned = nullptr;
  bool kept_rows_in_order = false;  // the forward's expert rows are already in sorted_rows' order

  const ModelConfig& c = r.config_;
  cudaStream_t st = r.stream_;
  int64_t H = c.hidden_size, D = c.head_dim, nq = c.num_attention_heads, nkv = c.num_key_value_heads;
  int64_t qd = nq * D, kd = nkv * D;
  float eps = float(c.rms_norm_eps);
  cuda::ChunkBounds chunks = cuda::token_chunk_bounds(T);

  // Whether every expert GEMM takes the split kernel (outer_sum_split_tc_supported): H and I
  // multiples of 8 (so every expert's row block is 16-byte aligned too) and their chunks'.
  static bool split_expert_gemms(int64_t H, int64_t I) {
    return cuda::outer_sum_split_tc_supported(1, H, I, cuda::token_chunk_bounds(1), H) &&
           cuda::outer_sum_split_tc_supported(H, 1, I, cuda::token_chunk_bounds(H), 8) &&
           cuda::outer_sum_split_tc_supported(1, I, H, cuda::token_chunk_bounds(1), I) &&
           cuda::outer_sum_split_tc_supported(I, 1, H, cuda::token_chunk_bounds(I), 8);
  }

  void moe_residual_backward(const Layer& L) {
    const int64_t E = c.num_experts, k = c.num_experts_per_tok, I = c.moe_intermediate_size, rows = T * k;
    // The (token, slot) rows by expert, tokens ascending in each (the CPU's assign_tokens):
    // the experts' weight-gradient trees sum in that order.
    cpu::ExpertRows read_back;
    if (sorted_rows) {
      const int32_t* p = sorted_pinned;
      r.upload_async(s.row_token, p, size_t(rows) * 4);
      r.upload_async(s.row_pair, p + rows, size_t(rows) * 4);
      r.upload_async(s.order, p + 2 * rows, size_t(rows) * 4);
      if (!kept_rows_in_order) r.upload_async(s.kept_row, p + 3 * rows, size_t(rows) * 4);
      r.upload_async(s.group_rows, p + 4 * rows, size_t(E + 1) * 4);
    } else {
      std::vector<int32_t> ids(static_cast<size_t>(rows));
      LS_CUDA_CHECK(cudaMemcpyAsync(ids.data(), w.ids, ids.size() * 4, cudaMemcpyDeviceToHost, st));
      LS_CUDA_CHECK(cudaStreamSynchronize(st));
      read_back = cpu::expert_rows(ids.data(), T, k, E);
      r.upload_async(s.row_token, read_back.row_token.data(), read_back.row_token.size() * 4);
      r.upload_async(s.row_pair, read_back.row_pair.data(), read_back.row_pair.size() * 4);
      r.upload_async(s.order, read_back.order.data(), read_back.order.size() * 4);
      r.upload_async(s.group_rows, read_back.offsets.data(), read_back.offsets.size() * 4);
    }
    const cpu::ExpertRows& by_expert = sorted_rows ? *sorted_rows : read_back;
    const std::vector<int32_t>& row_token = by_expert.row_token;
    const std::vector<int32_t>& offsets = by_expert.offsets;
    clock.lap("backward_moe_sort");

    // The experts' internals: a kept layer's forward rows in this order (read in place where
    // the forward placed them so), else recomputed per row with the forward's GEMM and SwiGLU
    // (the same bits).
    const bf16_t *gu_rows = s.gu_rows, *act_rows = s.act_rows, *x_rows = s.x_rows;
    const bool in_place = sorted_rows && w.keep_gate_up && kept_rows_in_order;
    if (in_place && w.x_rows != nullptr)
      x_rows = w.x_rows;
    else
      cuda::gather_rows(w.h_mlp, s.row_token, s.x_rows, rows, H, st);
    if (in_place) {
      gu_rows = w.gu, act_rows = w.act;
    } else if (sorted_rows && w.keep_gate_up) {
      cuda::gather_rows(w.gu, s.kept_row, s.gu_rows, rows, 2 * I, st);
      cuda::gather_rows(w.act, s.kept_row, s.act_rows, rows, I, st);
    } else {  // with keep_expert_input_rows from the gathered rows, read contiguously (by TMA)
      const bool gathered = keep_expert_input_rows();
      cuda::gemm(r.expert_gate_up_args(L, gathered ? s.x_rows : w.h_mlp, gathered ? nullptr : s.row_token, s.group_rows,
                                       rows, s.gu_rows),
                 st);
      cuda::swiglu(s.gu_rows, s.act_rows, rows, I, st);
    }
    const bool split = split_expert_gemms(H, I);
    // The GEMMs' gradient rows are written packed as they are made where the GEMMs read them so.
    const bool packed = split && kGradientOperand == cuda::GradientOperand::bf16;
    const cuda::RowsOut rows_out = packed ? cuda::RowsOut::packed_bf16 : cuda::RowsOut::fp32;
    cuda::expert_output_backward(dx, w.y, w.expert_weights, s.row_token, s.row_pair, s.dweights, s.dy_rows, rows, H, st,
                                 rows_out, cuda::expert_output_by_token() ? s.order : nullptr, k);
    clock.lap("backward_moe_recompute");
    // The experts' GEMMs, each kind one launch over the experts with tokens (an expert without
    // any gets zeros): down (weight, input), SwiGLU, gate and up (weights,
    // inputs). Their dy rows are read by these GEMMs only, so they are split (packed) in place.
    // With the input parts summed, d x's gate and up parts go to one output in one launch.
    const bool sum_parts =
        packed && cuda::outer_sum_input_parts_summed() &&
        cuda::outer_sum_split_tma_applies(false, I, H, cuda::token_chunk_bounds(I), kGradientOperand);
    std::vector<cuda::SplitOuterSumGroup> down_w, down_in, gate_up_w, gate_in, up_in;
    int64_t max_rows = 0;
    const auto as_split = [](const float* p) { return reinterpret_cast<const cuda::bf16_t*>(p); };
    for (int64_t e = 0; e < E; ++e) {
      const int64_t first = offsets[size_t(e)], n = offsets[size_t(e) + 1] - first;
      if (n == 0) {  // no GEMM writes its gradients
        LS_CUDA_CHECK(cudaMemsetAsync(g.gate_up + e * 2 * I * H, 0, size_t(2 * I * H) * 4, st));
        LS_CUDA_CHECK(cudaMemsetAsync(g.down + e * H * I, 0, size_t(H * I) * 4, st));
        continue;
      }
      max_rows = std::max(max_rows, n);
      const cuda::ChunkBounds b = cuda::chunk_bounds(cpu::token_chunks_of(row_token.data() + first, n, T));
      const auto *dy = as_split(s.dy_rows + first * H), *dgate = as_split(s.dgate + first * I),
                 *dup = as_split(s.dup + first * I);
      const bf16_t* gate_w = L.gate_up + e * 2 * I * H;
      down_w.push_back({dy, act_rows + first * I, g.down + e * H * I, H, b});
      down_in.push_back({dy, L.down + e * H * I, s.dact + first * I, n, cuda::token_chunk_bounds(H)});
      gate_up_w.push_back({dgate, x_rows + first * H, g.gate_up + e * 2 * I * H, I, b});
      gate_up_w.push_back({dup, x_rows + first * H, g.gate_up + e * 2 * I * H + I * H, I, b});
      gate_in.push_back({dgate, gate_w, s.dx_rows + first * H, n, cuda::token_chunk_bounds(I)});
      up_in.push_back(
          {dup, gate_w + I * H, (sum_parts ? s.dx_rows : s.part_rows) + first * H, n, cuda::token_chunk_bounds(I)});
    }
    const size_t used = down_w.size();
    std::vector<cuda::SplitOuterSumGroup> all;
    for (const auto* part : {&down_w, &down_in, &gate_up_w}) all.insert(all.end(), part->begin(), part->end());
    // d x: gate's groups, then up's (the two runs of a sum in parts); else each expert's pair.
    if (sum_parts) {
      all.insert(all.end(), gate_in.begin(), gate_in.end());
      all.insert(all.end(), up_in.begin(), up_in.end());
    } else {
      for (size_t e = 0; e < used; ++e) all.push_back(gate_in[e]), all.push_back(up_in[e]);
    }
    const int n_used = int(used);
    if (split) {
      // Tiles of the same bits: on the bf16 gradient the grouped TMA tile (the wgmma tile where
      // it does not apply), its groups as the kernel's parameters, read as rows
      // of the buffers `spans` names; on the exact one the mma.sync 128 x 128 tile from a
      // device table, which the wgmma tile did not beat there (notes/gpu-trainer.md, v13, v15).
      const bool wgmma = kGradientOperand == cuda::GradientOperand::bf16;
      if (!wgmma) r.upload_async(s.split_groups, all.data(), all.size() * sizeof(cuda::SplitOuterSumGroup));
      const auto grouped = [&](size_t first, int count, int64_t max_I, int64_t g_row, int64_t g_col, int64_t K,
                               const cuda::SplitSpans& spans, int parts = 1) {
        if (!wgmma)
          return cuda::outer_sum_split_grouped_tc(s.split_groups + first, count, max_I, g_row, g_col, K, st, nullptr,
                                                  cuda::SplitTile::automatic, kGradientOperand);
        cuda::outer_sum_split_grouped_wgmma(all.data() + first, count, max_I, g_row, g_col, K, st, kGradientOperand,
                                            &spans, parts);
      };
      // g in one buffer (or two: gate's and up's) of `rows` rows, m in one of m_rows.
      const auto spans = [&](const void* g, const void* g_second, const void* m, int64_t m_rows) {
        cuda::SplitSpans out;
        out.g[0] = static_cast<const cuda::bf16_t*>(g), out.g[1] = static_cast<const cuda::bf16_t*>(g_second);
        out.g_rows[0] = out.g_rows[1] = rows;
        out.m[0] = static_cast<const cuda::bf16_t*>(m), out.m_rows[0] = m_rows;
        return out;
      };
      if (!packed) cuda::to_gradient_operand(s.dy_rows, rows, H, kGradientOperand, st);
      grouped(0, n_used, H, 1, H, I, spans(s.dy_rows, nullptr, act_rows, rows));           // d down
      grouped(used, n_used, max_rows, H, 1, I, spans(s.dy_rows, nullptr, L.down, E * H));  // d act
      cuda::swiglu_backward(gu_rows, s.dact, s.dgate, s.dup, rows, I, st, rows_out);
      if (!packed) {
        cuda::to_gradient_operand(s.dgate, rows, I, kGradientOperand, st);
        cuda::to_gradient_operand(s.dup, rows, I, kGradientOperand, st);
      }
      grouped(2 * used, 2 * n_used, I, 1, I, H, spans(s.dgate, s.dup, x_rows, rows));                 // d gate, up
      grouped(4 * used, 2 * n_used, max_rows, I, 1, H, spans(s.dgate, s.dup, L.gate_up, E * 2 * I),
              sum_parts ? 2 : 1);  // d x
    } else {
      // The same sums from fp32 dy (shapes the split kernel does not take): the same bits.
      const bool round = kGradientOperand == cuda::GradientOperand::bf16;
      std::vector<cuda::OuterSumGroup> plain;
      for (const auto& a : all) plain.push_back({reinterpret_cast<const float*>(a.g), a.m, a.out, a.I, a.bounds});
      r.upload_async(s.groups, plain.data(), plain.size() * sizeof(cuda::OuterSumGroup));
      if (round) cuda::round_to_bf16(s.dy_rows, rows * H, st);
      cuda::outer_sum_grouped_tc(s.groups, n_used, H, 1, H, I, st);                // d down
      cuda::outer_sum_grouped_tc(s.groups + used, n_used, max_rows, H, 1, I, st);  // d act
      cuda::swiglu_backward(gu_rows, s.dact, s.dgate, s.dup, rows, I, st);
      if (round) cuda::round_to_bf16(s.dgate, rows * I, st), cuda::round_to_bf16(s.dup, rows * I, st);
      cuda::outer_sum_grouped_tc(s.groups + 2 * used, 2 * n_used, I, 1, I, H, st);         // d gate, d up
      cuda::outer_sum_grouped_tc(s.groups + 4 * used, 2 * n_used, max_rows, I, 1, H, st);  // d x (two parts)
    }
    clock.lap("backward_moe_experts");
    cuda::route_topk_backward(w.router_logits, w.ids, w.expert_weights, s.dweights, s.dlogits_router, T, E, k,
                              c.norm_topk_prob, st);
    // The router's weight gradient (E x H outputs over T rows): its chunks in parallel blocks
    // (the same bits) where their partials fit the outer sums' workspace.
    if (const int64_t ws = cuda::outer_sum_split_workspace_floats(); chunks.count * E * H <= ws)
      cuda::outer_sum_chunk_parallel_tc(s.dlogits_router, 1, E, w.h_mlp, H, chunks, g.router, E, s.outer_pending, ws,
                                        st);
    else
      cuda::linear_weight_grad(s.dlogits_router, w.h_mlp, g.router, E, H, chunks, st);
    // Its input gradient on the split tiles: g split into bf16 hi + lo in place (the fp32 g's
    // bits; the weight gradient above has read it).
    if (const auto over_e = cuda::token_chunk_bounds(E); cuda::outer_sum_split_tc_supported(E, 1, H, over_e, T)) {
      cuda::to_gradient_operand(s.dlogits_router, T, E, cuda::GradientOperand::exact_hi_lo, st);
      cuda::outer_sum_split_tc(reinterpret_cast<const bf16_t*>(s.dlogits_router), E, 1, L.router, H, over_e, s.dh, T,
                               st, s.outer_pending, cuda::SplitTile::automatic, cuda::GradientOperand::exact_hi_lo);
    } else {
      cuda::linear_input_grad(s.dlogits_router, L.router, s.dh, T, E, H, st);
    }
    // Each row's two parts (gate's, up's) are added as the rows are gathered: one pass (or were
    // summed by d x's GEMM).
    cuda::add_rows_in_order(s.dh, s.dx_rows, sum_parts ? nullptr : s.part_rows, s.order, T, k, H, st);
    clock.lap("backward_moe_router");
  }

  void dense_mlp_residual_backward(const Layer& L) {
    const int64_t I = c.intermediate_size;
    r.linear(w.h_mlp, L.gate_up, s.gu_rows, T, 2 * I, H);
    cuda::swiglu(s.gu_rows, s.act_rows, T, I, st);
    cuda::linear_weight_grad(dx, s.act_rows, g.down, H, I, chunks, st);
    cuda::linear_input_grad(dx, L.down, s.dact, T, H, I, st);
    cuda::swiglu_backward(s.gu_rows, s.dact, s.dgate, s.dup, T, I, st);
    cuda::linear_weight_grad(s.dgate, w.h_mlp, g.gate_up, I, H, chunks, st);
    cuda::linear_weight_grad(s.dup, w.h_mlp, g.gate_up + I * H, I, H, chunks, st);
    cuda::linear_input_grad(s.dgate, L.gate_up, s.dh, T, I, H, st);
    cuda::linear_input_grad(s.dup, L.gate_up + I * H, s.part, T, I, H, st);
    cuda::add_inplace(s.dh, s.part, T * H, st);
    clock.lap("backward_dense_mlp");
  }

  void post_attention_norm_backward(const Layer& L) {
    cuda::inverse_rms_rows(w.mid, s.inv, T, H, eps, cuda::kNormThreads, st);
    cuda::rmsnorm_backward(w.mid, s.inv, L.post_norm, s.dh, dx, g.post_norm, s.norm_partials, T, H, true, chunks, st,
                           true);
    clock.lap("backward_norms");
  }

  void o_proj_residual_backward(const Layer& L) {
    // dx goes on down the residual: the GEMMs consume a copy (T x H fp32, a few microseconds).
    LS_CUDA_CHECK(cudaMemcpyAsync(s.part, dx, size_t(T * H) * 4, cudaMemcpyDeviceToDevice, st));
    cuda::linear_grads_consuming_dy(s.part, w.attn, L.o, g.o, s.dattn, T, H, qd, chunks, s.outer_pending, st,
                                    kGradientOperand);
    clock.lap("backward_o_proj");
  }

  void attention_backward() {
    const float scale = 1.0f / std::sqrt(float(D));
    // The forward's log-sum-exp where its tensor-core attention wrote one (else computed here).
    const bool forward_lse = w.lse != nullptr && cuda::tensor_core_attention_supported(D, nq / nkv);
    if (cuda::attention_backward_tc_supported(D))
      cuda::paged_attention_backward_tc(w.q, w.attn, s.dattn, kv, slots, seq_first, seq_tokens, T, nq, num_seqs,
                                        max_seq_len, scale, forward_lse ? w.lse : s.lse, s.delta, s.dattn_bf16, s.dq,
                                        s.dk, s.dv, st, cuda::AttentionKernel::automatic, forward_lse, s.attention_ds);
    else
      cuda::paged_attention_backward(w.q, w.attn, s.dattn, kv, slots, seq_first, seq_tokens, T, nq, scale, s.lse,
                                     s.delta, s.dq, s.dk, s.dv, st);
    clock.lap("backward_attention");
  }

  void qk_norm_rope_backward(const Layer& L) {
    // The heads' projections before q_norm/k_norm, read in place from the qkv rows [q | k | v].
    const int64_t pitch = qd + 2 * kd;
    if (cuda::qk_norm_rope_backward_supported(D)) {
      cuda::qk_norm_rope_backward(s.dq, w.qkv, pitch, slots.positions, r.rope_cos_, r.rope_sin_, L.q_norm, s.inv,
                                  s.dq_proj, T, nq, D, eps, st);
      cuda::rmsnorm_weight_grad(w.qkv, nq, pitch, s.inv, s.dq, g.q_norm, s.norm_partials, D, true,
                                cuda::token_chunk_bounds(T, nq), st);
      cuda::qk_norm_rope_backward(s.dk, w.qkv + qd, pitch, slots.positions, r.rope_cos_, r.rope_sin_, L.k_norm, s.inv,
                                  s.dk_proj, T, nkv, D, eps, st);
      cuda::rmsnorm_weight_grad(w.qkv + qd, nkv, pitch, s.inv, s.dk, g.k_norm, s.norm_partials, D, true,
                                cuda::token_chunk_bounds(T, nkv), st);
      clock.lap("backward_qk_norm_rope");
      return;
    }
    // Other head sizes: the same operations as separate passes over contiguous copies.
    cuda::rope_backward(s.dq, slots.positions, r.rope_cos_, r.rope_sin_, T, nq, D, st);
    cuda::rope_backward(s.dk, slots.positions, r.rope_cos_, r.rope_sin_, T, nkv, D, st);
    LS_CUDA_CHECK(cudaMemcpy2DAsync(s.q_proj, size_t(qd) * 2, w.qkv, size_t(pitch) * 2, size_t(qd) * 2, size_t(T),
                                    cudaMemcpyDeviceToDevice, st));
    LS_CUDA_CHECK(cudaMemcpy2DAsync(s.k_proj, size_t(kd) * 2, w.qkv + qd, size_t(pitch) * 2, size_t(kd) * 2, size_t(T),
                                    cudaMemcpyDeviceToDevice, st));
    cuda::inverse_rms_rows(s.q_proj, s.inv, T * nq, D, eps, 32, st);
    cuda::rmsnorm_backward(s.q_proj, s.inv, L.q_norm, s.dq, s.dq_proj, g.q_norm, s.norm_partials, T * nq, D, true,
                           cuda::token_chunk_bounds(T, nq), st);
    cuda::inverse_rms_rows(s.k_proj, s.inv, T * nkv, D, eps, 32, st);
    cuda::rmsnorm_backward(s.k_proj, s.inv, L.k_norm, s.dk, s.dk_proj, g.k_norm, s.norm_partials, T * nkv, D, true,
                           cuda::token_chunk_bounds(T, nkv), st);
    clock.lap("backward_qk_norm_rope");
  }

  void qkv_backward(const Layer& L) {
    // d(norm output) = q part + k part + v part, each canonical over its own N.
    cuda::linear_grads_consuming_dy(s.dq_proj, w.h, L.qkv, g.qkv, s.dhf, T, qd, H, chunks, s.outer_pending, st,
                                    kGradientOperand);
    cuda::linear_grads_consuming_dy(s.dk_proj, w.h, L.qkv + qd * H, g.qkv + qd * H, s.part, T, kd, H, chunks,
                                    s.outer_pending, st, kGradientOperand);
    cuda::add_inplace(s.dhf, s.part, T * H, st);
    cuda::linear_grads_consuming_dy(s.dv, w.h, L.qkv + (qd + kd) * H, g.qkv + (qd + kd) * H, s.part, T, kd, H, chunks,
                                    s.outer_pending, st, kGradientOperand);
    cuda::add_inplace(s.dhf, s.part, T * H, st);
    clock.lap("backward_qkv");
  }

  void input_norm_backward(const Layer& L) {
    cuda::inverse_rms_rows(x_in, s.inv, T, H, eps, cuda::kNormThreads, st);
    cuda::rmsnorm_backward(x_in, s.inv, L.input_norm, s.dhf, dx, g.input_norm, s.norm_partials, T, H, true, chunks, st,
                           true);
    clock.lap("backward_norms");
  }
};

}  // namespace lockstep::cuda_model
