// fp32 tensors of the whole model on the device in the CUDA runner's fused layout
// (model/device_layout.h): the GPU trainer's gradients, AdamW's masters and moments, and the
// pointers of a parameter in them and in the runner. Included by CUDA sources only.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "model/cuda/cuda_runner_impl.h"
#include "model/device_layout.h"
#include "model/weights.h"

namespace lockstep::cuda_model {

// One layer's fp32 tensors, laid out as the runner's DeviceLayer.
struct DeviceLayerFloats {
  float *qkv = nullptr, *o = nullptr;
  float *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
  float* router = nullptr;   // [E, H] (MoE layers)
  float* gate_up = nullptr;  // [E, 2I, H] (dense: [2I, H])
  float* down = nullptr;     // [E, H, I] (dense: [H, I])
};

// A layer's buffers, each with its field: the one list that allocation, segment lookup and
// the layer-major tree's scratch levels walk.
inline constexpr std::pair<DeviceBuffer, float * DeviceLayerFloats::*> kLayerBuffers[] = {
    {DeviceBuffer::qkv, &DeviceLayerFloats::qkv},
    {DeviceBuffer::o, &DeviceLayerFloats::o},
    {DeviceBuffer::input_norm, &DeviceLayerFloats::input_norm},
    {DeviceBuffer::post_norm, &DeviceLayerFloats::post_norm},
    {DeviceBuffer::q_norm, &DeviceLayerFloats::q_norm},
    {DeviceBuffer::k_norm, &DeviceLayerFloats::k_norm},
    {DeviceBuffer::router, &DeviceLayerFloats::router},
    {DeviceBuffer::gate_up, &DeviceLayerFloats::gate_up},
    {DeviceBuffer::down, &DeviceLayerFloats::down}};

// Layer l's buffers in kLayerBuffers' order, each take(buffer) (null where the layer has none:
// device_buffer_floats is 0).
template <typename Take>
DeviceLayerFloats layer_floats(const ModelConfig& c, int64_t l, Take take) {
  DeviceLayerFloats g;
  for (auto [buffer, field] : kLayerBuffers) g.*field = device_buffer_floats(c, buffer, l) > 0 ? take(buffer) : nullptr;
  return g;
}

// The model's fp32 tensors. lm_head has its own buffer even when tied (the gradient's head
// part before it is added to the embedding's).
struct DeviceFloats {
  float *embed = nullptr, *lm_head = nullptr, *final_norm = nullptr;
  std::vector<DeviceLayerFloats> layers;
  std::vector<std::pair<float*, int64_t>> buffers;  // every buffer and its floats
  DeviceArena arena;

  void allocate(const ModelConfig& c);
  // this += other, elementwise (the micro-batch tree's add; the same layout).
  void add(const DeviceFloats& other, cudaStream_t s);
};

float* segment_ptr(DeviceFloats& d, const DeviceSegment& s);
const float* segment_ptr(const DeviceFloats& d, const DeviceSegment& s);
// The runner's own buffer of a segment: bf16 for matrices, fp32 for norms (the other null).
void runner_segment_ptr(CudaRunner& r, const DeviceSegment& s, bf16_t** matrix, float** norm);

}  // namespace lockstep::cuda_model
