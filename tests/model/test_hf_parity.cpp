// The forward against the Hugging Face float64 reference of the fixture model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>

#include <algorithm>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/moe.h"
#include "test_helpers.h"

namespace lockstep {
namespace {

using testing::fixture_model_dir;
using testing::golden_f64;
using testing::golden_ids;

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}

void check_recipe(Precision precision, double bound) {
  Qwen3Moe model(ModelWeights::load(fixture_model_dir(), precision), precision);
  std::vector<std::vector<int32_t>> seqs;
  for (int i = 0; i < 5; ++i) seqs.push_back(golden_ids("seq" + std::to_string(i) + ".input_ids"));
  auto logprobs = score_sequences(model, seqs);
  for (int i = 0; i < 5; ++i) {
    double err = max_abs_diff(logprobs[i], golden_f64("seq" + std::to_string(i) + ".logprobs"));
    std::printf("[%s] seq%d logprobs max abs err %.3g\n", precision_name(precision), i, err);
    EXPECT_LE(err, bound) << "seq" << i;
  }
  // seq0: full logits and router logits per layer.
  const auto& seq0 = seqs[0];
  const int64_t T = int64_t(seq0.size());
  KvCache cache(model.config(), (T + kAttnBlock - 1) / kAttnBlock, kAttnBlock);
  std::vector<int32_t> pages;
  for (int64_t p = 0; p < (T + kAttnBlock - 1) / kAttnBlock; ++p) pages.push_back(int32_t(p));
  ForwardBatch batch;
  for (int64_t t = 0; t < T; ++t) {
    batch.tokens.push_back(seq0[t]);
    batch.positions.push_back(int32_t(t));
    batch.page_tables.push_back(pages.data());
  }
  ForwardTrace trace;
  auto hidden = model.forward(batch, cache, &trace);
  auto logits = model.logits(hidden.data(), T);
  double err = max_abs_diff(logits, golden_f64("seq0.logits"));
  std::printf("[%s] seq0 logits max abs err %.3g\n", precision_name(precision), err);
  EXPECT_LE(err, bound);
  for (size_t l = 0; l < trace.router_logits.size(); ++l) {
    double e = max_abs_diff(trace.router_logits[l], golden_f64("seq0.router_logits.layer" + std::to_string(l)));
    std::printf("[%s] seq0 router logits layer %zu max abs err %.3g\n", precision_name(precision), l, e);
    EXPECT_LE(e, bound);
  }
}

TEST(HfParity, Float32RecipeWithin1e4) { check_recipe(Precision::float32, 1e-4); }

// Per layer and token, the set of experts chosen (as a sorted list).
std::vector<std::vector<std::vector<int32_t>>> routing(const Qwen3Moe& model, const std::vector<int32_t>& ids) {
  const int64_t T = int64_t(ids.size());
  KvCache cache(model.config(), (T + kAttnBlock - 1) / kAttnBlock, kAttnBlock);
  std::vector<int32_t> pages;
  for (int64_t p = 0; p < (T + kAttnBlock - 1) / kAttnBlock; ++p) pages.push_back(int32_t(p));
  ForwardBatch batch;
  for (int64_t t = 0; t < T; ++t) {
    batch.tokens.push_back(ids[t]);
    batch.positions.push_back(int32_t(t));
    batch.page_tables.push_back(pages.data());
  }
  ForwardTrace trace;
  model.forward(batch, cache, &trace);
  const auto& c = model.config();
  std::vector<std::vector<std::vector<int32_t>>> out;
  for (const auto& logits : trace.router_logits) {
    std::vector<int32_t> sel(T * c.num_experts_per_tok);
    std::vector<float> w(T * c.num_experts_per_tok);
    cpu::route_topk(logits.data(), T, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, sel.data(), w.data());
    std::vector<std::vector<int32_t>> layer(T);
    for (int64_t t = 0; t < T; ++t) {
      layer[t].assign(sel.begin() + t * c.num_experts_per_tok, sel.begin() + (t + 1) * c.num_experts_per_tok);
      std::sort(layer[t].begin(), layer[t].end());
    }
    out.push_back(layer);
  }
  return out;
}

// The bfloat16 recipe is within 5e-2 of the float64 reference on every token whose own top-k
// expert choice, at every layer, is the reference's (the float32 recipe's routing, which
// matches the reference to 1e-6). A near-tie between two experts flips under any bf16
// rounding (of the attention output, the residual, the norm); such a token then runs other
// experts, and its error is that of a different function: the test counts those tokens and
// bounds their share instead.
TEST(HfParity, Bfloat16RecipeWithin5e2OnUnflippedTokens) {
  Qwen3Moe f32(ModelWeights::load(fixture_model_dir(), Precision::float32), Precision::float32);
  Qwen3Moe b16(ModelWeights::load(fixture_model_dir(), Precision::bfloat16), Precision::bfloat16);
  int64_t total = 0, flipped_total = 0;
  std::vector<double> errors;
  for (int i = 0; i < 5; ++i) {
    auto ids = golden_ids("seq" + std::to_string(i) + ".input_ids");
    auto ref = golden_f64("seq" + std::to_string(i) + ".logprobs");
    auto lp = score_sequences(b16, {ids})[0];
    auto r32 = routing(f32, ids), r16 = routing(b16, ids);
    std::vector<bool> flipped(ids.size(), false);
    for (size_t l = 0; l < r32.size(); ++l)
      for (size_t t = 0; t < ids.size(); ++t) flipped[t] = flipped[t] || r32[l][t] != r16[l][t];
    double max_kept = 0, max_flipped = 0;
    int64_t n_flipped = 0;
    // logprobs[t] is computed from the state at position t.
    for (size_t t = 0; t < lp.size(); ++t) {
      double e = std::abs(double(lp[t]) - ref[t]);
      errors.push_back(e);
      if (flipped[t]) {
        max_flipped = std::max(max_flipped, e);
        ++n_flipped;
      } else {
        max_kept = std::max(max_kept, e);
      }
    }
    total += int64_t(lp.size());
    flipped_total += n_flipped;
    std::printf("[bfloat16] seq%d logprobs max abs err %.3g on %zu tokens; %lld tokens with a routing flip (max err %.3g)\n",
                i, max_kept, lp.size() - size_t(n_flipped), (long long)n_flipped, max_flipped);
    EXPECT_LE(max_kept, 5e-2) << "seq" << i;
  }
  std::sort(errors.begin(), errors.end());
  std::printf("[bfloat16] median abs err %.3g; %lld of %lld tokens flipped an expert choice\n",
              errors[errors.size() / 2], (long long)flipped_total, (long long)total);
  EXPECT_LE(errors[errors.size() / 2], 1e-2);
  EXPECT_LE(flipped_total * 20, total);  // at most 5% of tokens
}

}  // namespace
}  // namespace lockstep
