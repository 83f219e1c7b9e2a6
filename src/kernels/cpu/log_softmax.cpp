#include "kernels/cpu/log_softmax.h"

#include <cmath>
#include <limits>

#include "core/thread_pool.h"

namespace lockstep::cpu {

MaxSum chunk_maxsum(const float* x, int64_t n) {
  if (n <= 0) return {-std::numeric_limits<float>::infinity(), 0.0f};
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
  return {m, s};
}

MaxSum vocab_subtree(const float* logits, int64_t V_local, int64_t chunk_len, int num_chunks) {
  MaxSum parts[kTMax];
  for (int c = 0; c < num_chunks; ++c) {
    int64_t begin = c * chunk_len;
    int64_t len = std::min(chunk_len, std::max<int64_t>(0, V_local - begin));
    parts[c] = chunk_maxsum(logits + begin, len);
  }
  return pairwise_tree_maxsum(parts, num_chunks);
}

float log_normalizer(const float* logits, int64_t V) {
  MaxSum ms = vocab_subtree(logits, V, canonical_chunk(V), kTMax);
  return ms.max + std::log(ms.sum);
}

void log_softmax_gather(const float* logits, const int32_t* targets, float* out, int64_t T, int64_t V) {
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) out[t] = logits[t * V + targets[t]] - log_normalizer(logits + t * V, V);
  });
}

void log_softmax(const float* logits, float* out, int64_t T, int64_t V) {
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float z = log_normalizer(logits + t * V, V);
      for (int64_t v = 0; v < V; ++v) out[t * V + v] = logits[t * V + v] - z;
    }
  });
}

}  // namespace lockstep::cpu
