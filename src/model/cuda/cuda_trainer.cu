// The GPU trainer's backward (cuda_trainer.h): the step's forward through the runner's op set,
// the head and loss gradient, each layer recomputed and run backward through the CUDA
// backward op set, the embedding's rows. fp32 gradients in device buffers of the weights'
// shapes, downloaded into a ModelWeights at the end.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <string>

#include "kernels/canonical.h"
#include "kernels/cpu/reduce_backward.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/row_ops.cuh"
#include "model/cuda/cuda_runner_impl.h"
#include "model/cuda/cuda_trainer.h"
#include "model/cuda/device_params.h"
#include "model/qwen3_moe.h"
#include "train/train_memory.h"

namespace lockstep {
namespace cuda_model {

// Time per phase of a step, when LOCKSTEP_PROFILE_TRAIN is set (each lap synchronises the
// stream, so it slows the step; printed as one JSON line per step to stderr).
class PhaseClock {
 public:
  explicit PhaseClock(cudaStream_t s) : s_(s), on_(std::getenv("LOCKSTEP_PROFILE_TRAIN") != nullptr) {}
  ~PhaseClock() {
    if (!on_) return;
    std::string line = "{\"event\":\"cuda_train_profile\"";
    for (const auto& [name, sec] : seconds_) line += ",\"" + name + "\":" + std::to_string(sec);
    std::fprintf(stderr, "%s}\n", line.c_str());
  }
  void lap(const char* name) {
    if (!on_) return;
    LS_CUDA_CHECK(cudaStreamSynchronize(s_));
    const auto now = std::chrono::steady_clock::now();
    seconds_[name] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  cudaStream_t s_;
  bool on_;
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
  std::map<std::string, double> seconds_;
};

// The backward's fp32 scratch of one step of T tokens (sized for the largest layer).
struct BackwardScratch {
  float *dh, *dnorm, *dhf, *part;        // [T, H]
  float *dattn, *dq, *dq_proj;           // [T, q_dim]
  float *dk, *dv, *dk_proj;              // [T, kv_dim]
  float *inv, *lse, *delta;              // [T * heads]
  bf16_t *q_proj, *k_proj;               // the forward's q/k projections, contiguous [T, q_dim], [T, kv_dim]
  float *dweights, *dlogits_router;      // [T * k], [T, E]
  float *dy_rows, *dx_rows, *part_rows;  // [T * k, H] (dense: [T, H])
  bf16_t *x_rows, *gu_rows, *act_rows;   // [T * k, H], [T * k, 2I], [T * k, I]
  float *dact, *dgate, *dup;             // [T * k, I]
  int32_t *row_token, *row_pair, *order, *group_rows;  // [T * k], [T * k], [T * k], [E + 1]
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
  int64_t T;
  float* dx;  // d(layer output) on entry, d(layer input) on return
  const DeviceLayerFloats& g;
  BackwardScratch& s;
  PhaseClock& clock;

  const ModelConfig& c = r.config_;
  cudaStream_t st = r.stream_;
  int64_t H = c.hidden_size, D = c.head_dim, nq = c.num_attention_heads, nkv = c.num_key_value_heads;
  int64_t qd = nq * D, kd = nkv * D;
  float eps = float(c.rms_norm_eps);
  cuda::ChunkBounds chunks = cuda::token_chunk_bounds(T);

  void moe_residual_backward(const Layer& L) {
    const int64_t E = c.num_experts, k = c.num_experts_per_tok, I = c.moe_intermediate_size, rows = T * k;
    // The (token, slot) rows by expert, tokens ascending in each (the CPU's assign_tokens):
    // the experts' weight-gradient trees sum in that order.
    std::vector<int32_t> ids(static_cast<size_t>(rows));
    LS_CUDA_CHECK(cudaMemcpyAsync(ids.data(), w.ids, ids.size() * 4, cudaMemcpyDeviceToHost, st));
    LS_CUDA_CHECK(cudaStreamSynchronize(st));
    std::vector<std::vector<int32_t>> pairs(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j) pairs[size_t(ids[size_t(t * k + j)])].push_back(int32_t(t * k + j));
    std::vector<int32_t> row_token, row_pair, row_of_pair(static_cast<size_t>(rows)), offsets{0};
    for (int64_t e = 0; e < E; ++e) {
      for (int32_t p : pairs[size_t(e)]) {
        row_of_pair[size_t(p)] = int32_t(row_token.size());
        row_token.push_back(p / int32_t(k));
        row_pair.push_back(p);
      }
      offsets.push_back(int32_t(row_token.size()));
    }
    // Each token's rows in ascending expert id (the order its input gradients are added).
    std::vector<int32_t> order(static_cast<size_t>(rows));
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> slots_of(static_cast<size_t>(k));
      std::iota(slots_of.begin(), slots_of.end(), 0);
      std::stable_sort(slots_of.begin(), slots_of.end(),
                       [&](int32_t a, int32_t b) { return ids[size_t(t * k + a)] < ids[size_t(t * k + b)]; });
      for (int64_t j = 0; j < k; ++j) order[size_t(t * k + j)] = row_of_pair[size_t(t * k + slots_of[size_t(j)])];
    }
    r.upload_async(s.row_token, row_token.data(), row_token.size() * 4);
    r.upload_async(s.row_pair, row_pair.data(), row_pair.size() * 4);
    r.upload_async(s.order, order.data(), order.size() * 4);
    r.upload_async(s.group_rows, offsets.data(), offsets.size() * 4);

