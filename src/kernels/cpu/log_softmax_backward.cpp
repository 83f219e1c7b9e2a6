#include "kernels/cpu/log_softmax_backward.h"

#include <algorithm>
#include <cmath>

#include "core/thread_pool.h"
#include "kernels/canonical.h"
#include "kernels/cpu/log_softmax.h"

namespace lockstep::cpu {

void softmax_entropy(const float* logits, float* entropy, int64_t T, int64_t V) {
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    const int64_t len = canonical_chunk(V);
    for (int64_t t = b; t < e; ++t) {
      const float* z = logits + t * V;
      const float lse = log_normalizer(z, V);
      float parts[kTMax];
      for (int c = 0; c < kTMax; ++c) {
        float s = 0.0f;
        for (int64_t v = std::min(V, c * len); v < std::min(V, (c + 1) * len); ++v) {
          float lp = z[v] - lse;
          s += std::exp(lp) * lp;
        }
        parts[c] = s;
      }
      entropy[t] = -tree8(parts);
    }
  });
}

void log_softmax_gather_backward(const float* logits, const int32_t* targets, const float* dlogp,
                                 const float* dentropy, const float* entropy, float* dlogits, int64_t T, int64_t V) {
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* z = logits + t * V;
      float* dz = dlogits + t * V;
      const float lse = log_normalizer(z, V);
      const float g = dlogp[t];
      const float ge = dentropy ? dentropy[t] : 0.0f;
      const float H = dentropy ? entropy[t] : 0.0f;
      for (int64_t v = 0; v < V; ++v) {
        float lp = z[v] - lse;
        float p = std::exp(lp);
        float d = -g * p;
        if (dentropy) d -= ge * p * (lp + H);
        dz[v] = d;
      }
      dz[targets[t]] += g;
    }
  });
}

}  // namespace lockstep::cpu
