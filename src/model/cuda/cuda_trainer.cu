// The GPU trainer's backward (cuda_trainer.h): the step's forward through the runner's op set,
// the head and loss gradient, each layer recomputed and run backward through the CUDA
// backward op set, the embedding's rows. fp32 gradients in device buffers of the weights'
// shapes, downloaded into a ModelWeights at the end.
#include <cstdio>
#include <map>
#include <numeric>

#include "kernels/canonical.h"
#include "kernels/cpu/reduce_backward.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/row_ops.cuh"
#include "model/cuda/cuda_runner_impl.h"
#include "model/cuda/cuda_trainer.h"
#include "model/qwen3_moe.h"

namespace lockstep {
namespace cuda_model {

// One layer's gradients on the device (fp32), laid out as the runner's DeviceLayer: q, k, v
// rows in one [q_dim + 2 kv_dim, H] block; per expert its gate rows then its up rows.
struct DeviceLayerGrads {
  float *qkv = nullptr, *o = nullptr;
  float *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
  float* router = nullptr;   // [E, H]
  float* gate_up = nullptr;  // [E, 2I, H] (dense: [2I, H])
  float* down = nullptr;     // [E, H, I] (dense: [H, I])
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
  const DeviceLayerGrads& g;
  BackwardScratch& s;

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
  }

  void post_attention_norm_backward(const Layer& L) {
    cuda::inverse_rms_rows(w.mid, s.inv, T, H, eps, cuda::kNormThreads, st);
    cuda::rmsnorm_backward(w.mid, s.inv, L.post_norm, s.dh, s.dnorm, g.post_norm, T, H, true, chunks, st);
    cuda::add_inplace(dx, s.dnorm, T * H, st);
  }

  void o_proj_residual_backward(const Layer& L) {
    cuda::linear_weight_grad(dx, w.attn, g.o, H, qd, chunks, st);
    cuda::linear_input_grad(dx, L.o, s.dattn, T, H, qd, st);
  }

  void attention_backward() {
    cuda::paged_attention_backward(w.q, w.attn, s.dattn, kv, slots, seq_first, seq_tokens, T, nq,
                                   1.0f / std::sqrt(float(D)), s.lse, s.delta, s.dq, s.dk, s.dv, st);
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
  }

  void input_norm_backward(const Layer& L) {
    cuda::inverse_rms_rows(x_in, s.inv, T, H, eps, cuda::kNormThreads, st);
    cuda::rmsnorm_backward(x_in, s.inv, L.input_norm, s.dhf, s.dnorm, g.input_norm, T, H, true, chunks, st);
    cuda::add_inplace(dx, s.dnorm, T * H, st);
  }
};

class CudaTrainer {
 public:
  explicit CudaTrainer(CudaRunner& runner) : r_(runner), c_(runner.config_) {}

  // Refuses, before any allocation, a step whose buffers do not fit the free GPU memory.
  // (`backward`: with the gradients and the backward's scratch; else the forward's alone.)
  void check_memory(int64_t T, int64_t pages, bool backward) const;

  // With a null `upstream`, the forward alone: the log-probs go to `scored`.
  ModelWeights step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy, const UpstreamFn& upstream,
                          std::vector<std::vector<float>>* scored = nullptr);

