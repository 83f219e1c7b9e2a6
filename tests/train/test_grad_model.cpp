// The model backward on one rank against the Hugging Face float64 gradients of the fixture,
// and its determinism (thread counts, repeated calls).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>

#include "../model/test_helpers.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "parallel/parallel_backward.h"

namespace lockstep {
namespace {

using testing::fixture_model_dir;
using testing::golden;
using testing::golden_ids;

// loss = sum over sequences of the mean next-token NLL: dlogp = -1 / (n - 1).
std::vector<SequenceGradInput> mean_nll_upstream(const std::vector<std::vector<int32_t>>& seqs) {
  std::vector<SequenceGradInput> up(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) up[s].dlogp.assign(seqs[s].size() - 1, -1.0f / float(seqs[s].size() - 1));
  return up;
}

// The gradients of one micro-batch of `seqs` with upstream `up`; the forward's log-probs
// and entropy are left in *logprobs / *entropy when given.
std::map<std::string, Tensor> one_rank_grads(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs,
                                             const std::vector<SequenceGradInput>& up,
                                             std::vector<std::vector<float>>* logprobs = nullptr,
                                             std::vector<std::vector<float>>* entropy = nullptr) {
  ParallelGrad grad(model);
  return named_tensors(grad.step_grads({seqs}, entropy != nullptr, [&](int64_t, const auto& lp, const auto& ent) {
    if (logprobs) *logprobs = lp;
    if (entropy) *entropy = ent;
    return up;
  }));
}

std::map<std::string, Tensor> fixture_grads(const Qwen3Moe& model, const std::vector<std::vector<int32_t>>& seqs) {
  return one_rank_grads(model, seqs, mean_nll_upstream(seqs));
}

const Qwen3Moe& fixture_model(Precision p) {
  static Qwen3Moe f32(ModelWeights::load(fixture_model_dir(), Precision::float32), Precision::float32);
  static Qwen3Moe b16(ModelWeights::load(fixture_model_dir(), Precision::bfloat16), Precision::bfloat16);
  return p == Precision::float32 ? f32 : b16;
}

std::vector<std::vector<int32_t>> grad_seqs() { return {golden_ids("seq0.input_ids"), golden_ids("seq2.input_ids")}; }

// Worst relative error (max |ours - ref| / max |ref|) over all parameters; fails any tensor
// beyond bound * max|ref| + 1e-7. The golden file names experts in the hub layout per expert
// (grad.model.layers.L.mlp.experts.E.gate_proj.weight), the same as our global names.
double compare_to_golden(const std::map<std::string, Tensor>& grads, const Qwen3Moe& model, double bound) {
  auto names = model.weights().named();
  EXPECT_EQ(grads.size(), names.size());
  double worst = 0;
  std::string worst_name;
  for (const auto& [name, param] : names) {
    auto it = grads.find(name);
    if (it == grads.end()) {
      ADD_FAILURE() << "no gradient for " << name;
      continue;
    }
    const Tensor& ref = golden().get("grad." + name);
    EXPECT_EQ(ref.numel(), it->second.numel()) << name;
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      diff = std::max(diff, std::abs(double(it->second.data<float>()[i]) - ref.data<double>()[i]));
      scale = std::max(scale, std::abs(ref.data<double>()[i]));
    }
    EXPECT_LE(diff, bound * scale + 1e-7) << name << " max|ref| " << scale;
    double rel = diff / (scale + 1e-30);
    if (rel > worst) worst = rel, worst_name = name;
  }
  std::printf("worst tensor %s: relative error %.3g\n", worst_name.c_str(), worst);
  return worst;
}

TEST(GradModel, Float32MatchesHfFloat64) {
  const auto& model = fixture_model(Precision::float32);
  auto seqs = grad_seqs();
  auto t0 = std::chrono::steady_clock::now();
  auto grads = fixture_grads(model, seqs);
  std::printf("forward+backward of %zu tokens: %.1f ms\n", seqs[0].size() + seqs[1].size(),
              std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  compare_to_golden(grads, model, 1e-4);
}

TEST(GradModel, Bfloat16RecipeAgreesInDirection) {
  // bf16 activations change some routing decisions, so single expert tensors may differ a lot
  // from the float64 reference; the gradient as a whole must still point the same way.
  const auto& model = fixture_model(Precision::bfloat16);
  auto grads = fixture_grads(model, grad_seqs());
  double dot = 0, nn = 0, rr = 0;
  for (const auto& [name, g] : grads) {
    const Tensor& ref = golden().get("grad." + name);
    for (int64_t i = 0; i < ref.numel(); ++i) {
      double a = g.data<float>()[i], b = ref.data<double>()[i];
      EXPECT_TRUE(std::isfinite(a)) << name;
      dot += a * b, nn += a * a, rr += b * b;
    }
  }
  double cosine = dot / std::sqrt(nn * rr);
  std::printf("bfloat16 recipe: cosine similarity to the float64 gradient %.6f\n", cosine);
  EXPECT_GT(cosine, 0.98);
}

TEST(GradModel, LossMatchesGolden) {
  const auto& model = fixture_model(Precision::float32);
  auto seqs = grad_seqs();
  std::vector<std::vector<float>> logprobs;
  one_rank_grads(model, seqs, mean_nll_upstream(seqs), &logprobs);
  double loss = 0;
  for (const auto& lp : logprobs) {
    double s = 0;
    for (float v : lp) s -= v;
    loss += s / double(lp.size());
  }
  double ref = golden().get("grad_loss").data<double>()[0];
  EXPECT_NEAR(loss, ref, 1e-5 * std::abs(ref));
}

TEST(GradModel, TrainForwardLogprobsEqualScoreSequences) {
  for (Precision p : {Precision::float32, Precision::bfloat16}) {
    const auto& model = fixture_model(p);
    std::vector<std::vector<int32_t>> seqs;
    for (int i = 0; i < 5; ++i) seqs.push_back(golden_ids("seq" + std::to_string(i) + ".input_ids"));
    std::vector<std::vector<float>> logprobs, entropy;
    one_rank_grads(model, seqs, mean_nll_upstream(seqs), &logprobs, &entropy);
    auto ref = score_sequences(model, seqs);
    for (size_t s = 0; s < seqs.size(); ++s) {
      EXPECT_TRUE(testing::same_bits(logprobs[s], ref[s])) << "seq" << s;
      ASSERT_EQ(entropy[s].size(), ref[s].size());
      for (float h : entropy[s]) EXPECT_TRUE(h >= 0 && std::isfinite(h));
    }
  }
}

bool same_grads(const std::map<std::string, Tensor>& a, const std::map<std::string, Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    if (it == b.end() || it->second.nbytes() != t.nbytes() || std::memcmp(it->second.raw(), t.raw(), t.nbytes()) != 0) {
      ADD_FAILURE() << "gradients differ at " << name;
      return false;
    }
  }
  return true;
}

TEST(GradModel, BitwiseAcrossThreadCountsAndRepeats) {
  for (Precision p : {Precision::float32, Precision::bfloat16}) {
    const auto& model = fixture_model(p);
    auto seqs = grad_seqs();
    seqs.push_back(golden_ids("seq1.input_ids"));
    // With an entropy term too, so its gradient path is covered.
    auto up = mean_nll_upstream(seqs);
    for (size_t s = 0; s < seqs.size(); ++s) up[s].dentropy.assign(seqs[s].size() - 1, 0.01f);
    std::vector<std::vector<float>> lp, ent;
    set_num_threads(1);
    const auto base = one_rank_grads(model, seqs, up, &lp, &ent);
    for (int threads : {2, 3, 1}) {
      set_num_threads(threads);
      EXPECT_TRUE(same_grads(base, one_rank_grads(model, seqs, up, &lp, &ent)))
          << precision_name(p) << " threads " << threads;
    }
    set_num_threads(2);
  }
}

TEST(GradModel, RejectsMismatchedUpstream) {
  const auto& model = fixture_model(Precision::float32);
  auto seqs = grad_seqs();
  auto up = mean_nll_upstream(seqs);
  up[1].dlogp.pop_back();
  EXPECT_THROW(one_rank_grads(model, seqs, up), Error);
  EXPECT_THROW(one_rank_grads(model, {{}}, {SequenceGradInput{}}), Error);
}

}  // namespace
}  // namespace lockstep
