#include "model/device_layout.h"

namespace lockstep {

std::vector<DeviceSegment> device_segments(const ModelConfig& c) {
  using K = ParamKind;
  using B = DeviceBuffer;
  const int64_t H = c.hidden_size, V = c.vocab_size, qd = c.q_dim(), kd = c.kv_dim(), D = c.head_dim;
  std::vector<DeviceSegment> out;
  auto add = [&](ParamSlot slot, B buffer, int64_t offset, int64_t numel, bool norm) {
    out.push_back({slot, buffer, offset, numel, norm});
  };
  add({K::embed}, B::embed, 0, V * H, false);
  add({K::final_norm}, B::final_norm, 0, H, true);
  if (!c.tie_word_embeddings) add({K::lm_head}, B::lm_head, 0, V * H, false);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    add({K::input_norm, l}, B::input_norm, 0, H, true);
    add({K::post_attention_norm, l}, B::post_norm, 0, H, true);
    add({K::q_proj, l}, B::qkv, 0, qd * H, false);
    add({K::k_proj, l}, B::qkv, qd * H, kd * H, false);
    add({K::v_proj, l}, B::qkv, (qd + kd) * H, kd * H, false);
    add({K::o_proj, l}, B::o, 0, H * qd, false);
    add({K::q_norm, l}, B::q_norm, 0, D, true);
    add({K::k_norm, l}, B::k_norm, 0, D, true);
    if (c.is_moe_layer(l)) {
      const int64_t I = c.moe_intermediate_size;
      add({K::router, l}, B::router, 0, c.num_experts * H, false);
      for (int64_t e = 0; e < c.num_experts; ++e) {
        add({K::expert_gate, l, e}, B::gate_up, e * 2 * I * H, I * H, false);
        add({K::expert_up, l, e}, B::gate_up, e * 2 * I * H + I * H, I * H, false);
        add({K::expert_down, l, e}, B::down, e * H * I, H * I, false);
      }
    } else {
      const int64_t I = c.intermediate_size;
      add({K::dense_gate, l}, B::gate_up, 0, I * H, false);
      add({K::dense_up, l}, B::gate_up, I * H, I * H, false);
      add({K::dense_down, l}, B::down, 0, H * I, false);
    }
  }
  return out;
}

int64_t device_buffer_floats(const ModelConfig& c, DeviceBuffer buffer, int64_t layer) {
  using B = DeviceBuffer;
  const int64_t H = c.hidden_size, V = c.vocab_size, qd = c.q_dim(), kd = c.kv_dim(), D = c.head_dim;
  const bool moe = layer >= 0 && c.is_moe_layer(layer);
  const int64_t E = moe ? c.num_experts : 1, I = moe ? c.moe_intermediate_size : c.intermediate_size;
  switch (buffer) {
    case B::embed:
    case B::lm_head: return V * H;
    case B::final_norm:
    case B::input_norm:
    case B::post_norm: return H;
    case B::qkv: return (qd + 2 * kd) * H;
    case B::o: return H * qd;
    case B::q_norm:
    case B::k_norm: return D;
    case B::router: return moe ? E * H : 0;
    case B::gate_up: return E * 2 * I * H;
    case B::down: return E * H * I;
  }
  return 0;
}

}  // namespace lockstep
