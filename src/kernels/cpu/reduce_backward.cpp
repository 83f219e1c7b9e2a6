#include "kernels/cpu/reduce_backward.h"

#include <algorithm>

#include "core/error.h"
#include "core/thread_pool.h"

namespace lockstep::cpu {

TokenChunks token_chunks(int64_t T, int64_t rows_per_token) {
  TokenChunks c;
  const int64_t len = canonical_chunk(T);
  for (int i = 0; i <= kTMax; ++i) c.rows[i] = std::min<int64_t>(T, i * len) * rows_per_token;
  return c;
}

TokenChunks token_chunks_of(const int32_t* token_index, int64_t rows, int64_t T) {
  TokenChunks c;
  const int64_t len = canonical_chunk(T);
  for (int i = 0; i <= kTMax; ++i) {
    int64_t first_token = std::min<int64_t>(T, i * len);
    c.rows[i] = std::lower_bound(token_index, token_index + rows, first_token) - token_index;
  }
  return c;
}

void column_sum_chunked(const float* a, const float* b, float* out, int64_t n, const int64_t* chunk_rows,
                        int num_chunks) {
  LS_CHECK(num_chunks >= 1 && num_chunks <= kTMax && is_power_of_two(num_chunks),
           "column_sum_chunked: num_chunks must be a power of two <= 8, got ", num_chunks);
  cpu_pool().parallel_for(n, 256, [&](int64_t begin, int64_t end) {
    const int64_t w = end - begin;
    std::vector<float> partial(size_t(num_chunks) * w, 0.0f);
    for (int c = 0; c < num_chunks; ++c) {
      float* acc = partial.data() + size_t(c) * w;
      for (int64_t r = chunk_rows[c]; r < chunk_rows[c + 1]; ++r) {
        const float* ar = a + r * n + begin;
        if (b) {
          const float* br = b + r * n + begin;
          for (int64_t i = 0; i < w; ++i) acc[i] += ar[i] * br[i];
        } else {
          for (int64_t i = 0; i < w; ++i) acc[i] += ar[i];
        }
      }
    }
    float parts[kTMax];
    for (int64_t i = 0; i < w; ++i) {
      for (int c = 0; c < num_chunks; ++c) parts[c] = partial[size_t(c) * w + i];
      out[begin + i] = pairwise_tree(parts, num_chunks);
    }
  });
}

}  // namespace lockstep::cpu
