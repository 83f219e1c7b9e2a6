#include "kernels/cpu/attention_backward.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "core/error.h"
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

void paged_attention_backward(const float* q, const float* out, const float* dout, const PagedKvLayer& kv,
                              const TokenSlots& slots, int64_t T, int64_t heads, float scale, float* dq, float* dk,
                              float* dv) {
  const int64_t d = kv.head_dim, nkv = kv.kv_heads, group = heads / nkv;

  // Sequences by page table: token of each position, which must be 0..n-1 exactly once.
  std::map<const int32_t*, std::vector<int32_t>> seq_tokens;  // position -> token
  for (int64_t t = 0; t < T; ++t) {
    auto& v = seq_tokens[slots.page_tables[t]];
    int64_t pos = slots.positions[t];
    if (int64_t(v.size()) <= pos) v.resize(pos + 1, -1);
    LS_CHECK(v[pos] < 0, "attention backward: two tokens of one sequence at position ", pos);
    v[pos] = int32_t(t);
  }
  std::vector<const std::vector<int32_t>*> seq_of(T);
  for (int64_t t = 0; t < T; ++t) seq_of[t] = &seq_tokens[slots.page_tables[t]];
  for (const auto& [table, toks] : seq_tokens)
    for (size_t p = 0; p < toks.size(); ++p)
      LS_CHECK(toks[p] >= 0, "attention backward: a sequence of the batch lacks position ", p,
               "; the backward needs whole sequences (positions 0..n-1) in one micro-batch");

  // Pass 1, per (query token, head): log-sum-exp by the forward's block walk, D_i, and dq.
  std::vector<float> lse(T * heads), delta(T * heads);
  cpu_pool().parallel_for(T * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kAttnBlock), acc(d);
    for (int64_t item = begin; item < end; ++item) {
      int64_t t = item / heads, h = item % heads, g = h / group;
      const float* qv = q + item * d;
      const float* dov = dout + item * d;
      const int32_t* pages = slots.page_tables[t];
      int64_t pos = slots.positions[t];
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      for (int64_t b0 = 0; b0 <= pos; b0 += kAttnBlock) {
        int64_t b1 = std::min(pos + 1, b0 + kAttnBlock);
        float block_max = -std::numeric_limits<float>::infinity();
        for (int64_t j = b0; j < b1; ++j) {
          scores[j - b0] = dot(qv, slot_ptr(kv.k, kv, pages, j, g), d) * scale;
          block_max = std::max(block_max, scores[j - b0]);
        }
        float m_new = std::max(m, block_max);
        l *= std::exp(m - m_new);
        for (int64_t j = b0; j < b1; ++j) l += std::exp(scores[j - b0] - m_new);
        m = m_new;
      }
      const float L = m + std::log(l);
      const float D = dot(dov, out + item * d, d);
      lse[item] = L;
      delta[item] = D;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j <= pos; ++j) {
        const float* kj = slot_ptr(kv.k, kv, pages, j, g);
        float p = std::exp(dot(qv, kj, d) * scale - L);
        float ds = p * (dot(dov, slot_ptr(kv.v, kv, pages, j, g), d) - D) * scale;
        for (int64_t i = 0; i < d; ++i) acc[i] += ds * kj[i];
      }
      std::copy(acc.begin(), acc.end(), dq + item * d);
    }
  });

  // Pass 2, per (key token, kv head): dk and dv over the queries at or after its position.
  cpu_pool().parallel_for(T * nkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc_k(d), acc_v(d);
    for (int64_t item = begin; item < end; ++item) {
      int64_t j = item / nkv, g = item % nkv;
      const int32_t* pages = slots.page_tables[j];
      const float* kj = slot_ptr(kv.k, kv, pages, slots.positions[j], g);
      const float* vj = slot_ptr(kv.v, kv, pages, slots.positions[j], g);
      const auto& toks = *seq_of[j];
      std::fill(acc_k.begin(), acc_k.end(), 0.0f);
      std::fill(acc_v.begin(), acc_v.end(), 0.0f);
      for (size_t p = size_t(slots.positions[j]); p < toks.size(); ++p) {
        int64_t i = toks[p];
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          const int64_t qi = i * heads + h;
          const float* qv = q + qi * d;
          const float* dov = dout + qi * d;
          float pr = std::exp(dot(qv, kj, d) * scale - lse[qi]);
          float ds = pr * (dot(dov, vj, d) - delta[qi]) * scale;
          for (int64_t x = 0; x < d; ++x) {
            acc_v[x] += pr * dov[x];
            acc_k[x] += ds * qv[x];
          }
        }
      }
      std::copy(acc_k.begin(), acc_k.end(), dk + item * d);
      std::copy(acc_v.begin(), acc_v.end(), dv + item * d);
    }
  });
}

}  // namespace lockstep::cpu
