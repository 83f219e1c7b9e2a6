#include "kernels/cpu/moe_backward.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/cpu/dot.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/elementwise_backward.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/moe.h"

namespace lockstep::cpu {

void route_topk_backward(const float* router_logits, const int32_t* expert_ids, const float* weights,
                         const float* dweights, float* dlogits, int64_t T, int64_t E, int64_t k, bool normalize) {
  std::vector<float> probs(E), dp(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* z = router_logits + t * E;
    float m = z[0];
    for (int64_t e = 1; e < E; ++e) m = std::max(m, z[e]);
    float s = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      probs[e] = std::exp(z[e] - m);
      s += probs[e];
    }
    for (int64_t e = 0; e < E; ++e) probs[e] /= s;
    const int32_t* ids = expert_ids + t * k;
    const float* w = weights + t * k;
    const float* dw = dweights + t * k;
    std::fill(dp.begin(), dp.end(), 0.0f);
    if (normalize) {
      float total = 0.0f, wdw = 0.0f;
      for (int64_t i = 0; i < k; ++i) total += probs[ids[i]];
      for (int64_t i = 0; i < k; ++i) wdw += dw[i] * w[i];
      for (int64_t i = 0; i < k; ++i) dp[ids[i]] = (dw[i] - wdw) / total;
    } else {
      for (int64_t i = 0; i < k; ++i) dp[ids[i]] = dw[i];
    }
    float pdp = 0.0f;
    for (int64_t e = 0; e < E; ++e) pdp += dp[e] * probs[e];
    for (int64_t e = 0; e < E; ++e) dlogits[t * E + e] = probs[e] * (dp[e] - pdp);
  }
}

void swiglu_mlp_backward(const float* x, const float* gate_w, const float* up_w, const float* down_w, const float* dy,
                         float* dx, float* dgate_w, float* dup_w, float* ddown_w, int64_t R, int64_t H, int64_t I,
                         const TokenChunks& chunks, bool round_bf16) {
  // Recompute as swiglu_mlp does (the same kernels, so the same bits).
  std::vector<float> gate(R * I), up(R * I), act(R * I);
  linear(x, gate_w, gate.data(), R, I, H);
  linear(x, up_w, up.data(), R, I, H);
  if (round_bf16) {
    round_to_bf16(gate.data(), R * I);
    round_to_bf16(up.data(), R * I);
  }
  swiglu(gate.data(), up.data(), act.data(), R * I);
  if (round_bf16) round_to_bf16(act.data(), R * I);

  std::vector<float> dact(R * I), dgate(R * I), dup(R * I), dx_up(R * H);
  linear_weight_grad(dy, act.data(), ddown_w, H, I, chunks);
  linear_input_grad(dy, down_w, dact.data(), R, H, I);  // row form: N = hidden
  swiglu_backward(gate.data(), up.data(), dact.data(), dgate.data(), dup.data(), R * I);
  linear_weight_grad(dgate.data(), x, dgate_w, I, H, chunks);
  linear_weight_grad(dup.data(), x, dup_w, I, H, chunks);
  linear_input_grad(dgate.data(), gate_w, dx, R, I, H);
  linear_input_grad(dup.data(), up_w, dx_up.data(), R, I, H);
  add_inplace(dx, dx_up.data(), R * H);
}

void moe_backward(const float* x, const float* router_logits, const float* router_w, const float* const* gate_w,
                  const float* const* up_w, const float* const* down_w, const float* dout, float* dx,
                  float* drouter_w, float* const* dgate_w, float* const* dup_w, float* const* ddown_w, int64_t T,
                  int64_t H, int64_t I, int64_t E, int64_t k, bool normalize, bool round_bf16) {
  std::vector<int32_t> ids(T * k);
  std::vector<float> weights(T * k);
  route_topk(router_logits, T, E, k, normalize, ids.data(), weights.data());
  ExpertAssignment assign = assign_tokens(ids.data(), T, k, E);

  // Per (token, slot): the expert's input gradient row and d(weight).
  std::vector<float> expert_dx(T * k * H), dweights(T * k);
  std::vector<float> rows, result, dy, dxr;
  for (int64_t e = 0; e < E; ++e) {
    const auto& toks = assign.tokens[e];
    const auto& slots = assign.slots[e];
    const int64_t n = int64_t(toks.size());
    if (n == 0) {
      std::fill(dgate_w[e], dgate_w[e] + I * H, 0.0f);
      std::fill(dup_w[e], dup_w[e] + I * H, 0.0f);
      std::fill(ddown_w[e], ddown_w[e] + H * I, 0.0f);
      continue;
    }
    rows.resize(n * H);
    result.resize(n * H);
    dy.resize(n * H);
    dxr.resize(n * H);
    for (int64_t i = 0; i < n; ++i) std::copy(x + toks[i] * H, x + (toks[i] + 1) * H, rows.begin() + i * H);
    swiglu_mlp(rows.data(), gate_w[e], up_w[e], down_w[e], result.data(), n, H, I, round_bf16);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t ts = toks[i] * k + slots[i];
      const float* g = dout + toks[i] * H;
      dweights[ts] = dot(g, result.data() + i * H, H);
      const float w = weights[ts];
      for (int64_t h = 0; h < H; ++h) dy[i * H + h] = w * g[h];
    }
    TokenChunks chunks = token_chunks_of(toks.data(), n, T);
    swiglu_mlp_backward(rows.data(), gate_w[e], up_w[e], down_w[e], dy.data(), dxr.data(), dgate_w[e], dup_w[e],
                        ddown_w[e], n, H, I, chunks, round_bf16);
    for (int64_t i = 0; i < n; ++i)
      std::copy(dxr.begin() + i * H, dxr.begin() + (i + 1) * H, expert_dx.begin() + (toks[i] * k + slots[i]) * H);
  }

  std::vector<float> dlogits(T * E);
  route_topk_backward(router_logits, ids.data(), weights.data(), dweights.data(), dlogits.data(), T, E, k, normalize);
  linear_weight_grad(dlogits.data(), x, drouter_w, E, H, token_chunks(T));
  linear_input_grad(dlogits.data(), router_w, dx, T, E, H);
  std::vector<int32_t> order(k);
  for (int64_t t = 0; t < T; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return ids[t * k + a] < ids[t * k + b]; });
    for (int32_t slot : order) add_inplace(dx + t * H, expert_dx.data() + (t * k + slot) * H, H);
  }
}

}  // namespace lockstep::cpu
