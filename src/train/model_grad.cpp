#include "train/model_grad.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/log_softmax_backward.h"
#include "train/layer_backward.h"

namespace lockstep {

TrainForward train_forward(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs, bool want_entropy) {
  const auto& c = model.config();
  TrainForward f;
  f.seqs = seqs;
  for (size_t s = 0; s < seqs.size(); ++s)
    LS_CHECK(int64_t(seqs[s].size()) <= c.max_position_embeddings, "train_forward: sequence ", s, " has ",
             seqs[s].size(), " tokens, more than max_position_embeddings (", c.max_position_embeddings, ")");
  f.packed = pack_sequences(seqs);
  KvCache cache(c, f.packed.num_pages, kAttnBlock);
  std::vector<float> hidden = model.forward(f.packed.batch, cache, &f.trace);
  std::vector<float> logits = model.logits(hidden.data(), f.packed.batch.size());
  const int64_t V = c.vocab_size;
  f.logprobs.resize(seqs.size());
  if (want_entropy) f.entropy.resize(seqs.size());
  int64_t offset = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int64_t n = int64_t(seqs[s].size());
    f.logprobs[s].resize(n - 1);
    if (n > 1) cpu::log_softmax_gather(logits.data() + offset * V, seqs[s].data() + 1, f.logprobs[s].data(), n - 1, V);
    if (want_entropy) {
      f.entropy[s].resize(n - 1);
      if (n > 1) cpu::softmax_entropy(logits.data() + offset * V, f.entropy[s].data(), n - 1, V);
    }
    offset += n;
  }
  return f;
}

namespace {

float* grad_slot(std::map<std::string, Tensor>& grads, const std::string& name, const Tensor& param) {
  auto it = grads.find(name);
  if (it == grads.end()) it = grads.emplace(name, Tensor::zeros(param.shape(), DType::f32)).first;
  LS_CHECK(it->second.dtype() == DType::f32 && it->second.shape() == param.shape(), "backward: gradient '", name,
           "' must be f32 ", shape_str(param.shape()), ", found ", dtype_name(it->second.dtype()), " ",
           shape_str(it->second.shape()));
  return it->second.data<float>();
}

}  // namespace

