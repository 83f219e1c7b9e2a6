// Random test inputs from Philox (reproducible; never zeros).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/philox.h"

namespace lockstep::testing {

inline std::vector<float> random_vector(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = (philox_uniform(seed, 7, uint64_t(i)) * 2.0f - 1.0f) * scale;
  return v;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

inline double max_rel_err(const std::vector<float>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num = std::max(num, std::abs(double(got[i]) - ref[i]));
    den = std::max(den, std::abs(ref[i]));
  }
  return num / (den + 1e-30);
}

}  // namespace lockstep::testing
