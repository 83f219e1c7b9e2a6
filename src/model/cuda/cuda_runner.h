// The CUDA ModelRunner: bf16 weights and KV cache in device memory, the forward of the
// bfloat16 recipe on the GPU (src/kernels/cuda), sampling on the device.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "model/runner.h"

namespace lockstep {

// Uploads `weights` (bf16 values in fp32 containers) to the current CUDA device. Only the
// bfloat16 recipe runs on the GPU.
std::unique_ptr<ModelRunner> make_cuda_runner(const ModelWeights& weights, Precision precision);
// Random bf16 weights generated on the device (benchmarks: the full model never touches the
// host). Deterministic in `seed`.
std::unique_ptr<ModelRunner> make_cuda_runner_random(const ModelConfig& config, uint64_t seed);
// Whether steps of one token can run every layer in one launch (kernels/cuda/decode_layers.h;
// the runner then does, unless LOCKSTEP_ONE_LAUNCH_DECODE=0); `why` gets the reason when not.
bool one_launch_decode_supported(const ModelConfig& config, std::string* why = nullptr);

}  // namespace lockstep