    // The experts' internals, recomputed per row with the forward's GEMM and SwiGLU.
    cuda::gemm(r.expert_gate_up_args(L, w.h_mlp, s.row_token, s.group_rows, rows, s.gu_rows), st);
    cuda::swiglu(s.gu_rows, s.act_rows, rows, I, st);
    cuda::gather_rows(w.h_mlp, s.row_token, s.x_rows, rows, H, st);
    cuda::expert_output_backward(dx, w.y, w.expert_weights, s.row_token, s.row_pair, s.dweights, s.dy_rows, rows, H,
                                 st);
    for (int64_t e = 0; e < E; ++e) {
      const int64_t first = offsets[size_t(e)], n = offsets[size_t(e) + 1] - first;
      if (n == 0) continue;  // its gradients stay zero
      std::vector<int32_t> tokens(row_token.begin() + first, row_token.begin() + first + n);
      const cpu::TokenChunks tc = cpu::token_chunks_of(tokens.data(), n, T);
      cuda::ChunkBounds b;
      std::copy(tc.rows, tc.rows + kTMax + 1, b.rows);
      const float* dy = s.dy_rows + first * H;
      const bf16_t* x = s.x_rows + first * H;
      float *dact = s.dact + first * I, *dgate = s.dgate + first * I, *dup = s.dup + first * I;
      const bf16_t* gate_w = L.gate_up + e * 2 * I * H;
      cuda::linear_weight_grad(dy, s.act_rows + first * I, g.down + e * H * I, H, I, b, st);
      cuda::linear_input_grad(dy, L.down + e * H * I, dact, n, H, I, st);
      cuda::swiglu_backward(s.gu_rows + first * 2 * I, dact, dgate, dup, n, I, st);
      cuda::linear_weight_grad(dgate, x, g.gate_up + e * 2 * I * H, I, H, b, st);
      cuda::linear_weight_grad(dup, x, g.gate_up + e * 2 * I * H + I * H, I, H, b, st);
      cuda::linear_input_grad(dgate, gate_w, s.dx_rows + first * H, n, I, H, st);
      cuda::linear_input_grad(dup, gate_w + I * H, s.part_rows + first * H, n, I, H, st);
    }
    cuda::add_inplace(s.dx_rows, s.part_rows, rows * H, st);
    cuda::route_topk_backward(w.router_logits, w.ids, w.expert_weights, s.dweights, s.dlogits_router, T, E, k,
                              c.norm_topk_prob, st);
    cuda::linear_weight_grad(s.dlogits_router, w.h_mlp, g.router, E, H, chunks, st);
    cuda::linear_input_grad(s.dlogits_router, L.router, s.dh, T, E, H, st);
    cuda::add_rows_in_order(s.dh, s.dx_rows, s.order, T, k, H, st);
    clock.lap("backward_moe");
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
    cuda::rmsnorm_backward(w.mid, s.inv, L.post_norm, s.dh, s.dnorm, g.post_norm, T, H, true, chunks, st);
    cuda::add_inplace(dx, s.dnorm, T * H, st);
    clock.lap("backward_norms");
  }

  void o_proj_residual_backward(const Layer& L) {
    cuda::linear_weight_grad(dx, w.attn, g.o, H, qd, chunks, st);
    cuda::linear_input_grad(dx, L.o, s.dattn, T, H, qd, st);
    clock.lap("backward_o_proj");
  }

  void attention_backward() {
    cuda::paged_attention_backward(w.q, w.attn, s.dattn, kv, slots, seq_first, seq_tokens, T, nq,
                                   1.0f / std::sqrt(float(D)), s.lse, s.delta, s.dq, s.dk, s.dv, st);
    clock.lap("backward_attention");
  }

  void qk_norm_rope_backward(const Layer& L) {
    cuda::rope_backward(s.dq, slots.positions, r.rope_cos_, r.rope_sin_, T, nq, D, st);
    cuda::rope_backward(s.dk, slots.positions, r.rope_cos_, r.rope_sin_, T, nkv, D, st);
    // The projections before q_norm/k_norm, from the qkv rows [q | k | v] of each token.
    const size_t pitch = size_t(qd + 2 * kd) * 2;
    LS_CUDA_CHECK(cudaMemcpy2DAsync(s.q_proj, size_t(qd) * 2, w.qkv, pitch, size_t(qd) * 2, size_t(T),
                                    cudaMemcpyDeviceToDevice, st));
    LS_CUDA_CHECK(cudaMemcpy2DAsync(s.k_proj, size_t(kd) * 2, w.qkv + qd, pitch, size_t(kd) * 2, size_t(T),
                                    cudaMemcpyDeviceToDevice, st));
    cuda::inverse_rms_rows(s.q_proj, s.inv, T * nq, D, eps, 32, st);
    cuda::rmsnorm_backward(s.q_proj, s.inv, L.q_norm, s.dq, s.dq_proj, g.q_norm, T * nq, D, true,
                           cuda::token_chunk_bounds(T, nq), st);
    cuda::inverse_rms_rows(s.k_proj, s.inv, T * nkv, D, eps, 32, st);
    cuda::rmsnorm_backward(s.k_proj, s.inv, L.k_norm, s.dk, s.dk_proj, g.k_norm, T * nkv, D, true,
                           cuda::token_chunk_bounds(T, nkv), st);
    clock.lap("backward_qk_norm_rope");
  }