 private:
  template <typename T>
  T* alloc(int64_t n) {
    return arena_.alloc<T>(n);
  }
  float* zeros(int64_t n) {
    float* p = alloc<float>(n);
    LS_CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(std::max<int64_t>(n, 1)) * 4, r_.stream_));
    return p;
  }
  void download(Tensor& dst, const float* src) {
    LS_CUDA_CHECK(cudaMemcpyAsync(dst.data<float>(), src, size_t(dst.numel()) * 4, cudaMemcpyDeviceToHost, r_.stream_));
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

void CudaTrainer::check_memory(int64_t T, int64_t pages, bool backward) const {
  const auto& c = c_;
  const double H = double(c.hidden_size), V = double(c.vocab_size), NL = double(c.num_hidden_layers);
  const double qd = double(c.q_dim()), kd = double(c.kv_dim()), D = double(c.head_dim);
  const double k = double(std::max<int64_t>(c.num_experts_per_tok, 1)), E = double(std::max<int64_t>(c.num_experts, 1));
  const double I = double(std::max(c.moe_intermediate_size, c.intermediate_size)), t = double(T), rows = t * k;
  const double heads = double(std::max(c.num_attention_heads, c.num_key_value_heads));
  double params = 2 * V * H + H;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const bool moe = c.is_moe_layer(l);
    const double e = moe ? double(c.num_experts) : 1,
                 i = moe ? double(c.moe_intermediate_size) : double(c.intermediate_size);
    params += (qd + 2 * kd) * H + H * qd + 2 * H + 2 * D + (moe ? e * H : 0) + e * 3 * i * H;
  }
  const double logits = t * V * 4 + 8 * t * 4;
  const double grads = backward ? params * 4 : 0.0;
  // Kept inputs, the head's rows, the step's KV, the backward's scratch, the runner's
  // workspace for T tokens (when it has to grow).
  double acts = NL * t * H * 2 + 4 * t * H * 2 + 2 * double(pages) * 64 * kd * 2 + t * H * 4;
  if (backward)
    acts += (4 * t * H + 3 * t * qd + 3 * t * kd + 3 * t * heads + t * k + t * E + 3 * rows * H + 3 * rows * I) * 4 +
            (t * qd + t * kd + rows * H + rows * 3 * I) * 2 + 3 * rows * 4;
  if (T > r_.ws_.tokens)
    acts += (2 * t * H + t * (qd + 2 * kd) + 2 * t * qd + rows * 3 * I + rows * H) * 2 + (t * E + 2 * t * k) * 4 +
            8 * std::min(rows, 1024.0) * H * 4;
  size_t free_bytes = 0, total_bytes = 0;
  LS_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  const double need = logits + grads + acts, gib = 1024.0 * 1024.0 * 1024.0;
  char detail[160];
  std::snprintf(detail, sizeof detail, "%.1f GiB of GPU memory (logits %.1f, gradients %.1f, activations %.1f), %.1f",
                need / gib, logits / gib, grads / gib, acts / gib, double(free_bytes) / gib);
  LS_CHECK(need <= double(free_bytes), "cuda trainer: a micro-batch of ", T, " tokens needs ", detail,
           " GiB free: cut the batch into more micro-batches (--num-microbatches)");
}

