// D1/D2/D5 through the engine: a request's tokens and log-prob bits do not depend on what runs
// with it, arrival order, step budget, chunked prefill, page size, prefix-cache hits or
// preemption, and equal the trainer's whole-sequence score_sequences bit for bit.
#include <gtest/gtest.h>

#include <cstdio>

#include "rollout_test_helpers.h"

namespace lockstep::testing {
namespace {

class EngineInvariance : public ::testing::TestWithParam<Precision> {
 protected:
  Precision precision() const { return GetParam(); }
  const std::vector<GenerationRequest>& requests() {
    static const auto r = mixed_requests();
    return r;
  }
  // Each request run alone in a fresh engine: the reference every other run must equal.
  const std::vector<RequestResult>& alone() {
    static std::map<Precision, std::vector<RequestResult>> cache;
    auto& out = cache[precision()];
    if (out.empty())
      for (const auto& r : requests()) out.push_back(run_alone(precision(), r));
    return out;
  }
  void expect_alone(const std::vector<RequestResult>& got, const std::string& what) {
    expect_same_results(got, alone(), std::string(precision_name(precision())) + " " + what);
  }
};

TEST_P(EngineInvariance, AloneRunsAreSane) {
  for (size_t i = 0; i < alone().size(); ++i) {
    const auto& r = alone()[i];
    EXPECT_EQ(int64_t(r.output_ids.size()), requests()[i].max_new_tokens);
    for (float lp : r.logprobs) EXPECT_LE(lp, 0.0f);
  }
  // Different seeds give different samples (the sampler is really random).
  auto other = requests()[0];
  other.sampling.seed += 1000;
  EXPECT_NE(run_alone(precision(), other).output_ids, alone()[0].output_ids);
}

TEST_P(EngineInvariance, AllTogetherInSeveralOrdersAndBudgets) {
  const int n = int(requests().size());
  std::vector<std::vector<int>> orders = {{0, 1, 2, 3, 4, 5, 6, 7}, {7, 6, 5, 4, 3, 2, 1, 0}, {4, 0, 6, 2, 7, 1, 5, 3}};
  for (int64_t budget : {4096, 96, 13}) {
    for (const auto& order : orders) {
      EngineOptions o;
      o.max_batch_tokens = budget;
      Engine engine = make_engine(precision(), o);
      expect_alone(run_schedule(engine, requests(), order, std::vector<int64_t>(n, 0)),
                   "budget " + std::to_string(budget));
    }
  }
}

TEST_P(EngineInvariance, RequestsArrivingMidRun) {
  EngineOptions o;
  o.max_batch_tokens = 64;
  Engine engine = make_engine(precision(), o);
  expect_alone(run_schedule(engine, requests(), {2, 5, 0, 7, 1, 4, 6, 3}, {0, 0, 1, 3, 4, 9, 9, 15}), "mid-run");
}

TEST_P(EngineInvariance, ChunkedPrefillAtSeveralChunkSizes) {
  for (int64_t chunk : {1, 7, 16, 64}) {
    EngineOptions o;
    o.prefill_chunk = chunk;
    o.max_batch_tokens = chunk == 1 ? 4096 : 100;
    Engine engine = make_engine(precision(), o);
    expect_alone(run_all_at_once(engine, requests()), "chunk " + std::to_string(chunk));
  }
}

TEST_P(EngineInvariance, PageSizeDoesNotMatter) {
  for (int64_t page : {1, 5, 64}) {
    EngineOptions o;
    o.page_size = page;
    o.kv_pages = 4096 / page;
    Engine engine = make_engine(precision(), o);
    expect_alone(run_all_at_once(engine, requests()), "page size " + std::to_string(page));
  }
}

TEST_P(EngineInvariance, PrefixCacheHits) {
  // Same prompt twice with the same seed, and the prefix-sharing requests, arriving after the
  // first has filled (and published) its pages.
  std::vector<GenerationRequest> reqs = requests();
  reqs.push_back(requests()[4]);  // identical to request 4
  reqs.push_back(requests()[0]);  // identical to request 0
  EngineOptions o;
  o.max_batch_tokens = 64;
  Engine engine = make_engine(precision(), o);
  auto got = run_schedule(engine, reqs, {4, 0, 2, 5, 6, 8, 9, 1, 3, 7}, {0, 0, 0, 6, 6, 7, 7, 8, 8, 8});
  EXPECT_GT(engine.stats().prefix_hit_tokens, 200);
  std::vector<RequestResult> want = alone();
  want.push_back(alone()[4]);
  want.push_back(alone()[0]);
  expect_same_results(got, want, std::string(precision_name(precision())) + " prefix hits");
}

TEST_P(EngineInvariance, NSamplesOfOnePromptShareItsPages) {
  // The GRPO pattern: n samples of one prompt, distinct seeds; the later ones hit the cache.
  std::vector<GenerationRequest> samples;
  for (uint64_t s = 0; s < 4; ++s) samples.push_back(make_request(requests()[5].prompt, 1.0f, 0, 1.0f, 100 + s, 6));
  EngineOptions o;
  o.max_batch_tokens = 64;
  Engine engine = make_engine(precision(), o);
  auto got = run_schedule(engine, samples, {0, 1, 2, 3}, {0, 3, 3, 4});
  EXPECT_GE(engine.stats().prefix_hit_tokens, 3 * 144);
  std::vector<RequestResult> want;
  for (const auto& r : samples) want.push_back(run_alone(precision(), r));
  expect_same_results(got, want, std::string(precision_name(precision())) + " n samples");
  EXPECT_NE(got[0].output_ids, got[1].output_ids);
}

TEST_P(EngineInvariance, PreemptionAndRecompute) {
  // The largest request needs 11 pages of 16; 12 pages force preemptions.
  for (bool cache : {true, false}) {
    EngineOptions o;
    o.kv_pages = 12;
    o.prefix_cache = cache;
    o.max_batch_tokens = 80;
    Engine engine = make_engine(precision(), o);
    expect_alone(run_all_at_once(engine, requests()), cache ? "preemption (cache)" : "preemption (no cache)");
    EXPECT_GT(engine.stats().preemptions, 0);
    EXPECT_EQ(engine.pages().available(), engine.pages().num_pages());
  }
}

TEST_P(EngineInvariance, LogprobsEqualTheTrainersScore) {
  // Temperature 1 (top-k/top-p report the untruncated log-prob) and greedy (log-prob under T=1).
  Qwen3Moe model(fixture_weights(precision()).clone(), precision());
  std::vector<std::vector<int32_t>> seqs;
  for (size_t i = 0; i < requests().size(); ++i) seqs.push_back(concat(requests()[i].prompt, alone()[i].output_ids));
  auto scored = score_sequences(model, seqs);
  for (size_t i = 0; i < requests().size(); ++i) {
    const size_t p = requests()[i].prompt.size();
    std::vector<float> tail(scored[i].begin() + (p - 1), scored[i].end());
    EXPECT_TRUE(same_bits(tail, alone()[i].logprobs)) << precision_name(precision()) << " request " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Recipes, EngineInvariance, ::testing::Values(Precision::float32, Precision::bfloat16),
                         [](const auto& info) { return std::string(precision_name(info.param)); });

}  // namespace
}  // namespace lockstep::testing
