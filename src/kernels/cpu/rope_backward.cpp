#include "kernels/cpu/rope_backward.h"

#include "core/error.h"

namespace lockstep::cpu {

void rope_backward(float* dx, const int32_t* positions, int64_t T, int64_t heads, const RopeTable& table) {
  const int64_t d = table.head_dim, half = d / 2;
  for (int64_t t = 0; t < T; ++t) {
    int64_t p = positions[t];
    LS_CHECK(p >= 0 && p < table.max_positions, "position ", p, " is outside the rotary table (max ",
             table.max_positions, ")");
    const float* c = table.cos.data() + p * half;
    const float* s = table.sin.data() + p * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = dx + (t * heads + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        float d1 = v[i], d2 = v[i + half];
        v[i] = d1 * c[i] + d2 * s[i];
        v[i + half] = d2 * c[i] - d1 * s[i];
      }
    }
  }
}

}  // namespace lockstep::cpu
