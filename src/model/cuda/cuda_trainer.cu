// The GPU trainer's backward (cuda_trainer.h): the step's forward through the runner's op set
// (the layers that fit keeping their intermediates), the head and loss gradient, each layer
// kept or recomputed and run backward through the CUDA backward op set
// (cuda_layer_backward.h), the embedding's rows; fp32 gradients in device buffers of the
// runner's layout (device_params.h).
#include <algorithm>
#include <map>
#include <numeric>

#include "model/cuda/cuda_trainer.h"
#include "model/cuda/cuda_trainer_impl.h"
#include "model/qwen3_moe.h"
#include "train/train_memory.h"

namespace lockstep {
namespace cuda_model {

BackwardScratch CudaTrainer::scratch(int64_t T) {
  const auto& c = c_;
  const int64_t H = c.hidden_size, qd = c.q_dim(), kd = c.kv_dim();
  const int64_t k = std::max<int64_t>(c.num_experts_per_tok, 1), E = std::max<int64_t>(c.num_experts, 1);
  const int64_t rows = std::max(T * k, T), I = std::max(c.moe_intermediate_size, c.intermediate_size);
  const int64_t heads = std::max(c.num_attention_heads, c.num_key_value_heads);
  BackwardScratch s;
  s.dh = alloc<float>(T * H), s.dhf = alloc<float>(T * H), s.part = alloc<float>(T * H);
  s.dattn = alloc<float>(T * qd), s.dq = alloc<float>(T * qd), s.dq_proj = alloc<float>(T * qd);
  s.dk = alloc<float>(T * kd), s.dv = alloc<float>(T * kd), s.dk_proj = alloc<float>(T * kd);
  s.inv = alloc<float>(T * heads), s.lse = alloc<float>(T * heads), s.delta = alloc<float>(T * heads);
  s.q_proj = alloc<bf16_t>(T * qd), s.k_proj = alloc<bf16_t>(T * kd), s.dattn_bf16 = alloc<bf16_t>(T * qd);
  s.norm_partials = alloc<float>(kTMax * std::max(H, c.head_dim));
  s.dweights = alloc<float>(T * k), s.dlogits_router = alloc<float>(T * E);
  s.dy_rows = alloc<float>(rows * H), s.dx_rows = alloc<float>(rows * H), s.part_rows = alloc<float>(rows * H);
  s.x_rows = alloc<bf16_t>(rows * H), s.gu_rows = alloc<bf16_t>(rows * 2 * I), s.act_rows = alloc<bf16_t>(rows * I);
  s.dact = alloc<float>(rows * I), s.dgate = alloc<float>(rows * I), s.dup = alloc<float>(rows * I);
  s.row_token = alloc<int32_t>(rows), s.row_pair = alloc<int32_t>(rows), s.order = alloc<int32_t>(rows);
  s.kept_row = alloc<int32_t>(rows);
  s.group_rows = alloc<int32_t>(E + 1);
  s.groups = alloc<cuda::OuterSumGroup>(6 * E);
  s.split_groups = alloc<cuda::SplitOuterSumGroup>(6 * E);
  s.outer_pending = alloc<float>(cuda::outer_sum_split_workspace_floats());
  if (keep_attention_ds()) {
    s.attention_ds.elems = int64_t(attention_ds_scratch_bytes(c, T)) / 2;
    s.attention_ds.tiles = alloc<bf16_t>(s.attention_ds.elems);
  }
  return s;
}

double CudaTrainer::free_step_bytes() const {
  size_t free_bytes = 0, total_bytes = 0;
  LS_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return double(free_bytes) + double(r_.step_arena_.held_bytes());
}

int64_t CudaTrainer::recomputed_layers(int64_t T, int64_t micro_batches, bool backward, bool grads_held) const {
  if (!backward) return kRecomputeAll;
  return recomputed_layer_count(c_, T, micro_batches, recompute_num_layers_, grads_held, free_step_bytes());
}

void CudaTrainer::check_memory(int64_t T, int64_t micro_batches, bool backward, bool grads_held) const {
  const MicroBatchOrder order =
      backward ? micro_batch_order(c_, T, micro_batches, grads_held, free_step_bytes()) : MicroBatchOrder::batch_major;
  const int64_t recomputed =
      order == MicroBatchOrder::layer_major ? kRecomputeAll : recomputed_layers(T, micro_batches, backward, grads_held);
  check_fits(T, micro_batches, recomputed, backward, grads_held, order);
}

MicroBatchOrder CudaTrainer::micro_batch_order_for(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                                                   double held_bytes) const {
  int64_t T = 0;
  for (const auto& mb : micro_batches) {
    int64_t tokens = 0;
    for (const auto& q : mb) tokens += int64_t(q.size());
    T = std::max(T, tokens);
  }
  return micro_batch_order(c_, T, int64_t(micro_batches.size()), false, free_step_bytes() + held_bytes);
}

void CudaTrainer::check_fits(int64_t T, int64_t micro_batches, int64_t recomputed, bool backward, bool grads_held,
                             MicroBatchOrder order) const {
  // The weights and the optimizer state are already on the device; the step adds the rest.
  const TrainMemory m = cuda_train_memory(c_, T, micro_batches, recomputed, order);
  const double free_bytes = free_step_bytes(), gib = 1024.0 * 1024.0 * 1024.0;
  const bool with_grads = backward && !grads_held;
  const double grads = (with_grads ? m.gradients : 0.0) + m.tree_levels, need = m.step_bytes(!with_grads);
  char detail[256];
  std::snprintf(detail, sizeof detail,
                "%.1f GiB of GPU memory (logits %.1f, gradients %.1f, activations %.1f with %lld of %lld layers "
                "recomputed%s), %.1f",
                need / gib, m.logits / gib, grads / gib, m.activations / gib,
                static_cast<long long>(std::min(recomputed, c_.num_hidden_layers)),
                static_cast<long long>(c_.num_hidden_layers),
                order == MicroBatchOrder::layer_major ? ", micro-batches layer by layer" : "", free_bytes / gib);
  LS_CHECK(need <= free_bytes, "cuda trainer: a micro-batch of ", T, " tokens needs ", detail,
           " GiB free: cut the batch into more micro-batches (--num-microbatches) or recompute more layers "
           "(--recompute-num-layers)");
}

CudaTrainer::Batch CudaTrainer::prepare_batch(const std::vector<std::vector<int32_t>>& seqs) {
  LS_CHECK(!seqs.empty(), "cuda step_grads: no sequences");
  for (size_t i = 0; i < seqs.size(); ++i)
    LS_CHECK(seqs[i].size() >= 2, "cuda step_grads: sequence ", i, " has ", seqs[i].size(),
             " token(s); a predicted token needs at least 2");
  Batch b;
  b.seqs = &seqs;
  b.packed = pack_sequences(seqs);
  b.T = b.packed.batch.size();
  b.chunks = cuda::token_chunk_bounds(b.T);
  return b;
}

void CudaTrainer::allocate_batch(Batch& b) {
  const int64_t T = b.T, H = c_.hidden_size;
  // Sequence s's tokens by position (the packer lays them out in order).
  std::vector<int32_t> seq_tokens(static_cast<size_t>(T));
  std::iota(seq_tokens.begin(), seq_tokens.end(), 0);
  b.seq_first = {0};
  for (const auto& q : *b.seqs) {
    b.seq_first.push_back(b.seq_first.back() + int32_t(q.size()));
    b.max_seq_len = std::max<int64_t>(b.max_seq_len, int64_t(q.size()));
  }
  b.seq_first_d = alloc<int32_t>(int64_t(b.seq_first.size()));
  b.seq_tokens_d = alloc<int32_t>(T);
  r_.upload_async(b.seq_first_d, b.seq_first.data(), b.seq_first.size() * 4);
  r_.upload_async(b.seq_tokens_d, seq_tokens.data(), seq_tokens.size() * 4);
  b.x_in = alloc<bf16_t>(c_.num_hidden_layers * T * H);
  b.final_in = alloc<bf16_t>(T * H);
  b.hidden = alloc<bf16_t>(T * H);
  b.dx = alloc<float>(T * H);
}

cuda::DeviceSlots CudaTrainer::upload(const Batch& b) {
  return r_.upload_batch(b.packed.batch, b.packed.num_pages, kAttnBlock);
}

cuda::DeviceKvLayer CudaTrainer::step_kv(int64_t pages) {
  cuda::DeviceKvLayer kv;
  const int64_t D = c_.head_dim, nkv = c_.num_key_value_heads;
  kv.k = alloc<bf16_t>(pages * kAttnBlock * nkv * D);
  kv.v = alloc<bf16_t>(pages * kAttnBlock * nkv * D);
  kv.page_size = kAttnBlock;
  kv.kv_heads = nkv;
  kv.head_dim = D;
  return kv;
}

void CudaTrainer::forward(Batch& b, const cuda::DeviceSlots& slots, const cuda::DeviceKvLayer& kv,
                          std::vector<CudaRunner::Workspace>* kept_ws, std::vector<cuda::DeviceKvLayer>* kept_kv) {
  const int64_t T = b.T, H = c_.hidden_size;
  cudaStream_t st = r_.stream_;
  CudaRunner::Workspace& ws = r_.ws_;
  cuda::embedding(ws.meta, r_.embed_, ws.x, T, H, st);
  for (int64_t l = 0; l < c_.num_hidden_layers; ++l) {
    LS_CUDA_CHECK(cudaMemcpyAsync(b.x_in + l * T * H, ws.x, size_t(T * H) * 2, cudaMemcpyDeviceToDevice, st));
    const bool keep = kept_ws && !recomputed(l);
    CudaRunner::LayerOps ops{r_, keep ? (*kept_ws)[size_t(l)] : ws, keep ? (*kept_kv)[size_t(l)] : kv, slots, T};
    layer_forward(ops, r_.layers_[size_t(l)]);
  }
  LS_CUDA_CHECK(cudaMemcpyAsync(b.final_in, ws.x, size_t(T * H) * 2, cudaMemcpyDeviceToDevice, st));
  cuda::rmsnorm(ws.x, r_.final_norm_, b.hidden, T, H, float(c_.rms_norm_eps), st);
}

bool CudaTrainer::head(Batch& b, int64_t index, bool want_entropy, const UpstreamFn& upstream, float* logits,
                       std::vector<std::vector<float>>* scored, float* g_head, float* g_final_norm,
                       const BackwardScratch* s, PhaseClock& clock) {
  const int64_t T = b.T, H = c_.hidden_size, V = c_.vocab_size;
  cudaStream_t st = r_.stream_;
  const auto& seqs = *b.seqs;
  const auto& seq_first = b.seq_first;
  // Logits of every token in one GEMM launch on the rows in place (the score path gathers its
  // rows in slices: a row's bits do not depend on the GEMM configuration, rule 2 of
  // docs/numerics.md).
  r_.compute_logits(b.hidden, nullptr, T, logits);
  std::vector<int32_t> targets(static_cast<size_t>(T), -1);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (size_t t = 0; t + 1 < seqs[i].size(); ++t) targets[size_t(seq_first[i]) + t] = seqs[i][t + 1];
  int32_t* targets_d = alloc<int32_t>(T);
  r_.upload_async(targets_d, targets.data(), targets.size() * 4);
  float *lse = alloc<float>(T), *logp = alloc<float>(T), *entropy = alloc<float>(T);
  cuda::log_normalizer_rows(logits, lse, T, V, st);
  cuda::gather_log_probs(logits, lse, targets_d, logp, T, V, st);  // the score path's bits
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
    return false;
  }
  const std::vector<SequenceGradInput> up = upstream(index, lp, ent);
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
  clock.lap("head_forward");

