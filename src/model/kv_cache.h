// KV cache storage: per layer, a pool of fixed-size pages. Which pages a sequence uses is
// decided by the owner (the rollout engine's block allocator, or the trainer, which gives
// each sequence a contiguous run); attention reads through the same layout either way.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/cpu/attention.h"
#include "model/config.h"

namespace lockstep {

class KvCache {
 public:
  KvCache() = default;
  KvCache(const ModelConfig& config, int64_t num_pages, int64_t page_size);

  PagedKvLayer layer(int64_t l);
  int64_t num_pages() const { return num_pages_; }
  int64_t page_size() const { return page_size_; }
  // Bytes of one page across all layers (K and V).
  static int64_t page_bytes(const ModelConfig& config, int64_t page_size);

 private:
  int64_t num_pages_ = 0, page_size_ = 0, kv_heads_ = 0, head_dim_ = 0;
  std::vector<std::vector<float>> k_, v_;
};

}  // namespace lockstep