  void qkv_backward(const Layer& L) {
    cuda::linear_weight_grad(s.dq_proj, w.h, g.qkv, qd, H, chunks, st);
    cuda::linear_weight_grad(s.dk_proj, w.h, g.qkv + qd * H, kd, H, chunks, st);
    cuda::linear_weight_grad(s.dv, w.h, g.qkv + (qd + kd) * H, kd, H, chunks, st);
    // d(norm output) = q part + k part + v part, each canonical over its own N.
    cuda::linear_input_grad(s.dq_proj, L.qkv, s.dhf, T, qd, H, st);
    cuda::linear_input_grad(s.dk_proj, L.qkv + qd * H, s.part, T, kd, H, st);
    cuda::add_inplace(s.dhf, s.part, T * H, st);
    cuda::linear_input_grad(s.dv, L.qkv + (qd + kd) * H, s.part, T, kd, H, st);
    cuda::add_inplace(s.dhf, s.part, T * H, st);
    clock.lap("backward_qkv");
  }

  void input_norm_backward(const Layer& L) {
    cuda::inverse_rms_rows(x_in, s.inv, T, H, eps, cuda::kNormThreads, st);
    cuda::rmsnorm_backward(x_in, s.inv, L.input_norm, s.dhf, s.dnorm, g.input_norm, T, H, true, chunks, st);
    cuda::add_inplace(dx, s.dnorm, T * H, st);
    clock.lap("backward_norms");
  }
};

class CudaTrainer {
 public:
  explicit CudaTrainer(CudaRunner& runner) : r_(runner), c_(runner.config_) {}

  // Refuses, before any allocation, a step whose buffers do not fit the free GPU memory.
  // (`backward`: with the gradients and the backward's scratch; else the forward's alone.)
  // `grads_held`: the gradients' buffers are already allocated (not counted); else those of a
  // step of `micro_batches` (train/train_memory.h).
  void check_memory(int64_t T, int64_t micro_batches, bool backward, bool grads_held) const;

  // Gradients into `grads` (allocated for the model; overwritten), or with a null `upstream`
  // the forward alone: the log-probs go to `scored`.
  void step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy, const UpstreamFn& upstream,
                  DeviceFloats* grads, std::vector<std::vector<float>>* scored = nullptr);

 private:
  template <typename T>
  T* alloc(int64_t n) {
    return arena_.alloc<T>(n);
  }
  BackwardScratch scratch(int64_t T);

