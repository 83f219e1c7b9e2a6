// Shared helpers for the dist tests: order-sensitive random data and bitwise compares.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace lockstep::test {

// Values spanning many binades with random signs, so a different summation order
// almost surely changes the bits (the tests check that it does).
inline std::vector<float> spread_values(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> expo(-12, 12);
  std::vector<float> v(n);
  for (auto& x : v) x = std::ldexp(mant(rng), expo(rng)) * ((rng() & 1) ? 1.0f : -1.0f);
  return v;
}

inline bool same_bits(const float* a, const float* b, size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0;
}

inline size_t count_bit_diffs(const float* a, const float* b, size_t n) {
  size_t d = 0;
  for (size_t i = 0; i < n; ++i) d += std::memcmp(a + i, b + i, sizeof(float)) != 0;
  return d;
}

}  // namespace lockstep::test
