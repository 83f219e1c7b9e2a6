// Writes a model as a Hugging Face directory that transformers and `lockstep score` load:
//   config.json
//   model.safetensors                        when all tensors fit in one shard, else
//   model-00001-of-0000N.safetensors ...     shards of at most `max_shard_bytes` (names in sorted
//   model.safetensors.index.json             order), and the index {"metadata": {"total_size"},
//                                            "weight_map": {name: file}}
//   tokenizer files                          copied from `tokenizer_dir` when given
// The directory is written under DIR.tmp and renamed into place, so a reader never sees half of it.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include "core/tensor.h"

namespace lockstep {

constexpr int64_t kHfShardBytes = 5'000'000'000;  // transformers' default max_shard_size ("5GB")

// The tokenizer files copied when present (tokenizer.json is the one lockstep reads).
const char* const kHfTokenizerFiles[] = {
    "tokenizer.json",    "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json"};

// store_as: each tensor stored in that dtype, converted as it is written (one converted tensor
// on the host at a time); unset: as given.
void write_hf_model(const std::string& dir, const std::map<std::string, Tensor>& tensors,
                    const std::string& config_json, const std::string& tokenizer_dir = "",
                    int64_t max_shard_bytes = kHfShardBytes, std::optional<DType> store_as = std::nullopt);

}  // namespace lockstep
