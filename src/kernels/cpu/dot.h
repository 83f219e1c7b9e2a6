// The one fixed dot-product procedure of the CPU backend (docs/numerics.md, rule 2):
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

// Tells the compiler a loaded vector stays in a register (an empty asm, no instruction), so it
// does not reload it from memory for every multiply. Arithmetic is unchanged. Only where the
// vector fits one register (AVX); without AVX (e.g. the sanitizer build) it is a no-op.
#if defined(__AVX__)
#define LS_KEEP_IN_REGISTER(x) asm("" : "+v"(x))
#else
#define LS_KEEP_IN_REGISTER(x) ((void)0)
#endif

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

// Register-blocked form of the same procedure for kernels that block over K: the R x C lane
// accumulators live in `acc` (row-major, acc[r * C + c]) between calls, so a caller may run
// the 8-steps of [k0, k1) in any number of consecutive blocks and the lanes still see
// acc_j += a[k] * b[k] for k = j (mod 8) in ascending k, exactly as in dot(). k1 - k0 must be a
// multiple of 8; the zero-padded tail step is dot_tile_tail. With kInit the accumulators
// start at zero (the first block) instead of being read from acc.
template <int R, int C, bool kInit = false>
inline void dot_tile_steps(const float* const* a, const float* const* b, int64_t k0, int64_t k1, v8f* acc) {
  v8f s[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) s[r][c] = kInit ? v8f{0, 0, 0, 0, 0, 0, 0, 0} : acc[r * C + c];
  for (int64_t k = k0; k < k1; k += 8) {
    v8f bv[C];
    for (int c = 0; c < C; ++c) {
      bv[c] = load8(b[c] + k);
      // Keep the loaded vector in a register: otherwise the compiler folds a fresh load into
      // every multiply and the tile shares nothing.
      LS_KEEP_IN_REGISTER(bv[c]);
    }
    for (int r = 0; r < R; ++r) {
      v8f av = load8(a[r] + k);
      LS_KEEP_IN_REGISTER(av);
      for (int c = 0; c < C; ++c) s[r][c] += av * bv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r * C + c] = s[r][c];
}

// dot_tile_steps with the C b rows packed: step i's 8 columns of b row c are at
// bp[(i * C + c) * 8], so the tile reads b as one sequential stream (rows of a large matrix
// that are a power of two apart would otherwise fight over the same L1 sets). a rows are
// read at columns [k0, k0 + 8 * steps).
template <int R, int C, bool kInit = false>
inline void dot_tile_steps_packed(const float* const* a, int64_t k0, const float* bp, int64_t steps, v8f* acc) {
  v8f s[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) s[r][c] = kInit ? v8f{0, 0, 0, 0, 0, 0, 0, 0} : acc[r * C + c];
  for (int64_t i = 0; i < steps; ++i) {
    v8f bv[C];
    for (int c = 0; c < C; ++c) {
      bv[c] = load8(bp + (i * C + c) * 8);
      LS_KEEP_IN_REGISTER(bv[c]);
    }
    for (int r = 0; r < R; ++r) {
      v8f av = load8(a[r] + k0 + i * 8);
      LS_KEEP_IN_REGISTER(av);
      for (int c = 0; c < C; ++c) s[r][c] += av * bv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r * C + c] = s[r][c];
}

// The last, zero-padded step of dot() for columns [k, k + rem), 0 < rem < 8.
template <int R, int C>
inline void dot_tile_tail(const float* const* a, const float* const* b, int64_t k, int64_t rem, v8f* acc) {
  for (int r = 0; r < R; ++r) {
    v8f av = load_partial(a[r] + k, rem);
    for (int c = 0; c < C; ++c) acc[r * C + c] += av * load_partial(b[c] + k, rem);
  }
}

}  // namespace lockstep::cpu