void backward(const Qwen3Moe& model, const TrainForward& fwd, const std::vector<SequenceGradInput>& upstream,
              std::map<std::string, Tensor>& grads) {
  const auto& c = model.config();
  const auto& W = model.weights();
  const ForwardBatch& batch = fwd.packed.batch;
  const int64_t T = batch.size(), H = c.hidden_size, V = c.vocab_size;
  LS_CHECK(upstream.size() == fwd.seqs.size(), "backward: ", upstream.size(), " upstream gradients for ",
           fwd.seqs.size(), " sequences");
  LS_CHECK(int64_t(fwd.trace.layer_inputs.size()) == c.num_hidden_layers, "backward: the forward kept no trace");

  // Per token of the stream: the upstream gradients of its prediction (zero for each
  // sequence's last token, which predicts nothing).
  std::vector<float> dlogp(T, 0.0f), dent(T, 0.0f), entropy(T, 0.0f);
  std::vector<int32_t> targets(T, 0);
  bool any_entropy = false;
  int64_t offset = 0;
  for (size_t s = 0; s < fwd.seqs.size(); ++s) {
    const auto& seq = fwd.seqs[s];
    const size_t m = seq.size() - 1;
    LS_CHECK(upstream[s].dlogp.size() == m, "backward: sequence ", s, " has ", m, " predicted tokens but dlogp has ",
             upstream[s].dlogp.size(), " values");
    LS_CHECK(upstream[s].dentropy.empty() || upstream[s].dentropy.size() == m, "backward: sequence ", s, " has ", m,
             " predicted tokens but dentropy has ", upstream[s].dentropy.size(), " values (expected 0 or ", m, ")");
    for (size_t t = 0; t < m; ++t) {
      targets[offset + t] = seq[t + 1];
      dlogp[offset + t] = upstream[s].dlogp[t];
      if (!upstream[s].dentropy.empty()) {
        dent[offset + t] = upstream[s].dentropy[t];
        any_entropy = true;
      }
    }
    offset += int64_t(seq.size());
  }

  // Head: logits are recomputed from the final hidden states (the same kernel, the same bits).
  const std::vector<float>& hidden = fwd.trace.final_hidden;
  std::vector<float> logits = model.logits(hidden.data(), T);
  if (any_entropy) cpu::softmax_entropy(logits.data(), entropy.data(), T, V);
  std::vector<float> dlogits(T * V);
  cpu::log_softmax_gather_backward(logits.data(), targets.data(), dlogp.data(), any_entropy ? dent.data() : nullptr,
                                   any_entropy ? entropy.data() : nullptr, dlogits.data(), T, V);
  logits = {};
  const cpu::TokenChunks chunks = cpu::token_chunks(T);
  std::vector<float> lm_head_grad(V * H);
  cpu::linear_weight_grad(dlogits.data(), hidden.data(), lm_head_grad.data(), V, H, chunks);
  std::vector<float> dhidden(T * H), dx(T * H);
  cpu::linear_input_grad(dlogits.data(), W.lm_head.data<float>(), dhidden.data(), T, V, H);
  dlogits = {};
  cpu::rmsnorm_backward(fwd.trace.final_norm_input.data(), W.final_norm.data<float>(), dhidden.data(), dx.data(),
                        grad_slot(grads, "model.norm.weight", W.final_norm), T, H, float(c.rms_norm_eps),
                        model.precision() == Precision::bfloat16, chunks);

  // Layers in reverse, each recomputed from its saved input.
  KvCache cache(c, fwd.packed.num_pages, kAttnBlock);
  std::vector<float> x;
  for (int64_t l = c.num_hidden_layers - 1; l >= 0; --l) {
    const auto& L = W.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerGradPtrs g;
    g.input_norm = grad_slot(grads, p + "input_layernorm.weight", L.input_norm);
    g.post_attention_norm = grad_slot(grads, p + "post_attention_layernorm.weight", L.post_attention_norm);
    g.q_proj = grad_slot(grads, p + "self_attn.q_proj.weight", L.q_proj);
    g.k_proj = grad_slot(grads, p + "self_attn.k_proj.weight", L.k_proj);
    g.v_proj = grad_slot(grads, p + "self_attn.v_proj.weight", L.v_proj);
    g.o_proj = grad_slot(grads, p + "self_attn.o_proj.weight", L.o_proj);
    g.q_norm = grad_slot(grads, p + "self_attn.q_norm.weight", L.q_norm);
    g.k_norm = grad_slot(grads, p + "self_attn.k_norm.weight", L.k_norm);
    if (L.is_moe) {
      g.router = grad_slot(grads, p + "mlp.gate.weight", L.router);
      std::vector<float*> expert_grads;
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string ep = p + "mlp.experts." + std::to_string(e) + ".";
        expert_grads.push_back(grad_slot(grads, ep + "gate_proj.weight", L.experts[e].gate));
        expert_grads.push_back(grad_slot(grads, ep + "up_proj.weight", L.experts[e].up));
        expert_grads.push_back(grad_slot(grads, ep + "down_proj.weight", L.experts[e].down));
      }
      g.expert = [expert_grads](int64_t j, int, int which) { return expert_grads[size_t(j * 3 + which)]; };
    } else {
      g.dense_gate = grad_slot(grads, p + "mlp.gate_proj.weight", L.dense.gate);
      g.dense_up = grad_slot(grads, p + "mlp.up_proj.weight", L.dense.up);
      g.dense_down = grad_slot(grads, p + "mlp.down_proj.weight", L.dense.down);
    }
    const std::vector<float>& x_in = fwd.trace.layer_inputs[l];
    x = x_in;
    LayerActivations acts;
    model.layer_forward(l, x, batch, cache, &acts);
    layer_backward(model, l, batch, cache, x_in, acts, dx, g);
  }

  // Embedding, then (tied) the lm_head part added in that fixed order.
  float* dembed = grad_slot(grads, "model.embed_tokens.weight", W.embed);
  cpu::embedding_backward(batch.tokens.data(), dx.data(), dembed, T, V, H);
  if (c.tie_word_embeddings)
    cpu::add_inplace(dembed, lm_head_grad.data(), V * H);
  else
    std::copy(lm_head_grad.begin(), lm_head_grad.end(), grad_slot(grads, "lm_head.weight", W.lm_head));
}

}  // namespace lockstep