  CudaRunner& r_;
  const ModelConfig& c_;
  DeviceArena arena_;
};

BackwardScratch CudaTrainer::scratch(int64_t T) {
  const auto& c = c_;
  const int64_t H = c.hidden_size, qd = c.q_dim(), kd = c.kv_dim();
  const int64_t k = std::max<int64_t>(c.num_experts_per_tok, 1), E = std::max<int64_t>(c.num_experts, 1);
  const int64_t rows = std::max(T * k, T), I = std::max(c.moe_intermediate_size, c.intermediate_size);
  const int64_t heads = std::max(c.num_attention_heads, c.num_key_value_heads);
  BackwardScratch s;
  s.dh = alloc<float>(T * H), s.dnorm = alloc<float>(T * H), s.dhf = alloc<float>(T * H), s.part = alloc<float>(T * H);
  s.dattn = alloc<float>(T * qd), s.dq = alloc<float>(T * qd), s.dq_proj = alloc<float>(T * qd);
  s.dk = alloc<float>(T * kd), s.dv = alloc<float>(T * kd), s.dk_proj = alloc<float>(T * kd);
  s.inv = alloc<float>(T * heads), s.lse = alloc<float>(T * heads), s.delta = alloc<float>(T * heads);
  s.q_proj = alloc<bf16_t>(T * qd), s.k_proj = alloc<bf16_t>(T * kd);
  s.dweights = alloc<float>(T * k), s.dlogits_router = alloc<float>(T * E);
  s.dy_rows = alloc<float>(rows * H), s.dx_rows = alloc<float>(rows * H), s.part_rows = alloc<float>(rows * H);
  s.x_rows = alloc<bf16_t>(rows * H), s.gu_rows = alloc<bf16_t>(rows * 2 * I), s.act_rows = alloc<bf16_t>(rows * I);
  s.dact = alloc<float>(rows * I), s.dgate = alloc<float>(rows * I), s.dup = alloc<float>(rows * I);
  s.row_token = alloc<int32_t>(rows), s.row_pair = alloc<int32_t>(rows), s.order = alloc<int32_t>(rows);
  s.group_rows = alloc<int32_t>(E + 1);
  return s;
}

void CudaTrainer::check_memory(int64_t T, int64_t micro_batches, bool backward, bool grads_held) const {
  // The weights and the optimizer state are already on the device; the step adds the rest.
  const TrainMemory m = cuda_train_memory(c_, T, micro_batches);
  const double grads = backward && !grads_held ? m.gradients : 0.0;
  size_t free_bytes = 0, total_bytes = 0;
  LS_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const double need = m.logits + grads + m.activations, gib = 1024.0 * 1024.0 * 1024.0;
  char detail[160];
  std::snprintf(detail, sizeof detail, "%.1f GiB of GPU memory (logits %.1f, gradients %.1f, activations %.1f), %.1f",
                need / gib, m.logits / gib, grads / gib, m.activations / gib, double(free_bytes) / gib);
  LS_CHECK(need <= double(free_bytes), "cuda trainer: a micro-batch of ", T, " tokens needs ", detail,
           " GiB free: cut the batch into more micro-batches (--num-microbatches)");
}

void CudaTrainer::step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy,
                             const UpstreamFn& upstream, DeviceFloats* grads, std::vector<std::vector<float>>* scored) {
  const auto& c = c_;
  const int64_t H = c.hidden_size, V = c.vocab_size, NL = c.num_hidden_layers, qd = c.q_dim(), kd = c.kv_dim();
  const float eps = float(c.rms_norm_eps);
  cudaStream_t st = r_.stream_;
  LS_CHECK(!seqs.empty(), "cuda step_grads: no sequences");
  for (size_t i = 0; i < seqs.size(); ++i)
    LS_CHECK(seqs[i].size() >= 2, "cuda step_grads: sequence ", i, " has ", seqs[i].size(),
             " token(s); a predicted token needs at least 2");
  PackedSequences packed = pack_sequences(seqs);
  const int64_t T = packed.batch.size();
  arena_.clear();
  check_memory(T, 1, upstream != nullptr, true);

  // The step's K/V: one layer's pages, rewritten by each layer's forward and recomputation.
  const int64_t pages = packed.num_pages, D = c.head_dim, nkv = c.num_key_value_heads;
  cuda::DeviceKvLayer kv;
  kv.k = alloc<bf16_t>(pages * kAttnBlock * nkv * D);
  kv.v = alloc<bf16_t>(pages * kAttnBlock * nkv * D);
  kv.page_size = kAttnBlock;
  kv.kv_heads = nkv;
  kv.head_dim = D;
  r_.reserve(T, 1);
  const cuda::DeviceSlots slots = r_.upload_batch(packed.batch, pages, kAttnBlock);
  // Sequence s's tokens by position (the packer lays them out in order).
  std::vector<int32_t> seq_first{0}, seq_tokens(static_cast<size_t>(T));
  std::iota(seq_tokens.begin(), seq_tokens.end(), 0);
  for (const auto& q : seqs) seq_first.push_back(seq_first.back() + int32_t(q.size()));
  int32_t* seq_first_d = alloc<int32_t>(int64_t(seq_first.size()));
  int32_t* seq_tokens_d = alloc<int32_t>(T);
  r_.upload_async(seq_first_d, seq_first.data(), seq_first.size() * 4);
  r_.upload_async(seq_tokens_d, seq_tokens.data(), seq_tokens.size() * 4);

  // ---- Forward: each layer's input kept, then the head.
  CudaRunner::Workspace& ws = r_.ws_;
  PhaseClock clock(st);
  bf16_t* x_in = alloc<bf16_t>(NL * T * H);
  bf16_t* final_in = alloc<bf16_t>(T * H);
  bf16_t* hidden = alloc<bf16_t>(T * H);
  cuda::embedding(ws.meta, r_.embed_, ws.x, T, H, st);
  for (int64_t l = 0; l < NL; ++l) {
    LS_CUDA_CHECK(cudaMemcpyAsync(x_in + l * T * H, ws.x, size_t(T * H) * 2, cudaMemcpyDeviceToDevice, st));
    CudaRunner::LayerOps ops{r_, ws, kv, slots, T};
    layer_forward(ops, r_.layers_[size_t(l)]);
  }
  LS_CUDA_CHECK(cudaMemcpyAsync(final_in, ws.x, size_t(T * H) * 2, cudaMemcpyDeviceToDevice, st));
  cuda::rmsnorm(ws.x, r_.final_norm_, hidden, T, H, eps, st);
  clock.lap("forward");
  // Logits of every token in the score path's slices (the same GEMM calls: the same bits).
  float* logits = alloc<float>(T * V);
  std::vector<int32_t> all_rows(static_cast<size_t>(T));
  std::iota(all_rows.begin(), all_rows.end(), 0);
  int32_t* rows_d = alloc<int32_t>(T);
  r_.upload_async(rows_d, all_rows.data(), all_rows.size() * 4);
  for (int64_t b = 0; b < T; b += CudaRunner::kLogitRows)
    r_.compute_logits(hidden, rows_d + b, std::min(CudaRunner::kLogitRows, T - b), logits + b * V);
  std::vector<int32_t> targets(static_cast<size_t>(T), -1);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (size_t t = 0; t + 1 < seqs[i].size(); ++t) targets[size_t(seq_first[i]) + t] = seqs[i][t + 1];
  int32_t* targets_d = alloc<int32_t>(T);
  r_.upload_async(targets_d, targets.data(), targets.size() * 4);
  float *lse = alloc<float>(T), *logp = alloc<float>(T), *entropy = alloc<float>(T);
  cuda::log_normalizer_rows(logits, lse, T, V, st);
  cuda::log_softmax_gather(logits, targets_d, logp, T, V, st);
  if (want_entropy) cuda::softmax_entropy(logits, lse, entropy, T, V, st);
  std::vector<float> logp_h(static_cast<size_t>(T)), ent_h(static_cast<size_t>(T));
  r_.download(logp_h.data(), logp, logp_h.size() * 4);
  if (want_entropy) r_.download(ent_h.data(), entropy, ent_h.size() * 4);
  std::vector<std::vector<float>> lp(seqs.size()), ent(want_entropy ? seqs.size() : 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    lp[i].assign(logp_h.begin() + seq_first[i], logp_h.begin() + seq_first[i + 1] - 1);
    if (want_entropy) ent[i].assign(ent_h.begin() + seq_first[i], ent_h.begin() + seq_first[i + 1] - 1);
  }
  if (!upstream) {
    *scored = std::move(lp);
    arena_.clear();
    return;
  }
  const std::vector<SequenceGradInput> up = upstream(0, lp, ent);
  LS_CHECK(up.size() == seqs.size(), "cuda step_grads: ", up.size(), " upstream gradients for ", seqs.size(),
           " sequences");
  std::vector<float> dlogp(static_cast<size_t>(T), 0.0f), dent(static_cast<size_t>(T), 0.0f);
  bool any_entropy = false;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const size_t n = seqs[i].size() - 1;
    LS_CHECK(up[i].dlogp.size() == n && (up[i].dentropy.empty() || up[i].dentropy.size() == n),
             "cuda step_grads: sequence ", i, " has ", n, " predicted tokens but its upstream has ", up[i].dlogp.size(),
             " dlogp and ", up[i].dentropy.size(), " dentropy values");
    for (size_t t = 0; t < n; ++t) {
      dlogp[size_t(seq_first[i]) + t] = up[i].dlogp[t];
      if (!up[i].dentropy.empty()) dent[size_t(seq_first[i]) + t] = up[i].dentropy[t], any_entropy = true;
    }
  }
  if (any_entropy && !want_entropy) cuda::softmax_entropy(logits, lse, entropy, T, V, st);
  float *dlogp_d = alloc<float>(T), *dent_d = alloc<float>(T);
  r_.upload_async(dlogp_d, dlogp.data(), dlogp.size() * 4);
  r_.upload_async(dent_d, dent.data(), dent.size() * 4);

  // ---- Gradients, zeroed (an expert without tokens keeps zeros).
  grads->zero(st);
  float *g_embed = grads->embed, *g_head = grads->lm_head, *g_final_norm = grads->final_norm;
  std::vector<DeviceLayerFloats>& g_layers = grads->layers;

  // ---- Head: d logits (in place), lm_head, the final norm.
  const cuda::ChunkBounds chunks = cuda::token_chunk_bounds(T);
  clock.lap("head_forward");
  cuda::log_softmax_gather_backward(logits, lse, targets_d, dlogp_d, any_entropy ? dent_d : nullptr,
                                    any_entropy ? entropy : nullptr, logits, T, V, st);
  cuda::linear_weight_grad(logits, hidden, g_head, V, H, chunks, st);
  BackwardScratch s = scratch(T);
  float* dx = alloc<float>(T * H);
  cuda::linear_input_grad(logits, r_.lm_head_, s.dh, T, V, H, st);
  cuda::inverse_rms_rows(final_in, s.inv, T, H, eps, cuda::kNormThreads, st);
  cuda::rmsnorm_backward(final_in, s.inv, r_.final_norm_, s.dh, dx, g_final_norm, T, H, true, chunks, st);
  clock.lap("head_backward");

  // ---- Layers, last first: recomputed from the kept input into buffers that keep mid and
  // the MLP input, then the layer's backward.
  CudaRunner::Workspace train_ws = ws;
  train_ws.mid = alloc<bf16_t>(T * H);
  train_ws.h_mlp = alloc<bf16_t>(T * H);
  for (int64_t l = NL - 1; l >= 0; --l) {
    const bf16_t* layer_in = x_in + l * T * H;
    LS_CUDA_CHECK(cudaMemcpyAsync(train_ws.x, layer_in, size_t(T * H) * 2, cudaMemcpyDeviceToDevice, st));
    CudaRunner::LayerOps ops{r_, train_ws, kv, slots, T};
    layer_forward(ops, r_.layers_[size_t(l)]);
    clock.lap("recompute");
    CudaLayerBackwardOps back{r_, train_ws, layer_in, kv, slots, seq_first_d, seq_tokens_d, T, dx, g_layers[size_t(l)],
                              s,  clock};
    layer_backward(back, r_.layers_[size_t(l)]);
  }

  // ---- Embedding: each used id's tokens, ascending (the host sorts the step's tokens).
  std::map<int32_t, std::vector<int32_t>> by_id;
  for (int64_t t = 0; t < T; ++t) by_id[packed.batch.tokens[size_t(t)]].push_back(int32_t(t));
  std::vector<int32_t> used, starts{0}, tokens_by_id;
  for (const auto& [id, list] : by_id) {
    used.push_back(id);
    tokens_by_id.insert(tokens_by_id.end(), list.begin(), list.end());
    starts.push_back(int32_t(tokens_by_id.size()));
  }
  int32_t *used_d = alloc<int32_t>(int64_t(used.size())), *starts_d = alloc<int32_t>(int64_t(starts.size())),
          *tokens_d = alloc<int32_t>(T);
  r_.upload_async(used_d, used.data(), used.size() * 4);
  r_.upload_async(starts_d, starts.data(), starts.size() * 4);
  r_.upload_async(tokens_d, tokens_by_id.data(), tokens_by_id.size() * 4);
  cuda::embedding_backward(used_d, starts_d, tokens_d, int64_t(used.size()), dx, g_embed, T, V, H, st);
  clock.lap("embedding_backward");
  if (c.tie_word_embeddings) cuda::add_inplace(g_embed, g_head, V * H, st);  // the lookup part, then the head's

  LS_CUDA_CHECK(cudaStreamSynchronize(st));
  arena_.clear();
}

