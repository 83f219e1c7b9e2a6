#include "kernels/cpu/attention.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/thread_pool.h"
#include "kernels/cpu/dot.h"

namespace lockstep::cpu {

namespace {

inline const float* slot_ptr(const float* base, const PagedKvLayer& kv, const int32_t* pages, int64_t pos,
                             int64_t kv_head) {
  int64_t page = pages[pos / kv.page_size];
  int64_t off = pos % kv.page_size;
  return base + ((page * kv.page_size + off) * kv.kv_heads + kv_head) * kv.head_dim;
}

}  // namespace

void kv_write(const PagedKvLayer& kv, const TokenSlots& slots, const float* k_new, const float* v_new, int64_t T) {
  const int64_t row = kv.kv_heads * kv.head_dim;
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* pages = slots.page_tables[t];
    int64_t pos = slots.positions[t];
    float* kd = const_cast<float*>(slot_ptr(kv.k, kv, pages, pos, 0));
    float* vd = const_cast<float*>(slot_ptr(kv.v, kv, pages, pos, 0));
    std::memcpy(kd, k_new + t * row, row * 4);
    std::memcpy(vd, v_new + t * row, row * 4);
  }
}

void paged_attention(const float* q, float* out, const PagedKvLayer& kv, const TokenSlots& slots, int64_t T,
                     int64_t heads, float scale) {
  const int64_t d = kv.head_dim;
  const int64_t group = heads / kv.kv_heads;
  cpu_pool().parallel_for(T * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(d), scores(kAttnBlock);
    for (int64_t item = begin; item < end; ++item) {
      int64_t t = item / heads, h = item % heads, kvh = h / group;
      const float* qv = q + (t * heads + h) * d;
      const int32_t* pages = slots.page_tables[t];
      int64_t pos = slots.positions[t];
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t b0 = 0; b0 <= pos; b0 += kAttnBlock) {
        int64_t b1 = std::min(pos + 1, b0 + kAttnBlock);
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t j = b0; j < b1; ++j) {
          float s = dot(qv, slot_ptr(kv.k, kv, pages, j, kvh), d) * scale;
          scores[j - b0] = s;
          block_max = std::max(block_max, s);
        }
        float m_new = std::max(m, block_max);
        float corr = std::exp(m - m_new);
        l *= corr;
        for (int64_t i = 0; i < d; ++i) acc[i] *= corr;
        for (int64_t j = b0; j < b1; ++j) {
          float e = std::exp(scores[j - b0] - m_new);
          l += e;
          const float* vv = slot_ptr(kv.v, kv, pages, j, kvh);
          for (int64_t i = 0; i < d; ++i) acc[i] += e * vv[i];
        }
        m = m_new;
      }
      float* o = out + (t * heads + h) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = acc[i] / l;
    }
  });
}

}  // namespace lockstep::cpu
