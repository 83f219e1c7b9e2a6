// fp32 tensors of the whole model on the device in the CUDA runner's fused layout (the GPU
// trainer's gradients, AdamW's masters and moments), and the one table that places every
// parameter of the names table (for_each_param, model/weights.h) in that layout: q, k, v rows
// in one [q_dim + 2 kv_dim, H] block; per expert its gate rows, then its up rows, in one
// [E, 2I, H] block; down [E, H, I]. Included by CUDA sources only.
#pragma once
#include <cstdint>
#include <vector>

#include "model/cuda/cuda_runner_impl.h"
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

// The model's fp32 tensors. lm_head has its own buffer even when tied (the gradient's head
// part before it is added to the embedding's).
struct DeviceFloats {
  float *embed = nullptr, *lm_head = nullptr, *final_norm = nullptr;
  std::vector<DeviceLayerFloats> layers;
  std::vector<std::pair<float*, int64_t>> buffers;  // every buffer and its floats
  DeviceArena arena;

  void allocate(const ModelConfig& c);
  void zero(cudaStream_t s);
  // this += other, elementwise (the micro-batch tree's add; the same layout).
  void add(const DeviceFloats& other, cudaStream_t s);
};

// Where one parameter lives: its slot (name), buffer, layer and offset in that buffer.
enum class DeviceBuffer {
  embed,
  lm_head,
  final_norm,
  qkv,
  o,
  input_norm,
  post_norm,
  q_norm,
  k_norm,
  router,
  gate_up,
  down
};
struct DeviceSegment {
  ParamSlot slot;
  DeviceBuffer buffer;
  int64_t offset = 0, numel = 0;
  bool is_norm = false;  // no weight decay; fp32 in the runner
};
// Every parameter in for_each_param order (a tied lm_head omitted, as there).
std::vector<DeviceSegment> device_segments(const ModelConfig& c);

float* segment_ptr(DeviceFloats& d, const DeviceSegment& s);
const float* segment_ptr(const DeviceFloats& d, const DeviceSegment& s);
// The runner's own buffer of a segment: bf16 for matrices, fp32 for norms (the other null).
void runner_segment_ptr(CudaRunner& r, const DeviceSegment& s, bf16_t** matrix, float** norm);

}  // namespace lockstep::cuda_model