// Device tensors in the weights' structure on the host (a tied lm_head shares the embedding's).
ModelWeights download_named(const DeviceFloats& d, const ModelConfig& c, cudaStream_t st) {
  ModelWeights w;
  w.config = c;
  w.layers.resize(size_t(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    w.layers[size_t(l)].is_moe = c.is_moe_layer(l);
    if (c.is_moe_layer(l)) w.layers[size_t(l)].experts.resize(size_t(c.num_experts));
  }
  const auto shapes = ModelWeights::expected_shapes(c);
  for (auto& [name, t] : w.named()) *t = Tensor::zeros(shapes.at(name), DType::f32);
  if (c.tie_word_embeddings) w.lm_head = w.embed;
  const std::vector<DeviceSegment> segments = device_segments(c);
  size_t k = 0;
  for_each_param(w, [&](const ParamSlot&, Tensor& t) {
    const DeviceSegment& seg = segments.at(k++);
    LS_CUDA_CHECK(
        cudaMemcpyAsync(t.data<float>(), segment_ptr(d, seg), size_t(seg.numel) * 4, cudaMemcpyDeviceToHost, st));
  });
  LS_CUDA_CHECK(cudaStreamSynchronize(st));
  return w;
}

}  // namespace cuda_model

std::vector<std::vector<float>> cuda_score_sequences(ModelRunner& runner,
                                                     const std::vector<std::vector<int32_t>>& sequences,
                                                     int64_t max_batch_tokens) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda_score_sequences: the runner is not a CUDA runner");
  cuda_model::CudaTrainer trainer(*cuda_runner);
  std::vector<std::vector<float>> out(sequences.size());
  for (auto [begin, end] : score_steps(sequences, 0, sequences.size(), max_batch_tokens)) {
    std::vector<std::vector<float>> step;
    trainer.step_grads({sequences.begin() + begin, sequences.begin() + end}, false, nullptr, nullptr, &step);
    for (size_t i = begin; i < end; ++i) out[i] = std::move(step[i - begin]);
  }
  return out;
}

