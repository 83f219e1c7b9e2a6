// The fused device layout of the model's parameters (device_params.h).
#include "kernels/cuda/backward.h"
#include "model/cuda/device_params.h"

namespace lockstep::cuda_model {

void DeviceFloats::allocate(const ModelConfig& c) {
  const int64_t H = c.hidden_size, V = c.vocab_size, qd = c.q_dim(), kd = c.kv_dim(), D = c.head_dim;
  arena.clear();
  buffers.clear();
  auto take = [&](int64_t n) {
    float* p = arena.alloc<float>(n);
    buffers.emplace_back(p, n);
    return p;
  };
  embed = take(V * H), lm_head = take(V * H), final_norm = take(H);
  layers.assign(size_t(c.num_hidden_layers), {});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto& L = layers[size_t(l)];
    const bool moe = c.is_moe_layer(l);
    const int64_t E = moe ? c.num_experts : 1, I = moe ? c.moe_intermediate_size : c.intermediate_size;
    L.qkv = take((qd + 2 * kd) * H), L.o = take(H * qd);
    L.input_norm = take(H), L.post_norm = take(H), L.q_norm = take(D), L.k_norm = take(D);
    if (moe) L.router = take(E * H);
    L.gate_up = take(E * 2 * I * H), L.down = take(E * H * I);
  }
}

void DeviceFloats::zero(cudaStream_t s) {
  for (auto [p, n] : buffers) LS_CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(n) * 4, s));
}

void DeviceFloats::add(const DeviceFloats& other, cudaStream_t s) {
  LS_CHECK(other.buffers.size() == buffers.size(), "device gradients: layouts differ");
  for (size_t i = 0; i < buffers.size(); ++i)
    cuda::add_inplace(buffers[i].first, other.buffers[i].first, buffers[i].second, s);
}

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

namespace {

template <typename Floats>
auto* buffer_of(Floats& d, const DeviceSegment& s) {
  using B = DeviceBuffer;
  auto& L = d.layers[size_t(std::max<int64_t>(s.slot.layer, 0))];
  switch (s.buffer) {
    case B::embed: return d.embed;
    case B::lm_head: return d.lm_head;
    case B::final_norm: return d.final_norm;
    case B::qkv: return L.qkv;
    case B::o: return L.o;
    case B::input_norm: return L.input_norm;
    case B::post_norm: return L.post_norm;
    case B::q_norm: return L.q_norm;
    case B::k_norm: return L.k_norm;
    case B::router: return L.router;
    case B::gate_up: return L.gate_up;
    case B::down: return L.down;
  }
  return d.embed;
}

}  // namespace

float* segment_ptr(DeviceFloats& d, const DeviceSegment& s) { return buffer_of(d, s) + s.offset; }
const float* segment_ptr(const DeviceFloats& d, const DeviceSegment& s) {
  return buffer_of(const_cast<DeviceFloats&>(d), s) + s.offset;
}

void runner_segment_ptr(CudaRunner& r, const DeviceSegment& s, bf16_t** matrix, float** norm) {
  using B = DeviceBuffer;
  *matrix = nullptr;
  *norm = nullptr;
  const DeviceLayer* L = s.slot.layer >= 0 ? &r.layers_[size_t(s.slot.layer)] : nullptr;
  switch (s.buffer) {
    case B::embed: *matrix = r.embed_ + s.offset; return;
    case B::lm_head: *matrix = r.lm_head_ + s.offset; return;
    case B::final_norm: *norm = r.final_norm_ + s.offset; return;
    case B::qkv: *matrix = L->qkv + s.offset; return;
    case B::o: *matrix = L->o + s.offset; return;
    case B::input_norm: *norm = L->input_norm + s.offset; return;
    case B::post_norm: *norm = L->post_norm + s.offset; return;
    case B::q_norm: *norm = L->q_norm + s.offset; return;
    case B::k_norm: *norm = L->k_norm + s.offset; return;
    case B::router: *matrix = L->router + s.offset; return;
    case B::gate_up: *matrix = L->gate_up + s.offset; return;
    case B::down: *matrix = L->down + s.offset; return;
  }
}

}  // namespace lockstep::cuda_model
