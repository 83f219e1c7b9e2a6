#include "kernels/cpu/elementwise.h"

#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "kernels/cpu/dot.h"

namespace lockstep::cpu {

void rmsnorm(const float* x, const float* w, float* out, int64_t rows, int64_t n, float eps, bool round_normed) {
  cpu_pool().parallel_for(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* xr = x + r * n;
      float* o = out + r * n;
      float mean = dot(xr, xr, n) / float(n);
      float inv = 1.0f / std::sqrt(mean + eps);
      for (int64_t i = 0; i < n; ++i) {
        float v = xr[i] * inv;
        if (round_normed) v = round_bf16(v);
        o[i] = w[i] * v;
      }
    }
  });
}

void swiglu(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void embedding(const int32_t* ids, const float* table, float* out, int64_t T, int64_t hidden) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(out + t * hidden, table + int64_t(ids[t]) * hidden, hidden * 4);
}

void round_to_bf16(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

}  // namespace lockstep::cpu
