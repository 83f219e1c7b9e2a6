#include "kernels/cpu/elementwise_backward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/cpu/dot.h"

namespace lockstep::cpu {

void rmsnorm_backward(const float* x, const float* w, const float* dout, float* dx, float* dw, int64_t rows,
                      int64_t n, float eps, bool round_normed, const TokenChunks& chunks) {
  std::vector<float> normed(dw ? size_t(rows * n) : 0);
  cpu_pool().parallel_for(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
    std::vector<float> g(n);
    for (int64_t r = b; r < e; ++r) {
      const float* xr = x + r * n;
      const float* dr = dout + r * n;
      float inv = 1.0f / std::sqrt(dot(xr, xr, n) / float(n) + eps);  // as the forward
      for (int64_t i = 0; i < n; ++i) g[i] = w[i] * dr[i];
      float s = dot(g.data(), xr, n);
      float coef = inv * inv * inv * s / float(n);
      float* o = dx + r * n;
      for (int64_t i = 0; i < n; ++i) o[i] = inv * g[i] - xr[i] * coef;
      if (dw) {
        float* nr = normed.data() + r * n;
        for (int64_t i = 0; i < n; ++i) nr[i] = round_normed ? round_bf16(xr[i] * inv) : xr[i] * inv;
      }
    }
  });
  if (dw) column_sum_chunked(dout, normed.data(), dw, n, chunks.rows, kTMax);
}

void swiglu_backward(const float* gate, const float* up, const float* dout, float* dgate, float* dup, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    float s = 1.0f / (1.0f + std::exp(-g));
    float silu = g / (1.0f + std::exp(-g));  // the forward's expression
    dup[i] = dout[i] * silu;
    dgate[i] = dout[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
  }
}

void embedding_backward(const int32_t* ids, const float* dout, float* dtable, int64_t T, int64_t V, int64_t H) {
  embedding_backward_rows(ids, dout, dtable, T, V, 0, V, H);
}

void embedding_backward_rows(const int32_t* ids, const float* dout, float* dtable, int64_t T, int64_t V,
                             int64_t row_begin, int64_t rows, int64_t H) {
  LS_CHECK(row_begin >= 0 && rows >= 0 && row_begin + rows <= V, "embedding_backward: rows [", row_begin, ", ",
           row_begin + rows, ") outside [0, ", V, ")");
  std::memset(dtable, 0, size_t(rows * H) * sizeof(float));
  // Tokens of each id in ascending token order (counting sort), then one tree per used id;
  // a token's chunk is set by its position in all T tokens, so a slice changes no row.
  std::vector<int64_t> start(rows + 1, 0);
  auto in_slice = [&](int32_t id) { return id >= row_begin && id < row_begin + rows; };
  for (int64_t t = 0; t < T; ++t) {
    LS_CHECK(ids[t] >= 0 && ids[t] < V, "embedding_backward: token id ", ids[t], " outside [0, ", V, ")");
    if (in_slice(ids[t])) ++start[ids[t] - row_begin + 1];
  }
  for (int64_t v = 0; v < rows; ++v) start[v + 1] += start[v];
  std::vector<int32_t> tokens(start[rows]);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < T; ++t)
    if (in_slice(ids[t])) tokens[fill[ids[t] - row_begin]++] = int32_t(t);
  std::vector<int32_t> used;
  for (int64_t v = 0; v < rows; ++v)
    if (start[v + 1] > start[v]) used.push_back(int32_t(v));
  cpu_pool().parallel_for(int64_t(used.size()), 1, [&](int64_t b, int64_t e) {
    std::vector<float> partial(size_t(kTMax) * H);
    float parts[kTMax];
    for (int64_t u = b; u < e; ++u) {
      int32_t v = used[u];
      const int32_t* toks = tokens.data() + start[v];
      int64_t count = start[v + 1] - start[v];
      TokenChunks ch = token_chunks_of(toks, count, T);
      std::fill(partial.begin(), partial.end(), 0.0f);
      for (int c = 0; c < kTMax; ++c) {
        float* acc = partial.data() + size_t(c) * H;
        for (int64_t i = ch.rows[c]; i < ch.rows[c + 1]; ++i) {
          const float* d = dout + int64_t(toks[i]) * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += d[h];
        }
      }
      float* out = dtable + int64_t(v) * H;
      for (int64_t h = 0; h < H; ++h) {
        for (int c = 0; c < kTMax; ++c) parts[c] = partial[size_t(c) * H + h];
        out[h] = tree8(parts);
      }
    }
  });
}

}  // namespace lockstep::cpu