  // ---- d logits (in place; the lm_head's gradients consume them), lm_head, the final norm.
  const float eps = float(c_.rms_norm_eps);
  const float *dent_or_null = any_entropy ? dent_d : nullptr, *ent_or_null = any_entropy ? entropy : nullptr;
  if (kGradientOperand == cuda::GradientOperand::bf16 && cuda::linear_grads_take_split(T, V, H, b.chunks)) {
    // d logits made and packed in one pass: the largest tensor of the step is read once.
    cuda::log_softmax_gather_backward_packed(logits, lse, targets_d, dlogp_d, dent_or_null, ent_or_null, T, V, st);
    cuda::linear_grads_of_packed_dy(reinterpret_cast<const bf16_t*>(logits), b.hidden, r_.lm_head_, g_head, s->dh, T, V,
                                    H, b.chunks, s->outer_pending, st);
  } else {
    cuda::log_softmax_gather_backward(logits, lse, targets_d, dlogp_d, dent_or_null, ent_or_null, logits, T, V, st);
    cuda::linear_grads_consuming_dy(logits, b.hidden, r_.lm_head_, g_head, s->dh, T, V, H, b.chunks, s->outer_pending,
                                    st, kGradientOperand);
  }
  cuda::inverse_rms_rows(b.final_in, s->inv, T, H, eps, cuda::kNormThreads, st);
  cuda::rmsnorm_backward(b.final_in, s->inv, r_.final_norm_, s->dh, b.dx, g_final_norm, s->norm_partials, T, H, true,
                         b.chunks, st);
  return true;
}

void CudaTrainer::backward_layer(Batch& b, int64_t l, const cuda::DeviceSlots& slots, CudaRunner::Workspace& train_ws,
                                 const cuda::DeviceKvLayer& kv, const DeviceLayerFloats& g, BackwardScratch& s,
                                 PhaseClock& clock, const KeptLayer& kept) {
  const int64_t T = b.T, H = c_.hidden_size;
  cudaStream_t st = r_.stream_;
  const bf16_t* layer_in = b.x_in + l * T * H;
  if (!kept.ws) {
    LS_CUDA_CHECK(cudaMemcpyAsync(train_ws.x, layer_in, size_t(T * H) * 2, cudaMemcpyDeviceToDevice, st));
    CudaRunner::LayerOps ops{r_, train_ws, kv, slots, T};
    layer_forward(ops, r_.layers_[size_t(l)]);
    clock.lap("recompute");
  }
  CudaLayerBackwardOps back{r_,
                            kept.ws ? *kept.ws : train_ws,
                            layer_in,
                            kept.ws ? *kept.kv : kv,
                            slots,
                            b.seq_first_d,
                            b.seq_tokens_d,
                            int64_t(b.seqs->size()),
                            b.max_seq_len,
                            T,
                            b.dx,
                            g,
                            s,
                            clock};
  back.sorted_rows = kept.sorted_rows;
  back.sorted_pinned = kept.sorted_pinned;
  back.kept_rows_in_order = kept.rows_in_order;
  layer_backward(back, r_.layers_[size_t(l)]);
}

void CudaTrainer::embedding_backward(const Batch& b, float* g_embed, const float* g_head, PhaseClock& clock) {
  const int64_t T = b.T, H = c_.hidden_size, V = c_.vocab_size;
  cudaStream_t st = r_.stream_;
  // Each used id's tokens, ascending (the host sorts the step's tokens).
  std::map<int32_t, std::vector<int32_t>> by_id;
  for (int64_t t = 0; t < T; ++t) by_id[b.packed.batch.tokens[size_t(t)]].push_back(int32_t(t));
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
  cuda::embedding_backward(used_d, starts_d, tokens_d, int64_t(used.size()), b.dx, g_embed, T, V, H, st);
  clock.lap("embedding_backward");
  if (c_.tie_word_embeddings) cuda::add_inplace(g_embed, g_head, V * H, st);  // the lookup part, then the head's
}

void CudaTrainer::step_grads(const std::vector<std::vector<int32_t>>& seqs, bool want_entropy,
                             const UpstreamFn& upstream, DeviceFloats* grads, std::vector<std::vector<float>>* scored) {
  const auto& c = c_;
  const int64_t H = c.hidden_size, V = c.vocab_size, NL = c.num_hidden_layers, qd = c.q_dim(), kd = c.kv_dim();
  cudaStream_t st = r_.stream_;
  Batch b = prepare_batch(seqs);
  const int64_t T = b.T;
  r_.step_arena_.reset();
  recomputed_layers_ = recomputed_layers(T, 1, upstream != nullptr, true);
  check_fits(T, 1, recomputed_layers_, upstream != nullptr, true);
  const TrainMemory plan = cuda_train_memory(c_, T, 1, recomputed_layers_);
  r_.step_arena_.prepare(plan.logits + plan.activations);

  // The step's K/V: one layer's pages, rewritten by each layer's forward and recomputation.
  const int64_t pages = b.packed.num_pages, D = c.head_dim, nkv = c.num_key_value_heads;
  const cuda::DeviceKvLayer kv = step_kv(pages);
  r_.reserve(T, 1);
  const cuda::DeviceSlots slots = upload(b);
  allocate_batch(b);

  // ---- Forward: each layer's input kept, then the head. A layer not recomputed in the backward
  // runs on buffers of its own for what its backward reads (and its own K/V pages), the rest
  // of the runner's workspace shared: its backward then reads the forward's own values.
  CudaRunner::Workspace& ws = r_.ws_;
  PhaseClock clock(st);
  const int64_t E = std::max<int64_t>(c.num_experts, 1), k_routed = std::max<int64_t>(c.num_experts_per_tok, 1);
  std::vector<CudaRunner::Workspace> kept_ws(static_cast<size_t>(upstream ? NL : 0), ws);
  std::vector<cuda::DeviceKvLayer> kept_kv(static_cast<size_t>(upstream ? NL : 0), kv);
  for (int64_t l = 0; upstream && l < NL; ++l) {
    if (recomputed(l)) continue;
    CudaRunner::Workspace& w = kept_ws[size_t(l)];
    w.h = alloc<bf16_t>(T * H), w.qkv = alloc<bf16_t>(T * (qd + 2 * kd)), w.q = alloc<bf16_t>(T * qd);
    w.attn = alloc<bf16_t>(T * qd), w.mid = alloc<bf16_t>(T * H), w.h_mlp = alloc<bf16_t>(T * H);
    w.lse = alloc<float>(T * c.num_attention_heads);
    w.y = alloc<bf16_t>(T * k_routed * H), w.router_logits = alloc<float>(T * E);
    w.ids = alloc<int32_t>(T * k_routed), w.expert_weights = alloc<float>(T * k_routed);
    if (c.is_moe_layer(l)) {
      const int64_t I = c.moe_intermediate_size;
      w.keep_gate_up = true;
      w.gu = alloc<bf16_t>(T * k_routed * 2 * I), w.act = alloc<bf16_t>(T * k_routed * I);
      if (keep_expert_input_rows()) w.x_rows = alloc<bf16_t>(T * k_routed * H);
      w.scatter = alloc<int32_t>(T * k_routed);
    }
    kept_kv[size_t(l)].k = alloc<bf16_t>(pages * kAttnBlock * nkv * D);
    kept_kv[size_t(l)].v = alloc<bf16_t>(pages * kAttnBlock * nkv * D);
  }
  forward(b, slots, kv, upstream ? &kept_ws : nullptr, upstream ? &kept_kv : nullptr);
  // The kept MoE layers' routing goes to the host now (the log-prob download below waits for
  // it), so their expert rows are sorted while the GPU runs the head's backward and the layers'
  // backward never waits for a read-back.
  const int64_t routed_rows = T * k_routed, sorted_ints = 5 * routed_rows + E + 1;
  // pinned_of[l]: a kept MoE layer's region of the trainer's pinned buffer (else null).
  std::vector<int32_t*> pinned_of(static_cast<size_t>(NL), nullptr);
  size_t kept_moe = 0;
  for (int64_t l = 0; upstream && l < NL; ++l) kept_moe += !recomputed(l) && c.is_moe_layer(l);
  int32_t* pinned = r_.train_pinned_.reserve(kept_moe * size_t(sorted_ints), st);
  for (int64_t l = 0; upstream && l < NL; ++l) {
    if (recomputed(l) || !c.is_moe_layer(l)) continue;
    int32_t* p = pinned_of[size_t(l)] = pinned;  // ids, then the forward's row order (scatter)
    pinned += sorted_ints;
    const CudaRunner::Workspace& w = kept_ws[size_t(l)];
    LS_CUDA_CHECK(cudaMemcpyAsync(p, w.ids, size_t(routed_rows) * 4, cudaMemcpyDeviceToHost, st));
    LS_CUDA_CHECK(cudaMemcpyAsync(p + routed_rows, w.scatter, size_t(routed_rows) * 4, cudaMemcpyDeviceToHost, st));
  }
  clock.lap("forward");

  // ---- Gradients: every kernel overwrites its tensor (the embedding's table zeroed first, the
  // experts without tokens zeroed by the MoE backward), so the buffer needs no clearing.
  float* logits = alloc<float>(T * V);
  BackwardScratch s;
  if (upstream) s = scratch(T);
  const bool trains = head(b, 0, want_entropy, upstream, logits, scored, grads ? grads->lm_head : nullptr,
                           grads ? grads->final_norm : nullptr, upstream ? &s : nullptr, clock);
  if (!trains) {
    r_.step_arena_.reset();  // the log-prob download waited for the stream
    return;
  }
  // The kept layers' expert rows (the CPU's assign order), each layer's over its routing, and
  // where the forward put each row (its own order; the same one at 8192 pairs and more).
  std::vector<cpu::ExpertRows> sorted(static_cast<size_t>(NL));
  std::vector<char> rows_in_order(static_cast<size_t>(NL), 0);  // the forward placed them in this order
  for (int64_t l = 0; l < NL; ++l) {
    int32_t* p = pinned_of[size_t(l)];
    if (!p) continue;
    cpu::ExpertRows& rows = sorted[size_t(l)];
    rows = cpu::expert_rows(p, T, k_routed, E);
    // The forward's rows are already in this order where it placed the same pair at each row;
    // else each row's place there (kept_row) goes to the backward's gathers.
    const bool in_order = std::equal(rows.row_pair.begin(), rows.row_pair.end(), p + routed_rows);
    rows_in_order[size_t(l)] = in_order;
    if (!in_order) {
      const std::vector<int32_t> kept_row = cpu::rows_in_placement(rows, p + routed_rows);
      std::copy(kept_row.begin(), kept_row.end(), p + 3 * routed_rows);
    }
    // What was read is no longer needed: the arrays take its place.
    std::copy(rows.row_token.begin(), rows.row_token.end(), p);
    std::copy(rows.row_pair.begin(), rows.row_pair.end(), p + routed_rows);
    std::copy(rows.order.begin(), rows.order.end(), p + 2 * routed_rows);
    std::copy(rows.offsets.begin(), rows.offsets.end(), p + 4 * routed_rows);
  }
  clock.lap("head_backward");

  // ---- Layers, last first: recomputed from the kept input into buffers that keep mid and
  // the MLP input, then the layer's backward.
  CudaRunner::Workspace train_ws = train_workspace(T);
  for (int64_t l = NL - 1; l >= 0; --l) {
    KeptLayer kept;
    if (!recomputed(l)) kept = {&kept_ws[size_t(l)], &kept_kv[size_t(l)]};
    if (pinned_of[size_t(l)]) {
      kept.sorted_rows = &sorted[size_t(l)], kept.sorted_pinned = pinned_of[size_t(l)];
      kept.rows_in_order = rows_in_order[size_t(l)] != 0;
    }
    backward_layer(b, l, slots, train_ws, kv, grads->layers[size_t(l)], s, clock, kept);
  }
  embedding_backward(b, grads->embed, grads->lm_head, clock);
  LS_CUDA_CHECK(cudaStreamSynchronize(st));
  r_.step_arena_.reset();
}

CudaRunner::Workspace CudaTrainer::train_workspace(int64_t T) {
  CudaRunner::Workspace w = r_.ws_;
  w.mid = alloc<bf16_t>(T * c_.hidden_size);
  w.h_mlp = alloc<bf16_t>(T * c_.hidden_size);
  w.lse = alloc<float>(T * c_.num_attention_heads);
  return w;
}

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

void cuda_check_step_memory(ModelRunner& runner, int64_t tokens, int64_t micro_batches, int64_t recompute_num_layers) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda_check_step_memory: the runner is not a CUDA runner");
  cuda_model::CudaTrainer(*cuda_runner, recompute_num_layers).check_memory(tokens, micro_batches, true, false);
}

ModelWeights cuda_step_grads(ModelRunner& runner, const std::vector<std::vector<int32_t>>& sequences, bool want_entropy,
                             const UpstreamFn& upstream, int64_t recompute_num_layers) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda_step_grads: the runner is not a CUDA runner");
  cuda_model::CudaTrainer trainer(*cuda_runner, recompute_num_layers);
  int64_t tokens = 0;
  for (const auto& q : sequences) tokens += int64_t(q.size());
  trainer.check_memory(tokens, 1, true, false);  // one micro-batch: one gradient buffer
  cuda_model::DeviceFloats grads;
  grads.allocate(runner.config());
  trainer.step_grads(sequences, want_entropy, upstream, &grads);
  return cuda_model::download_named(grads, runner.config(), cuda_runner->stream());
}

}  // namespace lockstep
