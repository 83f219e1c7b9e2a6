#include "rl/hf_snapshot.h"

#include <map>
#include <nlohmann/json.hpp>

#include "checkpoint/hf_export.h"
#include "rl/train_checkpoint.h"

namespace lockstep::rl {

void write_hf_weights(const std::string& dir, const ModelWeights& weights, Precision precision,
                      const std::string& tokenizer_dir, int64_t max_shard_bytes) {
  std::map<std::string, Tensor> tensors;
  const bool bf16 = precision == Precision::bfloat16;
  for (const auto& [name, t] : weights.named()) tensors[name] = *t;  // views, converted as written
  nlohmann::json config = weights.config.to_json();
  config["torch_dtype"] = bf16 ? "bfloat16" : "float32";
  write_hf_model(dir, tensors, config.dump(2) + "\n", tokenizer_dir, max_shard_bytes, bf16 ? DType::bf16 : DType::f32);
}

std::string save_hf_snapshot(const std::string& save_hf_dir, int64_t step, const ModelWeights& weights,
                             Precision precision, const std::string& tokenizer_dir, int64_t max_shard_bytes) {
  const std::string dir = checkpoint_dir(save_hf_dir, step);
  write_hf_weights(dir, weights, precision, tokenizer_dir, max_shard_bytes);
  return dir;
}

}  // namespace lockstep::rl
