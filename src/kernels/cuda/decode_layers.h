// The decoder layers of a one-token step in one launch (decode at batch 1).
//
// A step of one token is a chain of small dependent ops: per layer two RMSNorms, four weight
// GEMMs, q/k norm + RoPE, attention, routing and the expert combine. As separate kernels each
// costs a fixed few microseconds (launch, wait, first loads, drain) whatever its bytes, so at
// batch 1 the step was a chain of latencies, not a stream of weights (notes/cuda-perf.md v4-v9).
// Here one persistent CTA per SM runs every layer: a producer warp streams the CTA's share of
// each weight matrix through a ring of shared-memory stages (bulk copies on mbarriers) in the
// order the CTA will use it, running ahead across phases and layers (only the expert weights
// wait for the routing), while eight consumer warps compute; phases that need the whole
// previous result are separated by a grid barrier.
//
// Every value has the bits of the per-op kernels: each output element is the same chain of
// mma.sync k16 steps in ascending k (the row form's 8 chunks folded by the same tree), and the
// norms, the RoPE, the attention, the routing and the combine call the same device procedures
// (row_ops.cuh, attention_tile.cuh). The GPU tests compare the two paths' log-probs bit for bit.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernels/cuda/ops.h"

namespace lockstep::cuda {

// One MoE layer's device weights (the runner's layouts) and KV cache.
struct DecodeLayerWeights {
  const bf16_t* qkv = nullptr;      // [(nq + 2 nkv) D, H]
  const bf16_t* o = nullptr;        // [H, nq D]
  const bf16_t* router = nullptr;   // [E, H]
  const bf16_t* gate_up = nullptr;  // [E, 2I, H]
  const bf16_t* down = nullptr;     // [E, H, I]
  const float *input_norm = nullptr, *post_norm = nullptr, *q_norm = nullptr, *k_norm = nullptr;
  DeviceKvLayer kv;
};

struct DecodeShape {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, experts = 0, experts_per_token = 0, intermediate = 0;
};

struct DecodeLayersArgs {
  const DecodeLayerWeights* layers = nullptr;  // device array of num_layers
  int num_layers = 0;
  DecodeShape shape;
  bool normalize_topk = true;
  float eps = 0.0f, scale = 0.0f;
  const float *rope_cos = nullptr, *rope_sin = nullptr;
  DeviceSlots slots;    // a step of one token
  bf16_t* x = nullptr;  // [H]: the embedding in, the last layer's output out
  // Scratch (device): [H], [(nq + 2 nkv) D], [nq D], [nq D], [k, 2I], [k, H], [E] floats.
  bf16_t *x_mid = nullptr, *qkv = nullptr, *q = nullptr, *attn = nullptr, *gu = nullptr, *y = nullptr;
  float* router_logits = nullptr;
  uint32_t* barrier = nullptr;  // one counter (device), zeroed by decode_layers before the launch
};

// Whether decode_layers takes this shape (otherwise the per-op kernels run the step); `why`
// gets the reason when not.
bool decode_layers_supported(const DecodeShape& shape, std::string* why = nullptr);
void decode_layers(const DecodeLayersArgs& args, cudaStream_t stream);

// Diagnostics (cuda_bench --trace): while on, every launch records the time each CTA reaches
// each point of each layer (%globaltimer, thread 0); the report gives the mean time per
// interval over the middle layers for a few CTAs, from the last launch.
void decode_layers_trace(bool on);
std::string decode_layers_trace_report();

}  // namespace lockstep::cuda
