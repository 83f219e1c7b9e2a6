#include "kernels/cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "kernels/cpu/log_softmax.h"

namespace lockstep::cpu {

namespace {

// A key whose unsigned order is the comparator's (z desc): the float's bits made monotone
// (negative values flipped), then inverted so larger z sorts first. -0 and +0 get one key, as
// the comparator sees them equal.
inline uint32_t descending_key(float z) {
  if (z == 0.0f) z = 0.0f;
  uint32_t u;
  std::memcpy(&u, &z, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~u;
}

// order[0, V) := all ids by (z desc, id asc). A stable LSD radix sort of the keys over ids laid
// out ascending keeps ids ascending among equal keys: exactly the order std::sort with the
// comparator gives, in O(V) instead of O(V log V) (a 151936-entry vocabulary sorted a token at
// a time dominated rollouts and evaluation with the full vocabulary).
void radix_order(const float* z, int64_t V, std::vector<int32_t>& order) {
  constexpr int kBits = 11, kBuckets = 1 << kBits, kPasses = 3;  // 11 + 11 + 10 bits
  thread_local std::vector<uint32_t> keys, keys2;
  thread_local std::vector<int32_t> ids2;
  keys.resize(size_t(V));
  keys2.resize(size_t(V));
  ids2.resize(size_t(V));
  order.resize(size_t(V));
  std::vector<int64_t> counts(size_t(kPasses) * kBuckets, 0);
  for (int64_t v = 0; v < V; ++v) {
    keys[size_t(v)] = descending_key(z[v]);
    order[size_t(v)] = int32_t(v);
    for (int p = 0; p < kPasses; ++p)
      ++counts[size_t(p) * kBuckets + ((keys[size_t(v)] >> (p * kBits)) & (kBuckets - 1))];
  }
  uint32_t* k_in = keys.data();
  uint32_t* k_out = keys2.data();
  int32_t* i_in = order.data();
  int32_t* i_out = ids2.data();
  for (int p = 0; p < kPasses; ++p) {
    int64_t* c = counts.data() + size_t(p) * kBuckets;
    if (*std::max_element(c, c + kBuckets) == V) continue;  // one digit value: the pass changes nothing
    int64_t at = 0;
    for (int b = 0; b < kBuckets; ++b) std::swap(c[b], at), at += c[b];  // exclusive prefix sums
    for (int64_t v = 0; v < V; ++v) {
      const int64_t to = c[(k_in[v] >> (p * kBits)) & (kBuckets - 1)]++;
      k_out[to] = k_in[v];
      i_out[to] = i_in[v];
    }
    std::swap(k_in, k_out);
    std::swap(i_in, i_out);
  }
  if (i_in != order.data()) std::copy(i_in, i_in + V, order.data());
}

}  // namespace

SampleChoice sample_row(const float* logits, int64_t V, float temperature, int32_t top_k, float top_p, float u) {
  if (temperature == 0.0f) {
    int64_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (logits[v] > logits[best]) best = v;
    return {int32_t(best), logits[best] - log_normalizer(logits, V)};
  }
  thread_local std::vector<float> z;  // per-thread scratch: no V-sized allocation per token
  thread_local std::vector<int32_t> order;
  z.resize(size_t(V));
  for (int64_t v = 0; v < V; ++v) z[v] = logits[v] / temperature;
  const float log_z = log_normalizer(z.data(), V);
  int64_t keep = (top_k > 0 && top_k < V) ? top_k : V;
  // Few candidates: a partial sort (O(V log keep)); many: the radix order, the same order.
  if (keep <= kPartialSortMax) {
    order.resize(size_t(V));
    std::iota(order.begin(), order.end(), 0);
    auto by_value = [&](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
    std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_value);
  } else {
    radix_order(z.data(), V, order);
  }
  // Probabilities of the kept candidates, in order; cut at top_p.
  thread_local std::vector<float> p;
  p.resize(size_t(keep));
  float mass = 0.0f;
  int64_t n = keep;
  for (int64_t i = 0; i < keep; ++i) {
    p[i] = std::exp(z[order[i]] - log_z);
    mass += p[i];
    if (top_p < 1.0f && mass >= top_p) {
      n = i + 1;
      break;
    }
  }
  float target = u * mass;
  float cum = 0.0f;
  int64_t pick = n - 1;
  for (int64_t i = 0; i < n; ++i) {
    cum += p[i];
    if (cum > target) {
      pick = i;
      break;
    }
  }
  int32_t token = order[pick];
  return {token, z[token] - log_z};
}

void top_logprobs_row(const float* logits, int64_t V, float temperature, int32_t n, int32_t* tokens, float* logprobs) {
  // The same z and log-normalizer as sample_row, so a value equals the sampled token's bits.
  std::vector<float> lp(V);
  if (temperature == 0.0f) {
    const float log_z = log_normalizer(logits, V);
    for (int64_t v = 0; v < V; ++v) lp[v] = logits[v] - log_z;
  } else {
    std::vector<float> z(V);
    for (int64_t v = 0; v < V; ++v) z[v] = logits[v] / temperature;
    const float log_z = log_normalizer(z.data(), V);
    for (int64_t v = 0; v < V; ++v) lp[v] = z[v] - log_z;
  }
  top_n_logprobs(lp.data(), V, int32_t(std::min<int64_t>(n, V)), tokens, logprobs);
}

void top_n_logprobs(const float* lp, int64_t V, int32_t n, int32_t* tokens, float* logprobs) {
  const int64_t keep = std::min<int64_t>(n, V);
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + keep, order.end(),
                    [&](int32_t a, int32_t b) { return lp[a] > lp[b] || (lp[a] == lp[b] && a < b); });
  for (int64_t i = 0; i < keep; ++i) {
    tokens[i] = order[i];
    logprobs[i] = lp[order[i]];
  }
}

}  // namespace lockstep::cpu
