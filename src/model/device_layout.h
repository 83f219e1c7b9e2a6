// The GPU's fused layout of the model's parameters, as one table over the names table
// (for_each_param, model/weights.h): the CUDA runner keeps q, k, v rows in one
// [q_dim + 2 kv_dim, H] block per layer, per expert its gate rows then its up rows in one
// [E, 2I, H] block, down in [E, H, I]; the trainer's gradients and AdamW's state use the same
// layout (model/cuda/device_params.h). Host code, so the table is tested on any machine.
#pragma once
#include <cstdint>
#include <vector>

#include "model/weights.h"

namespace lockstep {

// One buffer kind of the layout; the layer ones exist once per layer.
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

// Where one parameter lives: its slot (name), its buffer (of layer slot.layer for the layer
// kinds) and its place there.
struct DeviceSegment {
  ParamSlot slot;
  DeviceBuffer buffer;
  int64_t offset = 0, numel = 0;
  bool is_norm = false;  // no weight decay; fp32 in the runner
};

// Every parameter in for_each_param order (a tied lm_head omitted, as there).
std::vector<DeviceSegment> device_segments(const ModelConfig& c);

// The floats of one buffer (0 where the layer has no such buffer: a dense layer's router).
int64_t device_buffer_floats(const ModelConfig& c, DeviceBuffer buffer, int64_t layer);

}  // namespace lockstep
