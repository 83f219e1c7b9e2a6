#include "kernels/cpu/log_softmax_backward.h"

#include <algorithm>
#include <cmath>

#include "core/thread_pool.h"
#include "kernels/canonical.h"
#include "kernels/cpu/log_softmax.h"

namespace lockstep::cpu {

namespace {

// One chunk's sum of p log p, in ascending order: a leaf of the entropy's tree. `z` points at
// the chunk's first logit.
float entropy_chunk(const float* z, int64_t n, float lse) {
  float s = 0.0f;
  for (int64_t v = 0; v < n; ++v) {
    float lp = z[v] - lse;
    s += std::exp(lp) * lp;
  }
  return s;
}

// The gradient of one row's columns [0, n) (global columns [v_begin, v_begin + n)).
void backward_row(const float* z, float lse, int32_t target, float g, const float* ge_ptr, float H, float* dz,
                  int64_t v_begin, int64_t n) {
  const float ge = ge_ptr ? *ge_ptr : 0.0f;
  for (int64_t v = 0; v < n; ++v) {
    float lp = z[v] - lse;
    float p = std::exp(lp);
    float d = -g * p;
    if (ge_ptr) d -= ge * p * (lp + H);
    dz[v] = d;
  }
  if (target >= v_begin && target < v_begin + n) dz[target - v_begin] += g;
}

}  // namespace

void softmax_entropy(const float* logits, float* entropy, int64_t T, int64_t V) {
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    const int64_t len = canonical_chunk(V);
    for (int64_t t = b; t < e; ++t) {
      const float* z = logits + t * V;
      const float lse = log_normalizer(z, V);
      float parts[kTMax];
      for (int c = 0; c < kTMax; ++c) {
        const int64_t begin = std::min(V, c * len), end = std::min(V, (c + 1) * len);
        parts[c] = entropy_chunk(z + begin, end - begin, lse);
      }
      entropy[t] = -tree8(parts);
    }
  });
}

void softmax_entropy_parts(const float* logits_slice, const float* lse, float* entropy_parts, int64_t T, int64_t V,
                           int64_t VL, int first_chunk, int num_chunks) {
  const int64_t len = canonical_chunk(V), v_begin = std::min(V, first_chunk * len);
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int i = 0; i < num_chunks; ++i) {
        const int c = first_chunk + i;
        const int64_t begin = std::min(V, c * len), end = std::min(V, (c + 1) * len);
        entropy_parts[t * num_chunks + i] = entropy_chunk(logits_slice + t * VL + (begin - v_begin), end - begin, lse[t]);
      }
  });
}

void log_softmax_gather_backward(const float* logits, const int32_t* targets, const float* dlogp,
                                 const float* dentropy, const float* entropy, float* dlogits, int64_t T, int64_t V) {
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* z = logits + t * V;
      backward_row(z, log_normalizer(z, V), targets[t], dlogp[t], dentropy ? dentropy + t : nullptr,
                   dentropy ? entropy[t] : 0.0f, dlogits + t * V, 0, V);
    }
  });
}

void log_softmax_gather_backward_slice(const float* logits_slice, const float* lse, const int32_t* targets,
                                       const float* dlogp, const float* dentropy, const float* entropy,
                                       float* dlogits_slice, int64_t T, int64_t v_begin, int64_t VL) {
  cpu_pool().parallel_for(T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      backward_row(logits_slice + t * VL, lse[t], targets[t], dlogp[t], dentropy ? dentropy + t : nullptr,
                   dentropy ? entropy[t] : 0.0f, dlogits_slice + t * VL, v_begin, VL);
  });
}

}  // namespace lockstep::cpu
