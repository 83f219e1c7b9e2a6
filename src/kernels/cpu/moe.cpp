#include "kernels/cpu/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/linear.h"

namespace lockstep::cpu {

void route_topk(const float* router_logits, int64_t T, int64_t E, int64_t k, bool normalize,
                int32_t* expert_ids, float* weights) {
  std::vector<float> probs(E);
  std::vector<int32_t> order(E);
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
    std::iota(order.begin(), order.end(), 0);
    // Descending probability, ties to the lower expert id.
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
    });
    float total = 0.0f;
    for (int64_t i = 0; i < k; ++i) total += probs[order[i]];
    for (int64_t i = 0; i < k; ++i) {
      expert_ids[t * k + i] = order[i];
      weights[t * k + i] = normalize ? probs[order[i]] / total : probs[order[i]];
    }
  }
}

ExpertAssignment assign_tokens(const int32_t* expert_ids, int64_t T, int64_t k, int64_t E) {
  ExpertAssignment a;
  a.tokens.resize(E);
  a.slots.resize(E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < k; ++i) {
      int32_t e = expert_ids[t * k + i];
      a.tokens[e].push_back(int32_t(t));
      a.slots[e].push_back(int32_t(i));
    }
  return a;
}

ExpertRows expert_rows(const int32_t* expert_ids, int64_t T, int64_t k, int64_t E) {
  // A counting sort: pairs placed in ascending pair index keep their tokens ascending.
  const int64_t pairs = T * k;
  ExpertRows r;
  r.offsets.assign(size_t(E + 1), 0);
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t e = expert_ids[p];
    LS_CHECK(e >= 0 && e < E, "expert_rows: pair ", p, " names expert ", e, " of ", E);
    ++r.offsets[size_t(e) + 1];
  }
  for (int64_t e = 0; e < E; ++e) r.offsets[size_t(e) + 1] += r.offsets[size_t(e)];
  std::vector<int32_t> next(r.offsets.begin(), r.offsets.end() - 1);
  std::vector<int32_t> row_of_pair(static_cast<size_t>(pairs));
  r.row_token.resize(size_t(pairs));
  r.row_pair.resize(size_t(pairs));
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t row = next[size_t(expert_ids[p])]++;
    r.row_token[size_t(row)] = int32_t(p / k);
    r.row_pair[size_t(row)] = int32_t(p);
    row_of_pair[size_t(p)] = row;
  }
  // A token's k slots by expert id (insertion sort: k is small, and stable).
  r.order.resize(size_t(pairs));
  std::vector<int32_t> slots(static_cast<size_t>(k));
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* ids = expert_ids + t * k;
    for (int64_t j = 0; j < k; ++j) {
      int64_t at = j;
      for (; at > 0 && ids[slots[size_t(at - 1)]] > ids[j]; --at) slots[size_t(at)] = slots[size_t(at - 1)];
      slots[size_t(at)] = int32_t(j);
    }
    for (int64_t j = 0; j < k; ++j) r.order[size_t(t * k + j)] = row_of_pair[size_t(t * k + slots[size_t(j)])];
  }
  return r;
}

std::vector<int32_t> rows_in_placement(const ExpertRows& rows, const int32_t* placed_pair) {
  const size_t pairs = rows.row_pair.size();
  std::vector<int32_t> row_of_pair(pairs, -1), out(pairs);
  for (size_t p = 0; p < pairs; ++p) {
    const int32_t pair = placed_pair[p];
    LS_CHECK(pair >= 0 && size_t(pair) < pairs && row_of_pair[size_t(pair)] < 0, "rows_in_placement: row ", p,
             " holds pair ", pair, ", not one of the ", pairs, " pairs each once");
    row_of_pair[size_t(pair)] = int32_t(p);
  }
  for (size_t r = 0; r < pairs; ++r) out[r] = row_of_pair[size_t(rows.row_pair[r])];
  return out;
}

namespace {

// swiglu_mlp with caller-owned scratch, so a layer's experts share one allocation.
void swiglu_mlp_with(const float* x, const float* gate_w, const float* up_w, const float* down_w, float* out,
                     int64_t T, int64_t H, int64_t I, bool round_bf16, std::vector<float>& scratch) {
  scratch.resize(size_t(3 * T * I));
  float* gate = scratch.data();
  float* up = gate + T * I;
  float* act = up + T * I;
  linear(x, gate_w, gate, T, I, H);
  linear(x, up_w, up, T, I, H);
  if (round_bf16) {
    cpu::round_to_bf16(gate, T * I);
    cpu::round_to_bf16(up, T * I);
  }
  swiglu(gate, up, act, T * I);
  if (round_bf16) cpu::round_to_bf16(act, T * I);
  linear_row(act, down_w, out, T, H, I);
  if (round_bf16) cpu::round_to_bf16(out, T * H);
}

}  // namespace

void swiglu_mlp(const float* x, const float* gate_w, const float* up_w, const float* down_w, float* out, int64_t T,
                int64_t H, int64_t I, bool round_bf16) {
  std::vector<float> scratch;
  swiglu_mlp_with(x, gate_w, up_w, down_w, out, T, H, I, round_bf16, scratch);
}

void combine_experts(const int32_t* expert_ids, const float* weights, const float* expert_out, float* out, int64_t T,
                     int64_t H, int64_t k) {
  std::vector<int32_t> order(k);
  for (int64_t t = 0; t < T; ++t) {
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int32_t a, int32_t b) { return expert_ids[t * k + a] < expert_ids[t * k + b]; });
    float* o = out + t * H;
    std::fill(o, o + H, 0.0f);
    for (int32_t slot : order) {
      float w = weights[t * k + slot];
      const float* y = expert_out + (t * k + slot) * H;
      for (int64_t h = 0; h < H; ++h) o[h] += w * y[h];
    }
  }
}

void moe_forward(const float* x, const float* router_w, const float* const* gate_w, const float* const* up_w,
                 const float* const* down_w, float* out, int64_t T, int64_t H, int64_t I, int64_t E, int64_t k,
                 bool normalize, bool round_bf16, float* router_logits_out) {
  std::vector<float> logits(T * E);
  linear(x, router_w, logits.data(), T, E, H);
  if (router_logits_out) std::copy(logits.begin(), logits.end(), router_logits_out);
  std::vector<int32_t> ids(T * k);
  std::vector<float> weights(T * k);
  route_topk(logits.data(), T, E, k, normalize, ids.data(), weights.data());
  ExpertAssignment assign = assign_tokens(ids.data(), T, k, E);

  // expert_out[t * k + slot] holds the expert output row for that (token, slot).
  std::vector<float> expert_out(T * k * H);
  std::vector<float> rows, result, scratch;  // reused by every expert
  for (int64_t e = 0; e < E; ++e) {
    const auto& toks = assign.tokens[e];
    if (toks.empty()) continue;
    int64_t n = int64_t(toks.size());
    rows.resize(n * H);
    result.resize(n * H);
    for (int64_t i = 0; i < n; ++i) std::copy(x + toks[i] * H, x + (toks[i] + 1) * H, rows.begin() + i * H);
    swiglu_mlp_with(rows.data(), gate_w[e], up_w[e], down_w[e], result.data(), n, H, I, round_bf16, scratch);
    for (int64_t i = 0; i < n; ++i)
      std::copy(result.begin() + i * H, result.begin() + (i + 1) * H,
                expert_out.begin() + (toks[i] * k + assign.slots[e][i]) * H);
  }
  combine_experts(ids.data(), weights.data(), expert_out.data(), out, T, H, k);
}

}  // namespace lockstep::cpu
