// sample_row's radix-sorted candidate order (large vocabularies) against the comparator sort it
// replaced: the same token and the same log-prob bits, ties, signed zeros and infinities included.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "core/philox.h"
#include "kernels/cpu/log_softmax.h"
#include "kernels/cpu/sampling.h"
#include "random.h"

namespace lockstep {
namespace {

using testing::random_vector;

// The sampler as it was before the radix order: every (z, id) candidate sorted by the
// comparator, cut to top_k, then the same sequential float sums (mass, then the cumulative
// scan), so the reference's bits are the old sampler's.
cpu::SampleChoice reference_sample(const float* logits, int64_t V, float temperature, int32_t top_k, float top_p,
                                   float u) {
  std::vector<float> z(V);
  for (int64_t v = 0; v < V; ++v) z[v] = logits[v] / temperature;
  const float log_z = cpu::log_normalizer(z.data(), V);
  std::vector<std::pair<float, int32_t>> cand;
  for (int64_t v = 0; v < V; ++v) cand.emplace_back(z[v], int32_t(v));
  std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  if (top_k > 0 && top_k < V) cand.resize(size_t(top_k));
  std::vector<float> probs;
  float mass = 0.0f;
  for (const auto& c : cand) {
    probs.push_back(std::exp(c.first - log_z));
    mass += probs.back();
    if (top_p < 1.0f && mass >= top_p) break;
  }
  const float target = u * mass;
  float cum = 0.0f;
  size_t pick = probs.size() - 1;
  for (size_t i = 0; i < probs.size(); ++i)
    if ((cum += probs[i]) > target) {
      pick = i;
      break;
    }
  return {cand[pick].second, cand[pick].first - log_z};
}

void expect_same_choice(const std::vector<float>& logits, float temperature, int32_t top_k, float top_p, float u) {
  const int64_t V = int64_t(logits.size());
  const cpu::SampleChoice got = cpu::sample_row(logits.data(), V, temperature, top_k, top_p, u);
  const cpu::SampleChoice want = reference_sample(logits.data(), V, temperature, top_k, top_p, u);
  EXPECT_EQ(got.token, want.token) << "V " << V << " T " << temperature << " top_k " << top_k << " top_p " << top_p
                                   << " u " << u;
  EXPECT_EQ(std::memcmp(&got.logprob, &want.logprob, 4), 0) << got.logprob << " vs " << want.logprob;
}

// Logits on a coarse grid (many exact ties, so the id tie-break decides), with signed zeros
// and infinities planted.
std::vector<float> tied_logits(int64_t V, uint64_t seed) {
  std::vector<float> x = random_vector(V, seed, 4.0f);
  for (float& v : x) v = std::round(v * 2.0f) / 2.0f;
  for (int64_t v = 3; v < V; v += 97) x[v] = (v / 97) % 2 ? -0.0f : 0.0f;
  x[V / 2] = -std::numeric_limits<float>::infinity();
  x[V / 3] = 12.0f;  // a few clear winners, tied with each other
  x[V / 5] = 12.0f;
  return x;
}

TEST(SamplingOrder, RadixOrderSamplesExactlyAsTheComparatorSort) {
  const std::vector<float> us = {0.0f, 0.123f, 0.5f, 0.87f, 0.999999f};
  for (int64_t V : {int64_t(300), int64_t(5003)}) {
    const std::vector<std::vector<float>> rows = {random_vector(V, 11, 6.0f), tied_logits(V, 12),
                                                  random_vector(V, 13, 0.01f)};
    for (const auto& row : rows)
      for (float T : {1.0f, 0.6f, 1.7f})
        for (int32_t top_k :
             {0, 40, int32_t(cpu::kPartialSortMax), int32_t(cpu::kPartialSortMax) + 1, int32_t(V) - 1, int32_t(V) + 5})
          for (float top_p : {1.0f, 0.95f, 0.3f})
            for (float u : us) expect_same_choice(row, T, top_k, top_p, u);
  }
}

TEST(SamplingOrder, TiesAmongManyCandidatesGoToTheLowerId) {
  // Every logit equal: each candidate has the same probability, so u picks the candidate at
  // rank floor(u * V), which the order says is id floor(u * V).
  const int64_t V = 4096;
  std::vector<float> flat(V, 0.25f);
  for (float u : {0.0f, 0.25f, 0.5f, 0.75f, 0.9999f}) {
    const cpu::SampleChoice c = cpu::sample_row(flat.data(), V, 1.0f, 0, 1.0f, u);
    EXPECT_NEAR(double(c.token), double(u) * V, 2.0) << u;
    expect_same_choice(flat, 1.0f, 0, 1.0f, u);
  }
}

TEST(SamplingOrder, FullQwenVocabularyRow) {
  const int64_t V = 151936;
  const std::vector<float> row = tied_logits(V, 21);
  for (int i = 0; i < 4; ++i) expect_same_choice(row, 1.0f, 0, i % 2 ? 0.9f : 1.0f, philox_uniform(5, 1, uint64_t(i)));
}

}  // namespace
}  // namespace lockstep
