#include "kernels/cpu/linear_backward.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/canonical.h"

namespace lockstep::cpu {

void linear_weight_grad_subtree(const float* dy, const float* x, float* dW, int64_t N, int64_t K,
                                const int64_t* chunk_rows, int num_chunks) {
  LS_CHECK(num_chunks >= 1 && num_chunks <= kTMax && is_power_of_two(num_chunks),
           "linear_weight_grad: num_chunks must be a power of two <= 8, got ", num_chunks);
  // Parallel over rows n of dW; each row's sums run in one thread in a fixed order.
  cpu_pool().parallel_for(N, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * 8)), [&](int64_t b, int64_t e) {
    std::vector<float> partial(size_t(num_chunks) * K);
    float parts[kTMax];
    for (int64_t n = b; n < e; ++n) {
      std::fill(partial.begin(), partial.end(), 0.0f);
      for (int c = 0; c < num_chunks; ++c) {
        float* acc = partial.data() + size_t(c) * K;
        for (int64_t r = chunk_rows[c]; r < chunk_rows[c + 1]; ++r) {
          const float g = dy[r * N + n];
          const float* xr = x + r * K;
          for (int64_t k = 0; k < K; ++k) acc[k] += g * xr[k];
        }
      }
      float* out = dW + n * K;
      for (int64_t k = 0; k < K; ++k) {
        for (int c = 0; c < num_chunks; ++c) parts[c] = partial[size_t(c) * K + k];
        out[k] = pairwise_tree(parts, num_chunks);
      }
    }
  });
}

void linear_weight_grad(const float* dy, const float* x, float* dW, int64_t N, int64_t K, const TokenChunks& chunks) {
  linear_weight_grad_subtree(dy, x, dW, N, K, chunks.rows, kTMax);
}

void linear_input_grad_canonical(const float* dy, const float* w, float* dx, int64_t T, int64_t N_local, int64_t K,
                                 int64_t chunk_len, int num_chunks) {
  LS_CHECK(num_chunks >= 1 && num_chunks <= kTMax && is_power_of_two(num_chunks),
           "linear_input_grad: num_chunks must be a power of two <= 8, got ", num_chunks);
  // Parallel over tokens; each dx row is one thread's fixed-order sum.
  cpu_pool().parallel_for(T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N_local * K)), [&](int64_t b,
                                                                                                   int64_t e) {
    std::vector<float> partial(size_t(num_chunks) * K);
    float parts[kTMax];
    for (int64_t t = b; t < e; ++t) {
      std::fill(partial.begin(), partial.end(), 0.0f);
      const float* g = dy + t * N_local;
      for (int c = 0; c < num_chunks; ++c) {
        float* acc = partial.data() + size_t(c) * K;
        int64_t n0 = std::min(N_local, c * chunk_len), n1 = std::min(N_local, (c + 1) * chunk_len);
        for (int64_t n = n0; n < n1; ++n) {
          const float gn = g[n];
          const float* wr = w + n * K;
          for (int64_t k = 0; k < K; ++k) acc[k] += gn * wr[k];
        }
      }
      float* out = dx + t * K;
      for (int64_t k = 0; k < K; ++k) {
        for (int c = 0; c < num_chunks; ++c) parts[c] = partial[size_t(c) * K + k];
        out[k] = pairwise_tree(parts, num_chunks);
      }
    }
  });
}

void linear_input_grad(const float* dy, const float* w, float* dx, int64_t T, int64_t N, int64_t K) {
  linear_input_grad_canonical(dy, w, dx, T, N, K, canonical_chunk(N), kTMax);
}

}  // namespace lockstep::cpu