void cuda_check_step_memory(ModelRunner& runner, int64_t tokens, int64_t micro_batches) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda_check_step_memory: the runner is not a CUDA runner");
  cuda_model::CudaTrainer(*cuda_runner).check_memory(tokens, micro_batches, true, false);
}

ModelWeights cuda_step_grads(ModelRunner& runner, const std::vector<std::vector<int32_t>>& sequences, bool want_entropy,
                             const UpstreamFn& upstream) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda_step_grads: the runner is not a CUDA runner");
  cuda_model::CudaTrainer trainer(*cuda_runner);
  int64_t tokens = 0, pages = 0;
  for (const auto& q : sequences)
    tokens += int64_t(q.size()), pages += (int64_t(q.size()) + kAttnBlock - 1) / kAttnBlock;
  trainer.check_memory(tokens, pages, true, false);
  cuda_model::DeviceFloats grads;
  grads.allocate(runner.config());
  trainer.step_grads(sequences, want_entropy, upstream, &grads);
  return cuda_model::download_named(grads, runner.config(), cuda_runner->stream());
}

struct CudaTrainState::Impl {
  cuda_model::CudaRunner& r;
  OptimizerConfig config;
  int64_t step = 0;
  std::vector<cuda_model::DeviceSegment> segments;  // for_each_param order
  std::vector<std::string> names;
  cuda_model::DeviceFloats master, exp_avg, exp_avg_sq;
  // The micro-batch tree: (level, partial sum); the finished sum is stack.front().
  std::vector<std::pair<int, std::unique_ptr<cuda_model::DeviceFloats>>> stack, spare;
  cuda_model::DeviceArena tables;
  cuda::AdamWTensor* adamw = nullptr;  // device table, one entry per segment
  const float** grad_ptrs = nullptr;
  int64_t* numels = nullptr;
  float* partials = nullptr;
  int64_t max_numel = 0;

