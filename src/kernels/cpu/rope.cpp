#include "kernels/cpu/rope.h"

#include <cmath>

#include "core/error.h"

namespace lockstep::cpu {

RopeTable RopeTable::build(int64_t head_dim, int64_t max_positions, double theta) {
  RopeTable t;
  t.head_dim = head_dim;
  t.max_positions = max_positions;
  int64_t half = head_dim / 2;
  t.cos.resize(size_t(max_positions * half));
  t.sin.resize(size_t(max_positions * half));
  for (int64_t p = 0; p < max_positions; ++p)
    for (int64_t i = 0; i < half; ++i) {
      double inv_freq = std::pow(theta, -double(2 * i) / double(head_dim));
      double angle = double(p) * inv_freq;
      t.cos[p * half + i] = float(std::cos(angle));
      t.sin[p * half + i] = float(std::sin(angle));
    }
  return t;
}

void rope(float* x, const int32_t* positions, int64_t T, int64_t heads, const RopeTable& table) {
  const int64_t d = table.head_dim, half = d / 2;
  for (int64_t t = 0; t < T; ++t) {
    int64_t p = positions[t];
    LS_CHECK(p >= 0 && p < table.max_positions, "position ", p, " is outside the rotary table (max ",
             table.max_positions, ")");
    const float* c = table.cos.data() + p * half;
    const float* s = table.sin.data() + p * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

}  // namespace lockstep::cpu
