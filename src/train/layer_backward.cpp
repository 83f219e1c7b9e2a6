#include "train/layer_backward.h"

#include <cmath>

#include "kernels/cpu/attention_backward.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/moe_backward.h"
#include "kernels/cpu/rope_backward.h"

namespace lockstep {

void layer_backward(const Qwen3Moe& model, int64_t l, const ForwardBatch& batch, KvCache& cache, const float* x_in,
                    const LayerActivations& acts, float* dx, const LayerGradPtrs& g) {
  const auto& c = model.config();
  const auto& L = model.weights().layers[l];
  const int64_t T = batch.size(), H = c.hidden_size, D = c.head_dim;
  const int64_t nq = c.num_attention_heads, nkv = c.num_key_value_heads;
  const float eps = float(c.rms_norm_eps);
  const bool bf16 = model.precision() == Precision::bfloat16;  // cast points are straight-through
  const cpu::TokenChunks chunks = cpu::token_chunks(T);

  // MLP block: out = mid + mlp(post_attention_norm(mid)).
  std::vector<float> dh(T * H), dnorm(T * H);
  if (L.is_moe) {
    const int64_t E = c.num_experts;
    std::vector<const float*> gate(E), up(E), down(E);
    for (int64_t e = 0; e < E; ++e) {
      gate[e] = L.experts[e].gate.data<float>();
      up[e] = L.experts[e].up.data<float>();
      down[e] = L.experts[e].down.data<float>();
    }
    cpu::moe_backward(acts.mlp_norm_out.data(), acts.router_logits.data(), L.router.data<float>(), gate.data(),
                      up.data(), down.data(), dx, dh.data(), g.router, g.expert_gate.data(), g.expert_up.data(),
                      g.expert_down.data(), T, H, c.moe_intermediate_size, E, c.num_experts_per_tok,
                      c.norm_topk_prob, bf16);
  } else {
    cpu::swiglu_mlp_backward(acts.mlp_norm_out.data(), L.dense.gate.data<float>(), L.dense.up.data<float>(),
                             L.dense.down.data<float>(), dx, dh.data(), g.dense_gate, g.dense_up, g.dense_down, T, H,
                             c.intermediate_size, chunks, bf16);
  }
  cpu::rmsnorm_backward(acts.mid.data(), L.post_attention_norm.data<float>(), dh.data(), dnorm.data(),
                        g.post_attention_norm, T, H, eps, bf16, chunks);
  cpu::add_inplace(dx, dnorm.data(), T * H);  // dx is now d(mid)

  // Attention block: mid = x_in + o_proj(attention(rope(norm(q)), rope(norm(k)), v)).
  const int64_t qd = nq * D, kd = nkv * D;
  std::vector<float> dattn(T * qd), dq(T * qd), dk(T * kd), dv(T * kd), dq_proj(T * qd), dk_proj(T * kd);
  cpu::linear_weight_grad(dx, acts.attn.data(), g.o_proj, H, qd, chunks);
  cpu::linear_input_grad(dx, L.o_proj.data<float>(), dattn.data(), T, H, qd);  // row form: N = hidden
  PagedKvLayer kv = cache.layer(l);
  TokenSlots slots{batch.positions.data(), batch.page_tables.data()};
  cpu::paged_attention_backward(acts.q.data(), acts.attn.data(), dattn.data(), kv, slots, T, nq,
                                1.0f / std::sqrt(float(D)), dq.data(), dk.data(), dv.data());
  cpu::rope_backward(dq.data(), batch.positions.data(), T, nq, model.rope_table());
  cpu::rope_backward(dk.data(), batch.positions.data(), T, nkv, model.rope_table());
  cpu::rmsnorm_backward(acts.q_proj.data(), L.q_norm.data<float>(), dq.data(), dq_proj.data(), g.q_norm, T * nq, D,
                        eps, bf16, cpu::token_chunks(T, nq));
  cpu::rmsnorm_backward(acts.k_proj.data(), L.k_norm.data<float>(), dk.data(), dk_proj.data(), g.k_norm, T * nkv, D,
                        eps, bf16, cpu::token_chunks(T, nkv));
  const float* h = acts.attn_norm_out.data();
  cpu::linear_weight_grad(dq_proj.data(), h, g.q_proj, qd, H, chunks);
  cpu::linear_weight_grad(dk_proj.data(), h, g.k_proj, kd, H, chunks);
  cpu::linear_weight_grad(dv.data(), h, g.v_proj, kd, H, chunks);
  // d(norm output) = q part + k part + v part, in that order, each canonical over its N.
  std::vector<float> part(T * H);
  cpu::linear_input_grad(dq_proj.data(), L.q_proj.data<float>(), dh.data(), T, qd, H);
  cpu::linear_input_grad(dk_proj.data(), L.k_proj.data<float>(), part.data(), T, kd, H);
  cpu::add_inplace(dh.data(), part.data(), T * H);
  cpu::linear_input_grad(dv.data(), L.v_proj.data<float>(), part.data(), T, kd, H);
  cpu::add_inplace(dh.data(), part.data(), T * H);
  cpu::rmsnorm_backward(x_in, L.input_norm.data<float>(), dh.data(), dnorm.data(), g.input_norm, T, H, eps, bf16,
                        chunks);
  cpu::add_inplace(dx, dnorm.data(), T * H);  // d(x_in) = d(mid) + norm path
}

}  // namespace lockstep