  explicit Impl(cuda_model::CudaRunner& runner) : r(runner) {}
  cudaStream_t st() const { return r.stream(); }
  std::unique_ptr<cuda_model::DeviceFloats> take_buffer() {
    if (!spare.empty()) {
      auto b = std::move(spare.back().second);
      spare.pop_back();
      return b;
    }
    auto b = std::make_unique<cuda_model::DeviceFloats>();
    b->allocate(r.config());
    return b;
  }
  const cuda_model::DeviceFloats& grads() const {
    LS_CHECK(stack.size() == 1, "cuda train state: apply without a complete compute_grads");
    return *stack.front().second;
  }
  // The device tables of the finished gradients' pointers (they move with the buffer).
  void write_tables() {
    const cuda_model::DeviceFloats& g = grads();
    std::vector<cuda::AdamWTensor> host(segments.size());
    std::vector<const float*> gp(segments.size());
    std::vector<int64_t> n(segments.size());
    for (size_t i = 0; i < segments.size(); ++i) {
      const auto& seg = segments[i];
      auto& t = host[i];
      t.master = cuda_model::segment_ptr(master, seg);
      t.exp_avg = cuda_model::segment_ptr(exp_avg, seg);
      t.exp_avg_sq = cuda_model::segment_ptr(exp_avg_sq, seg);
      t.grad = gp[i] = cuda_model::segment_ptr(g, seg);
      cuda_model::runner_segment_ptr(r, seg, &t.weight_bf16, &t.weight_f32);
      t.numel = n[i] = seg.numel;
      t.decayed = seg.is_norm ? 0 : 1;
    }
    r.upload(adamw, host.data(), host.size() * sizeof(host[0]));
    r.upload(grad_ptrs, gp.data(), gp.size() * sizeof(gp[0]));
    r.upload(numels, n.data(), n.size() * sizeof(n[0]));
  }
};

CudaTrainState::CudaTrainState(ModelRunner& runner, const OptimizerConfig& config, const AdamW& optimizer) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda train state: the runner is not a CUDA runner");
  impl_ = std::make_unique<Impl>(*cuda_runner);
  Impl& m = *impl_;
  const ModelConfig& c = runner.config();
  m.config = config;
  m.step = optimizer.steps_taken();
  m.segments = cuda_model::device_segments(c);
  for (const auto& seg : m.segments) {
    m.names.push_back(param_name(c, seg.slot));
    m.max_numel = std::max(m.max_numel, seg.numel);
  }
  for (auto* d : {&m.master, &m.exp_avg, &m.exp_avg_sq}) d->allocate(c);
  // The host state, tensor by tensor, in the names table's order (the segments' order).
  const std::pair<const ModelWeights*, cuda_model::DeviceFloats*> parts[] = {
      {&optimizer.master(), &m.master}, {&optimizer.exp_avg(), &m.exp_avg}, {&optimizer.exp_avg_sq(), &m.exp_avg_sq}};
  for (auto [host, dev] : parts) {
    size_t k = 0;
    for_each_param(*host, [&](const ParamSlot&, const Tensor& t) {
      const auto& seg = m.segments.at(k++);
      LS_CHECK(t.numel() == seg.numel, "cuda train state: ", m.names[k - 1], " has ", t.numel(), " values, expected ",
               seg.numel);
      m.r.upload(cuda_model::segment_ptr(*dev, seg), t.data<float>(), size_t(seg.numel) * 4);
    });
  }
  m.adamw = m.tables.alloc<cuda::AdamWTensor>(int64_t(m.segments.size()));
  m.grad_ptrs = const_cast<const float**>(m.tables.alloc<float*>(int64_t(m.segments.size())));
  m.numels = m.tables.alloc<int64_t>(int64_t(m.segments.size()));
  m.partials = m.tables.alloc<float>(int64_t(m.segments.size()) * 8);
}

CudaTrainState::~CudaTrainState() = default;

