#include "kernels/cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/cpu/log_softmax.h"

namespace lockstep::cpu {

SampleChoice sample_row(const float* logits, int64_t V, float temperature, int32_t top_k, float top_p, float u) {
  if (temperature == 0.0f) {
    int64_t best = 0;
    for (int64_t v = 1; v < V; ++v)
      if (logits[v] > logits[best]) best = v;
    return {int32_t(best), logits[best] - log_normalizer(logits, V)};
  }
  std::vector<float> z(V);
  for (int64_t v = 0; v < V; ++v) z[v] = logits[v] / temperature;
  const float log_z = log_normalizer(z.data(), V);
  std::vector<int32_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  int64_t keep = (top_k > 0 && top_k < V) ? top_k : V;
  auto by_value = [&](int32_t a, int32_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), by_value);
  // Probabilities of the kept candidates, in order; cut at top_p.
  std::vector<float> p(keep);
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
