// Philox-4x32-10 counter-based random numbers (Salmon et al., SC'11).
// A draw is a pure function of (key, counter): sampling keyed by (seed, request, position)
// gives the same numbers whatever else is in the batch (docs/numerics.md, D5).
#pragma once
#include <array>
#include <cstdint>

namespace lockstep {

using PhiloxCounter = std::array<uint32_t, 4>;
using PhiloxKey = std::array<uint32_t, 2>;

inline PhiloxCounter philox4x32_10(PhiloxCounter ctr, PhiloxKey key) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(kM0) * ctr[0];
    uint64_t p1 = uint64_t(kM1) * ctr[2];
    ctr = {uint32_t(p1 >> 32) ^ ctr[1] ^ key[0], uint32_t(p1), uint32_t(p0 >> 32) ^ ctr[3] ^ key[1],
           uint32_t(p0)};
    key[0] += kW0;
    key[1] += kW1;
  }
  return ctr;
}

// A uniform float in [0, 1) with 24 random bits, from (seed, stream, position, lane).
inline float philox_uniform(uint64_t seed, uint64_t stream, uint64_t position, uint32_t lane = 0) {
  PhiloxCounter ctr = {uint32_t(position), uint32_t(position >> 32), uint32_t(stream), uint32_t(stream >> 32)};
  PhiloxKey key = {uint32_t(seed), uint32_t(seed >> 32)};
  PhiloxCounter r = philox4x32_10(ctr, key);
  return float(r[lane & 3] >> 8) * (1.0f / 16777216.0f);
}

// Mixes two 64-bit values into one (splitmix64 finaliser); used to derive per-request seeds.
inline uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t z = a + 0x9E3779B97F4A7C15ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace lockstep