void CudaTrainState::compute_grads(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                                   bool want_entropy, const UpstreamFn& upstream) {
  Impl& m = *impl_;
  LS_CHECK(is_power_of_two(int64_t(micro_batches.size())),
           "gradient accumulation: the micro-batch count must be a power of two, got ", micro_batches.size());
  for (auto& e : m.stack) m.spare.push_back(std::move(e));
  m.stack.clear();
  cuda_model::CudaTrainer trainer(m.r);
  for (size_t j = 0; j < micro_batches.size(); ++j) {
    auto g = m.take_buffer();
    trainer.step_grads(
        micro_batches[j], want_entropy,
        [&](int64_t, const auto& lp, const auto& ent) { return upstream(int64_t(j), lp, ent); }, g.get());
    m.stack.push_back({0, std::move(g)});
    // Two partials of the same level are siblings: left += right (PairwiseGradAccumulator).
    while (m.stack.size() >= 2 && m.stack[m.stack.size() - 1].first == m.stack[m.stack.size() - 2].first) {
      auto right = std::move(m.stack.back());
      m.stack.pop_back();
      m.stack.back().second->add(*right.second, m.st());
      ++m.stack.back().first;
      m.spare.push_back(std::move(right));
    }
  }
  // A tied lm_head's gradient is in the embedding's (cuda_step_grads adds it).
}

void CudaTrainState::poison_first_gradient() {
  Impl& m = *impl_;
  // The first tensor by name, as the host hook poisons named_tensors' first.
  size_t first = 0;
  for (size_t i = 1; i < m.names.size(); ++i)
    if (m.names[i] < m.names[first]) first = i;
  const float nan = std::nanf("");
  m.r.upload(cuda_model::segment_ptr(*m.stack.front().second, m.segments[first]), &nan, 4);
}

OptimizerStepResult CudaTrainState::apply(Precision precision) {
  Impl& m = *impl_;
  const cuda_model::DeviceFloats& g = m.grads();
  m.write_tables();
  const int64_t count = int64_t(m.segments.size());
  // Finiteness first, naming the first bad tensor in the names table's order (the host's).
  cuda::sum_squares_chunks(m.grad_ptrs, m.numels, count, m.partials, m.st());
  std::vector<float> partials(size_t(count) * 8);
  m.r.download(partials.data(), m.partials, partials.size() * 4);
  std::vector<float> css(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) css[size_t(i)] = tree8(partials.data() + i * 8);
  for (int64_t i = 0; i < count; ++i) {
    if (std::isfinite(css[size_t(i)])) continue;
    const float* p = cuda_model::segment_ptr(g, m.segments[size_t(i)]);
    const int64_t at = cuda::first_nonfinite(p, m.segments[size_t(i)].numel, m.st());
    if (at < 0) continue;  // finite values whose squares overflow: the norm check below
    float value = 0;
    m.r.download(&value, p + at, 4);
    fail("non-finite gradient in tensor ", m.names[size_t(i)], " at element ", at, " (value ", value, ")");
  }
  // The canonical global norm: per tensor, then summed in global-name order.
  std::vector<size_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return m.names[a] < m.names[b]; });
  float total = 0.0f;
  for (size_t i : order) total += css[i];
  OptimizerStepResult res;
  res.grad_norm = std::sqrt(total);
  LS_CHECK(std::isfinite(res.grad_norm), "optimizer: the global gradient norm is not finite (", res.grad_norm, ")");
  // The scalars exactly as AdamW::update makes them.
  const OptimizerConfig& oc = m.config;
  res.lr = learning_rate_at(oc, m.step);
  cuda::AdamWScalars sc;
  if (oc.clip_grad > 0 && res.grad_norm > float(oc.clip_grad)) {
    sc.clip_coef = float(oc.clip_grad) / (res.grad_norm + 1e-6f);
    sc.clipped = 1;
    res.clipped = true;
  }
  ++m.step;
  sc.beta1 = float(oc.beta1), sc.beta2 = float(oc.beta2), sc.eps = float(oc.eps);
  sc.one_minus_beta1 = float(1.0 - oc.beta1), sc.one_minus_beta2 = float(1.0 - oc.beta2);
  sc.bias1 = float(1.0 - std::pow(oc.beta1, double(m.step)));
  sc.bias2 = float(1.0 - std::pow(oc.beta2, double(m.step)));
  sc.lr = float(res.lr);
  sc.decay = float(1.0 - res.lr * oc.weight_decay);
  sc.round_bf16 = precision == Precision::bfloat16 ? 1 : 0;
  cuda::adamw_step(m.adamw, count, m.max_numel, sc, m.st());
  // A tied lm_head is the embedding: the runner's head copy follows it.
  const ModelConfig& c = m.r.config();
  if (c.tie_word_embeddings) m.r.copy_embedding_to_head();
  LS_CUDA_CHECK(cudaStreamSynchronize(m.st()));
  return res;
}

AdamW CudaTrainState::download(const ModelWeights& like) const {
  const Impl& m = *impl_;
  ModelWeights parts[3] = {like.zeros_like(), like.zeros_like(), like.zeros_like()};
  const cuda_model::DeviceFloats* from[3] = {&m.master, &m.exp_avg, &m.exp_avg_sq};
  for (int p = 0; p < 3; ++p) {
    size_t k = 0;
    for_each_param(parts[p], [&](const ParamSlot&, Tensor& t) {
      const auto& seg = m.segments.at(k++);
      m.r.download(t.data<float>(), cuda_model::segment_ptr(*from[p], seg), size_t(seg.numel) * 4);
    });
  }
  AdamW out(m.config, like);
  out.load_state(m.step, parts[0], parts[1], parts[2]);
  return out;
}

}  // namespace lockstep
