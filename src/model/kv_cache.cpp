#include "model/kv_cache.h"

namespace lockstep {

KvCache::KvCache(const ModelConfig& config, int64_t num_pages, int64_t page_size)
    : num_pages_(num_pages),
      page_size_(page_size),
      kv_heads_(config.num_key_value_heads),
      head_dim_(config.head_dim) {
  size_t n = size_t(num_pages * page_size * kv_heads_ * head_dim_);
  k_.assign(config.num_hidden_layers, std::vector<float>(n, 0.0f));
  v_.assign(config.num_hidden_layers, std::vector<float>(n, 0.0f));
}

PagedKvLayer KvCache::layer(int64_t l) {
  return PagedKvLayer{k_[l].data(), v_[l].data(), num_pages_, page_size_, kv_heads_, head_dim_};
}

int64_t KvCache::page_bytes(const ModelConfig& config, int64_t page_size) {
  return 2 * config.num_hidden_layers * page_size * config.kv_dim() * int64_t(sizeof(float));
}

}  // namespace lockstep
