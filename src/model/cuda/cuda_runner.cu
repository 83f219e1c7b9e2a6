#include "model/cuda/cuda_runner.h"
#include "model/cuda/cuda_runner_impl.h"

namespace lockstep {

using cuda_model::CudaRunner;
using cuda_model::decode_shape_of;

bool one_launch_decode_supported(const ModelConfig& config, std::string* why) {
  for (int64_t l = 0; l < config.num_hidden_layers; ++l)
    if (!config.is_moe_layer(l)) {
      if (why) *why = "every layer must be MoE";
      return false;
    }
  return cuda::decode_layers_supported(decode_shape_of(config), why);
}

std::unique_ptr<ModelRunner> make_cuda_runner(const ModelWeights& weights, Precision precision) {
  LS_CHECK(precision == Precision::bfloat16,
           "--device cuda runs the bfloat16 recipe only (use --dtype bfloat16), got --dtype ",
           precision_name(precision));
  auto runner = std::make_unique<CudaRunner>(weights.config);
  runner->load_weights(weights);
  return runner;
}

std::unique_ptr<ModelRunner> make_cuda_runner_random(const ModelConfig& config, uint64_t seed) {
  auto runner = std::make_unique<CudaRunner>(config);
  runner->randomize(seed);
  return runner;
}

std::unique_ptr<ModelRunner> make_runner(Device device, ModelWeights weights, Precision precision) {
  if (device == Device::cpu) return make_cpu_runner(std::move(weights), precision);
  return make_cuda_runner(weights, precision);
}

std::unique_ptr<ModelRunner> make_runner_from(Device device, const ModelWeights& weights, Precision precision) {
  if (device == Device::cpu) return make_cpu_runner(weights.clone(), precision);
  return make_cuda_runner(weights, precision);
}

}  // namespace lockstep
