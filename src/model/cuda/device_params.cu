// The fused device layout of the model's parameters (device_params.h).
#include "kernels/cuda/backward.h"
#include "model/cuda/device_params.h"

namespace lockstep::cuda_model {

void DeviceFloats::allocate(const ModelConfig& c) {
  using B = DeviceBuffer;
  arena.clear();
  buffers.clear();
  auto take = [&](B buffer, int64_t layer) -> float* {
    const int64_t n = device_buffer_floats(c, buffer, layer);
    if (n == 0) return nullptr;
    float* p = arena.alloc<float>(n);
    buffers.emplace_back(p, n);
    return p;
  };
  embed = take(B::embed, -1), lm_head = take(B::lm_head, -1), final_norm = take(B::final_norm, -1);
  layers.assign(size_t(c.num_hidden_layers), {});
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    layers[size_t(l)] = layer_floats(c, l, [&](B buffer) { return take(buffer, l); });
}

void DeviceFloats::add(const DeviceFloats& other, cudaStream_t s) {
  LS_CHECK(other.buffers.size() == buffers.size(), "device gradients: layouts differ");
  for (size_t i = 0; i < buffers.size(); ++i)
    cuda::add_inplace(buffers[i].first, other.buffers[i].first, buffers[i].second, s);
}

namespace {

template <typename Floats>
auto* buffer_of(Floats& d, const DeviceSegment& s) {
  using B = DeviceBuffer;
  switch (s.buffer) {
    case B::embed: return d.embed;
    case B::lm_head: return d.lm_head;
    case B::final_norm: return d.final_norm;
    default: break;
  }
  const DeviceLayerFloats& L = d.layers[size_t(std::max<int64_t>(s.slot.layer, 0))];
  for (auto [buffer, field] : kLayerBuffers)
    if (buffer == s.buffer) return L.*field;
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
