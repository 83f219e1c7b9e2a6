// The one fixed dot-product procedure of the CPU backend (DESIGN.md section 1, rule 2):
// the inputs are zero-padded to a multiple of 8; lane j accumulates products of the
// elements with index = j (mod 8) in ascending order in fp32; the 8 lanes are combined by
// tree8. Every CPU kernel that reduces over a row uses it, with any tiling around it, so a
// value never depends on the batch size, the tile it fell into or the thread count.
#pragma once
#include <cstdint>
#include <cstring>

#include "kernels/canonical.h"

namespace lockstep::cpu {

typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, 32);
  return v;
}

// The first n (< 8) elements, the rest zero.
inline v8f load_partial(const float* p, int64_t n) {
  float tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return load8(tmp);
}

inline float reduce_lanes(v8f acc) {
  float lanes[8];
  std::memcpy(lanes, &acc, 32);
  return tree8(lanes);
}

inline float dot(const float* a, const float* b, int64_t n) {
  v8f acc = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc += load8(a + k) * load8(b + k);
  if (k < n) acc += load_partial(a + k, n - k) * load_partial(b + k, n - k);
  return reduce_lanes(acc);
}

// out[r][c] = dot(a[r], b[c], n) for an R x C tile; the same procedure as dot(), with the
// loads of a and b shared across the tile.
template <int R, int C>
inline void dot_tile(const float* const* a, const float* const* b, int64_t n, float out[R][C]) {
  v8f acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    v8f bv[C];
    for (int c = 0; c < C; ++c) bv[c] = load8(b[c] + k);
    for (int r = 0; r < R; ++r) {
      v8f av = load8(a[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] += av * bv[c];
    }
  }
  if (k < n) {
    for (int r = 0; r < R; ++r) {
      v8f av = load_partial(a[r] + k, n - k);
      for (int c = 0; c < C; ++c) acc[r][c] += av * load_partial(b[c] + k, n - k);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = reduce_lanes(acc[r][c]);
}

}  // namespace lockstep::cpu
