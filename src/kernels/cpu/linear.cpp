#include "kernels/cpu/linear.h"

#include <algorithm>
#include <cstring>

#include "core/thread_pool.h"
#include "kernels/canonical.h"
#include "kernels/cpu/dot.h"

namespace lockstep::cpu {

namespace {

// Every output is dot() of its own row of x and row of w; the blocking below only decides
// which outputs share loads and when, never the order of any lane's sum (the lane
// accumulators are carried across K blocks in memory).
constexpr int kTileT = 4;        // tokens per register tile
constexpr int kTileN = 4;        // outputs per register tile (4 x 4 v8f accumulators)
constexpr int64_t kBlockT = 64;  // tokens per block
constexpr int64_t kPanelN = 16;  // outputs per panel
constexpr int64_t kBlockK = 256; // columns per K block: a panel's W block and a tile's x rows stay in L1

using StepsFn = void (*)(const float* const*, const float* const*, int64_t, int64_t, v8f*);
using PackedFn = void (*)(const float* const*, int64_t, const float*, int64_t, v8f*);
using TailFn = void (*)(const float* const*, const float* const*, int64_t, int64_t, v8f*);

// Function tables over the tile shape [rows - 1][cols - 1]; index [1] starts from zero.
template <int R, bool kInit>
constexpr StepsFn kStepsRow[kTileN] = {&dot_tile_steps<R, 1, kInit>, &dot_tile_steps<R, 2, kInit>,
                                       &dot_tile_steps<R, 3, kInit>, &dot_tile_steps<R, 4, kInit>};
template <bool kInit>
constexpr const StepsFn* kStepsTable[kTileT] = {kStepsRow<1, kInit>, kStepsRow<2, kInit>, kStepsRow<3, kInit>,
                                                kStepsRow<4, kInit>};
constexpr const StepsFn* const* kSteps[2] = {kStepsTable<false>, kStepsTable<true>};
template <int R, bool kInit>
constexpr PackedFn kPackedRow[kTileN] = {&dot_tile_steps_packed<R, 1, kInit>, &dot_tile_steps_packed<R, 2, kInit>,
                                         &dot_tile_steps_packed<R, 3, kInit>, &dot_tile_steps_packed<R, 4, kInit>};
template <bool kInit>
constexpr const PackedFn* kPackedTable[kTileT] = {kPackedRow<1, kInit>, kPackedRow<2, kInit>, kPackedRow<3, kInit>,
                                                  kPackedRow<4, kInit>};
constexpr const PackedFn* const* kPacked[2] = {kPackedTable<false>, kPackedTable<true>};
template <int R>
constexpr TailFn kTailRow[kTileN] = {&dot_tile_tail<R, 1>, &dot_tile_tail<R, 2>, &dot_tile_tail<R, 3>,
                                     &dot_tile_tail<R, 4>};
constexpr const TailFn* kTail[kTileT] = {kTailRow<1>, kTailRow<2>, kTailRow<3>, kTailRow<4>};

// out[(t - t0) * ldo + (n - n0)] = dot(x[t] + k0, w[n] + k0, len) for t in [t0, t1) and n in
// [n0, n1), at most kBlockT x kPanelN outputs; x and w rows are ldk apart.
void dot_panel(const float* x, const float* w, int64_t ldk, int64_t t0, int64_t t1, int64_t n0, int64_t n1,
               int64_t k0, int64_t len, float* out, int64_t ldo) {
  constexpr int kTileSize = kTileT * kTileN;
  v8f acc[kBlockT * kPanelN];
  const int64_t tiles_n = (n1 - n0 + kTileN - 1) / kTileN;
  const int64_t tiles = (t1 - t0 + kTileT - 1) / kTileT * tiles_n;
  const int64_t full = len / 8 * 8, rem = len % 8;
  // The first K block starts the accumulators at zero; only a dot shorter than 8 needs them
  // zeroed here.
  if (full == 0)
    for (int64_t i = 0; i < tiles * kTileSize; ++i) acc[i] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  auto for_tiles = [&](auto&& fn) {
    const float* a[kTileT];
    const float* b[kTileN];
    int64_t tile = 0;
    for (int64_t t = t0; t < t1; t += kTileT) {
      const int rows = int(std::min<int64_t>(kTileT, t1 - t));
      for (int r = 0; r < rows; ++r) a[r] = x + (t + r) * ldk + k0;
      for (int64_t n = n0, j = 0; n < n1; n += kTileN, ++j, ++tile) {
        const int cols = int(std::min<int64_t>(kTileN, n1 - n));
        for (int c = 0; c < cols; ++c) b[c] = w + (n + c) * ldk + k0;
        fn(t, n, j, rows, cols, a, b, acc + tile * kTileSize);
      }
    }
  };
  // Packing pays only when several token tiles reuse a W block of some length; one token
  // tile streams each W row once over all of K, short dots run straight from the rows.
  const bool pack = t1 - t0 > 2 * kTileT && full >= 128;
  if (!pack) {
    const int64_t block_k = t1 - t0 <= kTileT ? full : kBlockK;
    for (int64_t kb = 0; kb < full; kb += block_k) {
      const int64_t ke = std::min(full, kb + block_k);
      for_tiles([&](int64_t, int64_t, int64_t, int rows, int cols, const float* const* a, const float* const* b,
                    v8f* tile_acc) { kSteps[kb == 0][rows - 1][cols - 1](a, b, kb, ke, tile_acc); });
    }
  } else {
    // Block K; pack the panel's W block so that every token tile reuses it from L1.
    alignas(64) float packed[kPanelN * kBlockK];
    for (int64_t kb = 0; kb < full; kb += kBlockK) {
      const int64_t steps = (std::min(full, kb + kBlockK) - kb) / 8;
      for (int64_t n = n0; n < n1; n += kTileN) {
        const int cols = int(std::min<int64_t>(kTileN, n1 - n));
        float* dst = packed + (n - n0) * kBlockK;
        for (int64_t i = 0; i < steps; ++i)
          for (int c = 0; c < cols; ++c)
            std::memcpy(dst + (i * cols + c) * 8, w + (n + c) * ldk + k0 + kb + i * 8, 32);
      }
      // While the tiles compute, ask for the next W block (one slice per tile), so that the
      // next packing does not wait on memory.
      const int64_t next = kb + kBlockK, next_len = std::min(full, next + kBlockK) - next;
      const int64_t lines_per_row = next_len > 0 ? (next_len + 15) / 16 : 0, lines = lines_per_row * (n1 - n0);
      const int64_t per_tile = (lines + tiles - 1) / tiles;
      int64_t line = 0;
      for_tiles([&](int64_t, int64_t, int64_t j, int rows, int cols, const float* const* a, const float* const*,
                    v8f* tile_acc) {
        for (int64_t e = std::min(lines, line + per_tile); line < e; ++line)
          __builtin_prefetch(w + (n0 + line / lines_per_row) * ldk + k0 + next + (line % lines_per_row) * 16, 0, 2);
        kPacked[kb == 0][rows - 1][cols - 1](a, kb, packed + j * kTileN * kBlockK, steps, tile_acc);
      });
    }
  }
  if (rem > 0)
    for_tiles([&](int64_t, int64_t, int64_t, int rows, int cols, const float* const* a, const float* const* b,
                  v8f* tile_acc) { kTail[rows - 1][cols - 1](a, b, full, rem, tile_acc); });
  for_tiles([&](int64_t t, int64_t n, int64_t, int rows, int cols, const float* const*, const float* const*,
                v8f* tile_acc) {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c) out[(t - t0 + r) * ldo + n - n0 + c] = reduce_lanes(tile_acc[r * cols + c]);
  });
}

// Work items are (N panel, T block) pairs, panel-major, so a thread's contiguous range reads
// each W panel once. Enough items per task to amortise the fork (~64k multiply-adds).
struct Items {
  int64_t t_blocks, panels, grain;
};

Items items_for(int64_t T, int64_t N, int64_t K) {
  Items it;
  it.t_blocks = (T + kBlockT - 1) / kBlockT;
  it.panels = (N + kPanelN - 1) / kPanelN;
  const int64_t work = std::max<int64_t>(1, std::min(T, kBlockT) * kPanelN * K);
  it.grain = std::max<int64_t>(1, 65536 / work);
  return it;
}

void linear_items(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K, const Items& it,
                  int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const int64_t n0 = (i / it.t_blocks) * kPanelN, t0 = (i % it.t_blocks) * kBlockT;
    const int64_t n1 = std::min(N, n0 + kPanelN), t1 = std::min(T, t0 + kBlockT);
    dot_panel(x, w, K, t0, t1, n0, n1, 0, K, y + t0 * N + n0, N);
  }
}

