#include "kernels/cpu/linear.h"

#include <algorithm>

#include "core/thread_pool.h"
#include "kernels/canonical.h"
#include "kernels/cpu/dot.h"

namespace lockstep::cpu {

namespace {

constexpr int kTileT = 4;
constexpr int kTileN = 4;

// y[t, n] for t in [0, T), n in [n0, n1): dot over columns [k0, k0 + len) of x and w.
// Results go to out[t * out_stride + n - out_n0].
void dot_block(const float* x, const float* w, float* out, int64_t T, int64_t n0, int64_t n1, int64_t ldk,
               int64_t k0, int64_t len, int64_t out_stride, int64_t out_n0) {
  int64_t n = n0;
  for (; n + kTileN <= n1; n += kTileN) {
    const float* b[kTileN];
    for (int c = 0; c < kTileN; ++c) b[c] = w + (n + c) * ldk + k0;
    int64_t t = 0;
    for (; t + kTileT <= T; t += kTileT) {
      const float* a[kTileT];
      for (int r = 0; r < kTileT; ++r) a[r] = x + (t + r) * ldk + k0;
      float tile[kTileT][kTileN];
      dot_tile<kTileT, kTileN>(a, b, len, tile);
      for (int r = 0; r < kTileT; ++r)
        for (int c = 0; c < kTileN; ++c) out[(t + r) * out_stride + n + c - out_n0] = tile[r][c];
    }
    for (; t < T; ++t) {
      const float* a[1] = {x + t * ldk + k0};
      float tile[1][kTileN];
      dot_tile<1, kTileN>(a, b, len, tile);
      for (int c = 0; c < kTileN; ++c) out[t * out_stride + n + c - out_n0] = tile[0][c];
    }
  }
  for (; n < n1; ++n)
    for (int64_t t = 0; t < T; ++t) out[t * out_stride + n - out_n0] = dot(x + t * ldk + k0, w + n * ldk + k0, len);
}

int64_t grain_for(int64_t T, int64_t K) {
  // Enough outputs per task to amortise the fork (~64k multiply-adds).
  return std::max<int64_t>(kTileN, (65536 / std::max<int64_t>(1, T * K)) * kTileN);
}

}  // namespace

void linear(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
  cpu_pool().parallel_for((N + kTileN - 1) / kTileN, grain_for(T, K) / kTileN, [&](int64_t b, int64_t e) {
    dot_block(x, w, y, T, b * kTileN, std::min(N, e * kTileN), K, 0, K, N, 0);
  });
}

void linear_row_canonical(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K,
                          int64_t chunk_len, int num_chunks) {
  cpu_pool().parallel_for((N + kTileN - 1) / kTileN, grain_for(T, K) / kTileN, [&](int64_t b, int64_t e) {
    int64_t n0 = b * kTileN, n1 = std::min(N, e * kTileN), width = n1 - n0;
    // partials[chunk][t][n - n0]
    std::vector<float> partials(size_t(num_chunks) * T * width, 0.0f);
    for (int c = 0; c < num_chunks; ++c) {
      int64_t k0 = c * chunk_len;
      int64_t len = std::clamp<int64_t>(K - k0, 0, chunk_len);
      float* p = partials.data() + size_t(c) * T * width;
      if (len > 0) dot_block(x, w, p, T, n0, n1, K, k0, len, width, n0);
    }
    float chunk[kTMax];
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < width; ++n) {
        for (int c = 0; c < num_chunks; ++c) chunk[c] = partials[(size_t(c) * T + t) * width + n];
        y[t * N + n0 + n] = pairwise_tree(chunk, num_chunks);
      }
  });
}

void linear_row(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
  linear_row_canonical(x, w, y, T, N, K, canonical_chunk(K), kTMax);
}

}  // namespace lockstep::cpu
