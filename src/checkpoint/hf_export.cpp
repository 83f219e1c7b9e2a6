#include "checkpoint/hf_export.h"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/text_file.h"

namespace lockstep {

namespace fs = std::filesystem;

namespace {

void write_text(const fs::path& path, const std::string& text) { write_text_file(path.string(), text); }

}  // namespace

void write_hf_model(const std::string& dir, const std::map<std::string, Tensor>& tensors,
                    const std::string& config_json, const std::string& tokenizer_dir, int64_t max_shard_bytes,
                    std::optional<DType> store_as) {
  LS_CHECK(max_shard_bytes > 0, "write_hf_model: max_shard_bytes must be > 0");
  const fs::path final_dir = dir, tmp = dir + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  // Shards in sorted name order; a tensor larger than the limit gets a shard of its own.
  std::vector<std::map<std::string, Tensor>> shards(1);
  int64_t shard_bytes = 0, total_bytes = 0;
  for (const auto& [name, t] : tensors) {
    const int64_t bytes = t.numel() * int64_t(dtype_size(store_as.value_or(t.dtype())));
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) shards.emplace_back(), shard_bytes = 0;
    shards.back()[name] = t;
    shard_bytes += bytes;
    total_bytes += bytes;
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (shards.size() == 1) {
    write_safetensors((tmp / "model.safetensors").string(), shards[0], metadata, store_as);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
      write_safetensors((tmp / name).string(), shards[i], metadata, store_as);
      for (const auto& [tensor, t] : shards[i]) weight_map[tensor] = name;
    }
    const nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
    write_text(tmp / "model.safetensors.index.json", index.dump(2) + "\n");
  }
  write_text(tmp / "config.json", config_json);
  if (!tokenizer_dir.empty())
    for (const char* f : kHfTokenizerFiles)
      if (fs::is_regular_file(fs::path(tokenizer_dir) / f)) fs::copy_file(fs::path(tokenizer_dir) / f, tmp / f);
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
}

}  // namespace lockstep