void linear_row_items(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K, int64_t chunk_len,
                      int num_chunks, const Items& it, int64_t b, int64_t e) {
  float partials[kTMax][kBlockT * kPanelN];
  float chunk[kTMax];
  for (int64_t i = b; i < e; ++i) {
    const int64_t n0 = (i / it.t_blocks) * kPanelN, t0 = (i % it.t_blocks) * kBlockT;
    const int64_t n1 = std::min(N, n0 + kPanelN), t1 = std::min(T, t0 + kBlockT);
    const int64_t width = n1 - n0;
    for (int c = 0; c < num_chunks; ++c) {
      const int64_t k0 = c * chunk_len;
      const int64_t len = std::clamp<int64_t>(K - k0, 0, chunk_len);
      if (len > 0)
        dot_panel(x, w, K, t0, t1, n0, n1, k0, len, partials[c], width);
      else
        std::fill(partials[c], partials[c] + (t1 - t0) * width, 0.0f);
    }
    for (int64_t t = 0; t < t1 - t0; ++t)
      for (int64_t n = 0; n < width; ++n) {
        for (int c = 0; c < num_chunks; ++c) chunk[c] = partials[c][t * width + n];
        y[(t0 + t) * N + n0 + n] = pairwise_tree(chunk, num_chunks);
      }
  }
}

}  // namespace

void linear(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
  const Items it = items_for(T, N, K);
  cpu_pool().parallel_for(it.t_blocks * it.panels, it.grain,
                          [&](int64_t b, int64_t e) { linear_items(x, w, y, T, N, K, it, b, e); });
}

void linear_in_caller(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
  const Items it = items_for(T, N, K);
  linear_items(x, w, y, T, N, K, it, 0, it.t_blocks * it.panels);
}

void linear_row_canonical(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K,
                          int64_t chunk_len, int num_chunks) {
  const Items it = items_for(T, N, K);
  cpu_pool().parallel_for(it.t_blocks * it.panels, it.grain, [&](int64_t b, int64_t e) {
    linear_row_items(x, w, y, T, N, K, chunk_len, num_chunks, it, b, e);
  });
}

void linear_row_in_caller(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
  const Items it = items_for(T, N, K);
  linear_row_items(x, w, y, T, N, K, canonical_chunk(K), kTMax, it, 0, it.t_blocks * it.panels);
}

void linear_row(const float* x, const float* w, float* y, int64_t T, int64_t N, int64_t K) {
  linear_row_canonical(x, w, y, T, N, K, canonical_chunk(K), kTMax);
}

}  // namespace lockstep::cpu
