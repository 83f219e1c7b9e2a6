// Weight versions: every token records the version that produced it, no output mixes
// versions, the abort policy reports "abort", and an update flushes the prefix cache.
#include <gtest/gtest.h>

#include "rollout_test_helpers.h"

namespace lockstep::testing {
namespace {

using rollout::FinishReason;
using rollout::UpdatePolicy;

bool all_versions(const RequestResult& r, int64_t v) {
  return std::all_of(r.weight_versions.begin(), r.weight_versions.end(), [v](int64_t x) { return x == v; });
}

TEST(WeightUpdate, SameWeightsGiveTheSameBitsUnderTheNextVersion) {
  for (Precision precision : {Precision::float32, Precision::bfloat16}) {
    Engine engine = make_engine(precision);
    auto requests = mixed_requests();
    auto before = run_all_at_once(engine, requests);
    EXPECT_EQ(engine.weight_version(), 0);
    EXPECT_GT(engine.pages().cached_pages(), 0);
    engine.update_weights(fixture_weights(precision), UpdatePolicy::finish);
    EXPECT_EQ(engine.weight_version(), 1);
    EXPECT_EQ(engine.pages().cached_pages(), 0);
    auto after = run_all_at_once(engine, requests);
    expect_same_results(after, before, precision_name(precision));
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_TRUE(all_versions(before[i], 0));
      EXPECT_TRUE(all_versions(after[i], 1));
      EXPECT_EQ(after[i].weight_versions.size(), after[i].output_ids.size());
    }
  }
}

TEST(WeightUpdate, FinishPolicyDrainsStartedRequestsUnderTheOldVersion) {
  const Precision precision = Precision::float32;
  auto requests = mixed_requests();
  EngineOptions o;
  o.max_batch_tokens = 64;
  Engine engine = make_engine(precision, o);
  auto a = engine.add_request(requests[0]);
  auto b = engine.add_request(requests[4]);
  engine.step();
  engine.step();
  auto c = engine.add_request(requests[3]);  // arrives during the run, starts after the update
  auto drained = engine.update_weights(fixture_weights(precision), UpdatePolicy::finish);
  EXPECT_FALSE(drained.empty());
  EXPECT_TRUE(engine.result(a).finished());
  EXPECT_TRUE(engine.result(b).finished());
  EXPECT_TRUE(engine.result(c).output_ids.empty());
  engine.run_to_completion();
  auto ra = engine.take_result(a), rb = engine.take_result(b), rc = engine.take_result(c);
  EXPECT_TRUE(all_versions(ra, 0) && all_versions(rb, 0));
  EXPECT_TRUE(all_versions(rc, 1));
  EXPECT_TRUE(same_result(ra, run_alone(precision, requests[0])));
  EXPECT_TRUE(same_result(rb, run_alone(precision, requests[4])));
  EXPECT_TRUE(same_result(rc, run_alone(precision, requests[3])));
}

TEST(WeightUpdate, AbortPolicyAbortsStartedRequests) {
  const Precision precision = Precision::float32;
  auto requests = mixed_requests();
  Engine engine = make_engine(precision);
  auto a = engine.add_request(requests[0]);
  for (int i = 0; i < 3; ++i) engine.step();
  auto c = engine.add_request(requests[1]);
  auto events = engine.update_weights(fixture_weights(precision), UpdatePolicy::abort);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].id, a);
  EXPECT_EQ(events[0].finish_reason, FinishReason::abort);
  engine.run_to_completion();
  auto ra = engine.take_result(a), rc = engine.take_result(c);
  EXPECT_EQ(ra.finish_reason, FinishReason::abort);
  EXPECT_EQ(ra.output_ids.size(), 3u);
  EXPECT_TRUE(all_versions(ra, 0));
  EXPECT_TRUE(all_versions(rc, 1));
  EXPECT_TRUE(same_result(rc, run_alone(precision, requests[1])));
}

TEST(WeightUpdate, NewWeightsFlushTheCacheAndMatchAFreshEngine) {
  // If the cache kept K/V of the old weights, the second run would hit it and differ from a
  // fresh engine built with the new weights.
  const Precision precision = Precision::bfloat16;
  auto requests = mixed_requests();
  ModelWeights other = ModelWeights::random(fixture_weights(precision).config, 7, precision);
  Engine engine = make_engine(precision);
  auto before = run_all_at_once(engine, requests);
  engine.update_weights(other, UpdatePolicy::finish);
  auto after = run_all_at_once(engine, requests);
  Engine fresh(make_cpu_runner(other.clone(), precision), {});
  auto want = run_all_at_once(fresh, requests);
  expect_same_results(after, want, "after update");
  EXPECT_NE(after[0].output_ids, before[0].output_ids);
  EXPECT_TRUE(all_versions(after[0], 1));
}

}  // namespace
}  // namespace lockstep::testing
