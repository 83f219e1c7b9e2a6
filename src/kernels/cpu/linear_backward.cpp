#include "kernels/cpu/linear_backward.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/canonical.h"
#include "kernels/cpu/dot.h"

namespace lockstep::cpu {

namespace {

// Both gradients are sums of outer-product terms, out[i, k] = tree over chunks of
// (sum over the chunk's s, ascending, of g[i, s] * m[s, k]), where every element's chunk sum
// starts at 0 and adds one product per s in ascending order: the order of the plain
// per-element loop. The kernels below only tile it: a register tile of kRows outputs i by
// kVecs * 8 columns k keeps its chunk sums in registers while s runs down the chunk, so each
// m[s, k..] vector loaded feeds kRows rows; lanes are separate elements, so the tiling and
// the zero padding of a partial vector change no bit.
constexpr int kRows = 4;
constexpr int kVecs = 4;
constexpr int64_t kStrip = kVecs * 8;  // columns per register tile

inline v8f load_cols(const float* p, int64_t n) { return n >= 8 ? load8(p) : load_partial(p, n); }

inline void store_cols(float* p, v8f v, int64_t n) {
  float tmp[8];
  std::memcpy(tmp, &v, 32);
  std::copy(tmp, tmp + std::min<int64_t>(n, 8), p);
}

// sums[c][r][0..width) for rows r < R and chunks c: sum over s in [bounds[c], bounds[c + 1]) of
// g[r * g_row + s * g_col] * m[s * ldm + k0 + j], j < width <= kStrip.
template <int R>
void chunk_sums(const float* g, int64_t g_row, int64_t g_col, const float* m, int64_t ldm, int64_t k0, int64_t width,
                const int64_t* bounds, int num_chunks, float (*sums)[kRows][kStrip]) {
  for (int c = 0; c < num_chunks; ++c) {
    v8f acc[R][kVecs];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v) acc[r][v] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
    if (width == kStrip) {
      for (int64_t s = bounds[c]; s < bounds[c + 1]; ++s) {
        const float* ms = m + s * ldm + k0;
        v8f mv[kVecs];
        for (int v = 0; v < kVecs; ++v) {
          mv[v] = load8(ms + v * 8);
          LS_KEEP_IN_REGISTER(mv[v]);
        }
        for (int r = 0; r < R; ++r) {
          const float gv = g[r * g_row + s * g_col];
          const v8f gb = {gv, gv, gv, gv, gv, gv, gv, gv};
          for (int v = 0; v < kVecs; ++v) acc[r][v] += gb * mv[v];
        }
      }
    } else {
      for (int64_t s = bounds[c]; s < bounds[c + 1]; ++s) {
        const float* ms = m + s * ldm + k0;
        for (int r = 0; r < R; ++r) {
          const float gv = g[r * g_row + s * g_col];
          const v8f gb = {gv, gv, gv, gv, gv, gv, gv, gv};
          for (int v = 0; v * 8 < width; ++v) acc[r][v] += gb * load_cols(ms + v * 8, width - v * 8);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < kVecs; ++v) std::memcpy(&sums[c][r][v * 8], &acc[r][v], 32);
  }
}

using ChunkSumsFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, const int64_t*,
                             int, float (*)[kRows][kStrip]);
constexpr ChunkSumsFn kChunkSums[kRows] = {&chunk_sums<1>, &chunk_sums<2>, &chunk_sums<3>, &chunk_sums<4>};

// out[i * K + k] for i in [i0, i1) and all k: the tree over the chunks of chunk_sums, with
// output row i's factors at g + i * g_row. Rows are taken kRows at a time within blocks of
// kBlockRows, columns a strip at a time, so the strip of m stays in cache for the block.
void outer_sum_rows(const float* g, int64_t g_row, int64_t g_col, const float* m, int64_t K, const int64_t* bounds,
                    int num_chunks, float* out, int64_t i0, int64_t i1) {
  constexpr int64_t kBlockRows = 32;
  float sums[kTMax][kRows][kStrip];
  v8f parts[kTMax];
  for (int64_t b0 = i0; b0 < i1; b0 += kBlockRows) {
    const int64_t b1 = std::min(i1, b0 + kBlockRows);
    for (int64_t k0 = 0; k0 < K; k0 += kStrip) {
      const int64_t width = std::min(kStrip, K - k0);
      for (int64_t i = b0; i < b1; i += kRows) {
        const int rows = int(std::min<int64_t>(kRows, b1 - i));
        kChunkSums[rows - 1](g + i * g_row, g_row, g_col, m, K, k0, width, bounds, num_chunks, sums);
        // The chunk tree, 8 columns at a time (lane-wise, so each element's tree is unchanged).
        for (int r = 0; r < rows; ++r) {
          float* o = out + (i + r) * K + k0;
          for (int64_t j = 0; j < width; j += 8) {
            for (int c = 0; c < num_chunks; ++c) parts[c] = load8(&sums[c][r][j]);
            store_cols(o + j, pairwise_tree(parts, num_chunks), width - j);
          }
        }
      }
    }
  }
}

}  // namespace

void linear_weight_grad_subtree(const float* dy, const float* x, float* dW, int64_t N, int64_t K,
                                const int64_t* chunk_rows, int num_chunks) {
  LS_CHECK(num_chunks >= 1 && num_chunks <= kTMax && is_power_of_two(num_chunks),
           "linear_weight_grad: num_chunks must be a power of two <= 8, got ", num_chunks);
  // dW[n, k] = tree over token chunks of sum over rows r of dy[r, n] * x[r, k]: output rows
  // are n (factor dy[r * N + n]), the summed index is the token row r.
  const int64_t rows = chunk_rows[num_chunks] - chunk_rows[0];
  const int64_t work = std::max<int64_t>(1, rows * K);
  cpu_pool().parallel_for((N + kRows - 1) / kRows, std::max<int64_t>(1, 65536 / (work * kRows)),
                          [&](int64_t b, int64_t e) {
                            outer_sum_rows(dy, 1, N, x, K, chunk_rows, num_chunks, dW, b * kRows,
                                           std::min(N, e * kRows));
                          });
}

void linear_weight_grad(const float* dy, const float* x, float* dW, int64_t N, int64_t K, const TokenChunks& chunks) {
  linear_weight_grad_subtree(dy, x, dW, N, K, chunks.rows, kTMax);
}

void linear_input_grad_canonical(const float* dy, const float* w, float* dx, int64_t T, int64_t N_local, int64_t K,
                                 int64_t chunk_len, int num_chunks) {
  LS_CHECK(num_chunks >= 1 && num_chunks <= kTMax && is_power_of_two(num_chunks),
           "linear_input_grad: num_chunks must be a power of two <= 8, got ", num_chunks);
  // dx[t, k] = tree over N chunks of sum over n of dy[t, n] * W[n, k]: output rows are tokens
  // t (factor dy[t * N_local + n]), the summed index is n. Each W row loaded feeds kRows
  // tokens, so W is walked once per token tile instead of once per token.
  int64_t bounds[kTMax + 1];
  for (int c = 0; c <= num_chunks; ++c) bounds[c] = std::min(N_local, c * chunk_len);
  const int64_t work = std::max<int64_t>(1, N_local * K);
  cpu_pool().parallel_for((T + kRows - 1) / kRows, std::max<int64_t>(1, 65536 / (work * kRows)),
                          [&](int64_t b, int64_t e) {
                            outer_sum_rows(dy, N_local, 1, w, K, bounds, num_chunks, dx, b * kRows,
                                           std::min(T, e * kRows));
                          });
}

void linear_input_grad(const float* dy, const float* w, float* dx, int64_t T, int64_t N, int64_t K) {
  linear_input_grad_canonical(dy, w, dx, T, N, K, canonical_chunk(N), kTMax);
}

}  // namespace lockstep::cpu