ModelWeights CudaTrainer::step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy,
                                     const UpstreamFn& upstream, std::vector<std::vector<float>>* scored) {
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
  check_memory(T, packed.num_pages, upstream != nullptr);

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
    return {};
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
  float* g_embed = zeros(V * H);
  float* g_head = zeros(V * H);  // tied: the lm_head part of the embedding's gradient
  float* g_final_norm = zeros(H);
  std::vector<DeviceLayerGrads> g_layers(static_cast<size_t>(NL));
  for (int64_t l = 0; l < NL; ++l) {
    auto& G = g_layers[size_t(l)];
    const bool moe = c.is_moe_layer(l);
    const int64_t E = moe ? c.num_experts : 1, I = moe ? c.moe_intermediate_size : c.intermediate_size;
    G.qkv = zeros((qd + 2 * kd) * H), G.o = zeros(H * qd);
    G.input_norm = zeros(H), G.post_norm = zeros(H), G.q_norm = zeros(D), G.k_norm = zeros(D);
    if (moe) G.router = zeros(E * H);
    G.gate_up = zeros(E * 2 * I * H), G.down = zeros(E * H * I);
  }

  // ---- Head: d logits (in place), lm_head, the final norm.
  const cuda::ChunkBounds chunks = cuda::token_chunk_bounds(T);
  cuda::log_softmax_gather_backward(logits, lse, targets_d, dlogp_d, any_entropy ? dent_d : nullptr,
                                    any_entropy ? entropy : nullptr, logits, T, V, st);
  cuda::linear_weight_grad(logits, hidden, g_head, V, H, chunks, st);
  BackwardScratch s = scratch(T);
  float* dx = alloc<float>(T * H);
  cuda::linear_input_grad(logits, r_.lm_head_, s.dh, T, V, H, st);
  cuda::inverse_rms_rows(final_in, s.inv, T, H, eps, cuda::kNormThreads, st);
  cuda::rmsnorm_backward(final_in, s.inv, r_.final_norm_, s.dh, dx, g_final_norm, T, H, true, chunks, st);

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
    CudaLayerBackwardOps back{r_, train_ws, layer_in, kv, slots, seq_first_d, seq_tokens_d, T, dx, g_layers[size_t(l)],
                              s};
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
  if (c.tie_word_embeddings) cuda::add_inplace(g_embed, g_head, V * H, st);  // the lookup part, then the head's

  // ---- Into the weights' structure.
  ModelWeights grads;
  grads.config = c;
  grads.layers.resize(size_t(NL));
  for (int64_t l = 0; l < NL; ++l) {
    grads.layers[size_t(l)].is_moe = c.is_moe_layer(l);
    if (c.is_moe_layer(l)) grads.layers[size_t(l)].experts.resize(size_t(c.num_experts));
  }
  const auto shapes = ModelWeights::expected_shapes(c);
  for (auto& [name, t] : grads.named()) *t = Tensor::zeros(shapes.at(name), DType::f32);
  download(grads.embed, g_embed);
  if (c.tie_word_embeddings)
    grads.lm_head = grads.embed;
  else
    download(grads.lm_head, g_head);
  download(grads.final_norm, g_final_norm);
  for (int64_t l = 0; l < NL; ++l) {
    auto& L = grads.layers[size_t(l)];
    const auto& G = g_layers[size_t(l)];
    download(L.q_proj, G.qkv);
    download(L.k_proj, G.qkv + qd * H);
    download(L.v_proj, G.qkv + (qd + kd) * H);
    download(L.o_proj, G.o);
    download(L.input_norm, G.input_norm);
    download(L.post_attention_norm, G.post_norm);
    download(L.q_norm, G.q_norm);
    download(L.k_norm, G.k_norm);
    if (L.is_moe) {
      const int64_t I = c.moe_intermediate_size;
      download(L.router, G.router);
      for (int64_t e = 0; e < c.num_experts; ++e) {
        auto& X = L.experts[size_t(e)];
        download(X.gate, G.gate_up + e * 2 * I * H);
        download(X.up, G.gate_up + e * 2 * I * H + I * H);
        download(X.down, G.down + e * H * I);
      }
    } else {
      const int64_t I = c.intermediate_size;
      download(L.dense.gate, G.gate_up);
      download(L.dense.up, G.gate_up + I * H);
      download(L.dense.down, G.down);
    }
  }
  LS_CUDA_CHECK(cudaStreamSynchronize(st));
  arena_.clear();
  return grads;
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
    trainer.step_grads({sequences.begin() + begin, sequences.begin() + end}, false, nullptr, &step);
    for (size_t i = begin; i < end; ++i) out[i] = std::move(step[i - begin]);
  }
  return out;
}

void cuda_check_step_memory(ModelRunner& runner, int64_t tokens) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda_check_step_memory: the runner is not a CUDA runner");
  // Whole sequences of kAttnBlock positions: at most one page per block, plus one per sequence.
  cuda_model::CudaTrainer(*cuda_runner).check_memory(tokens, tokens / kAttnBlock + tokens, true);
}

ModelWeights cuda_step_grads(ModelRunner& runner, const std::vector<std::vector<int32_t>>& sequences, bool want_entropy,
                             const UpstreamFn& upstream) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda_step_grads: the runner is not a CUDA runner");
  cuda_model::CudaTrainer trainer(*cuda_runner);
  return trainer.step_grads(sequences, want_entropy, upstream);
}

}  // namespace lockstep
