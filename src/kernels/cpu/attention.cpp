#include "kernels/cpu/attention.h"

#include <algorithm>
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

namespace {

// scores[r * ld + c] = dot(a[r], b[c], n) for an R x C tile (the dot() procedure).
template <int R, int C>
void score_tile(const float* const* a, const float* const* b, int64_t n, float* scores, int64_t ld) {
  v8f acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t full = n / 8 * 8;
  dot_tile_steps<R, C>(a, b, 0, full, acc);
  if (full < n) dot_tile_tail<R, C>(a, b, full, n - full, acc);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) scores[r * ld + c] = reduce_lanes(acc[r * C + c]);
}

using ScoreFn = void (*)(const float* const*, const float* const*, int64_t, float*, int64_t);
template <int R>
constexpr ScoreFn kScoreRow[4] = {&score_tile<R, 1>, &score_tile<R, 2>, &score_tile<R, 3>, &score_tile<R, 4>};
constexpr const ScoreFn* kScore[4] = {kScoreRow<1>, kScoreRow<2>, kScoreRow<3>, kScoreRow<4>};

// acc[i] = acc[i] * s (lane-wise, as the scalar loop).
inline void scale_row(float* acc, float s, int64_t d) {
  const v8f sv = {s, s, s, s, s, s, s, s};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    v8f a = load8(acc + i) * sv;
    std::memcpy(acc + i, &a, 32);
  }
  for (; i < d; ++i) acc[i] *= s;
}

// For j in [0, nb), ascending: acc[i] = acc[i] + e[j] * v[j][i] (lane-wise, as the scalar
// loop), columns [i0, i0 + 8 * V) held in registers across the keys.
template <int V>
inline void accumulate_values(float* acc, const float* e, const float* const* v, int64_t nb, int64_t i0) {
  v8f a[V];
  for (int u = 0; u < V; ++u) a[u] = load8(acc + i0 + u * 8);
  for (int64_t j = 0; j < nb; ++j) {
    const v8f ev = {e[j], e[j], e[j], e[j], e[j], e[j], e[j], e[j]};
    for (int u = 0; u < V; ++u) a[u] += ev * load8(v[j] + i0 + u * 8);
  }
  for (int u = 0; u < V; ++u) std::memcpy(acc + i0 + u * 8, &a[u], 32);
}

inline void accumulate_values(float* acc, const float* e, const float* const* v, int64_t nb, int64_t d) {
  int64_t i = 0;
  for (; i + 64 <= d; i += 64) accumulate_values<8>(acc, e, v, nb, i);
  for (; i + 8 <= d; i += 8) accumulate_values<1>(acc, e, v, nb, i);
  for (; i < d; ++i)
    for (int64_t j = 0; j < nb; ++j) acc[i] += e[j] * v[j][i];
}

}  // namespace

void paged_attention(const float* q, float* out, const PagedKvLayer& kv, const TokenSlots& slots, int64_t T,
                     int64_t heads, float scale) {
  const int64_t d = kv.head_dim;
  const int64_t nkv = kv.kv_heads;
  const int64_t group = heads / nkv;
  // One work item is a token's whole query group of one KV head: the group's queries share
  // every key and value load. Each query still runs its own online softmax, in the same order
  // of operations as one query alone (scores by dot(), blocks of kAttnBlock ascending, keys
  // ascending within a block), so its bits do not depend on the grouping.
  cpu_pool().parallel_for(T * nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(group * d), scores(group * kAttnBlock), m(group), l(group);
    std::vector<const float*> kp(kAttnBlock), vp(kAttnBlock), qp(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / nkv, g = item % nkv;
      for (int64_t hh = 0; hh < group; ++hh) qp[hh] = q + (t * heads + g * group + hh) * d;
      const int32_t* pages = slots.page_tables[t];
      const int64_t pos = slots.positions[t];
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t b0 = 0; b0 <= pos; b0 += kAttnBlock) {
        const int64_t nb = std::min(pos + 1, b0 + kAttnBlock) - b0;
        for (int64_t j = 0; j < nb; ++j) {
          kp[j] = slot_ptr(kv.k, kv, pages, b0 + j, g);
          vp[j] = slot_ptr(kv.v, kv, pages, b0 + j, g);
        }
        for (int64_t h0 = 0; h0 < group; h0 += 4) {
          const int rows = int(std::min<int64_t>(4, group - h0));
          for (int64_t j0 = 0; j0 < nb; j0 += 4) {
            const int cols = int(std::min<int64_t>(4, nb - j0));
            kScore[rows - 1][cols - 1](qp.data() + h0, kp.data() + j0, d, scores.data() + h0 * kAttnBlock + j0,
                                       kAttnBlock);
          }
        }
        for (int64_t hh = 0; hh < group; ++hh) {
          float* s = scores.data() + hh * kAttnBlock;
          float block_max = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < nb; ++j) {
            s[j] = s[j] * scale;
            block_max = std::max(block_max, s[j]);
          }
          const float m_new = std::max(m[hh], block_max);
          const float corr = std::exp(m[hh] - m_new);
          l[hh] *= corr;
          scale_row(acc.data() + hh * d, corr, d);
          for (int64_t j = 0; j < nb; ++j) s[j] = std::exp(s[j] - m_new);  // now the weights e
          m[hh] = m_new;
        }
        for (int64_t hh = 0; hh < group; ++hh) {
          const float* e = scores.data() + hh * kAttnBlock;
          for (int64_t j = 0; j < nb; ++j) l[hh] += e[j];
          accumulate_values(acc.data() + hh * d, e, vp.data(), nb, d);
        }
      }
      for (int64_t hh = 0; hh < group; ++hh) {
        float* o = out + (t * heads + g * group + hh) * d;
        const float* a = acc.data() + hh * d;
        for (int64_t i = 0; i < d; ++i) o[i] = a[i] / l[hh];
      }
    }
  });
}

}  // namespace lockstep::cpu
