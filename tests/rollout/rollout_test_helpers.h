// Shared helpers for the rollout engine tests: the fixture model, a request set with mixed
// lengths, shared prefixes and sampling settings, and a driver that runs an arrival schedule.
#pragma once
#include <gtest/gtest.h>

#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "../model/test_helpers.h"
#include "model/runner.h"
#include "rollout/engine.h"

namespace lockstep::testing {

using rollout::Engine;
using rollout::EngineOptions;
using rollout::GenerationRequest;
using rollout::RequestResult;

// The fixture's weights, loaded once per recipe; callers get clones.
inline const ModelWeights& fixture_weights(Precision precision) {
  static std::map<Precision, ModelWeights> cache;
  auto it = cache.find(precision);
  if (it == cache.end()) it = cache.emplace(precision, ModelWeights::load(fixture_model_dir(), precision)).first;
  return it->second;
}

inline Engine make_engine(Precision precision, EngineOptions options = {}) {
  return Engine(make_cpu_runner(fixture_weights(precision).clone(), precision), std::move(options));
}

inline GenerationRequest make_request(std::vector<int32_t> prompt, float temperature, int32_t top_k, float top_p,
                                      uint64_t seed, int64_t max_new_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.sampling = {temperature, top_k, top_p, seed};
  r.max_new_tokens = max_new_tokens;
  return r;
}

inline std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

inline std::vector<int32_t> head(const std::vector<int32_t>& a, size_t n) {
  return std::vector<int32_t>(a.begin(), a.begin() + std::min(n, a.size()));
}

// Eight requests: prompt lengths 1..150, two pairs sharing long prefixes, temperature 1 with
// and without top-k/top-p, one greedy.
inline std::vector<GenerationRequest> mixed_requests() {
  auto s0 = golden_ids("seq0.input_ids"), s1 = golden_ids("seq1.input_ids"), s2 = golden_ids("seq2.input_ids");
  auto s3 = golden_ids("seq3.input_ids"), s4 = golden_ids("seq4.input_ids");
  std::vector<GenerationRequest> r;
  r.push_back(make_request(s0, 1.0f, 0, 1.0f, 11, 12));                              // 37
  r.push_back(make_request(s1, 1.0f, 20, 1.0f, 12, 10));                             // 5, top-k
  r.push_back(make_request(s2, 1.0f, 0, 0.9f, 13, 9));                               // 64, top-p
  r.push_back(make_request(s3, 1.0f, 0, 1.0f, 14, 14));                              // 1
  r.push_back(make_request(s4, 1.0f, 40, 0.8f, 15, 8));                              // 130, both
  r.push_back(make_request(concat(s4, head(s0, 20)), 1.0f, 0, 1.0f, 16, 11));        // 150, shares 130
  r.push_back(make_request(concat(head(s2, 48), head(s1, 3)), 1.0f, 0, 1.0f, 17, 13));  // 51, shares 48
  r.push_back(make_request(head(s0, 23), 0.0f, 0, 1.0f, 18, 10));                    // 23, greedy
  return r;
}

// Adds request order[j] just before step arrival_step[j] (0 = before the first step) and runs
// to completion; results come back indexed like `requests`.
inline std::vector<RequestResult> run_schedule(Engine& engine, const std::vector<GenerationRequest>& requests,
                                               const std::vector<int>& order,
                                               const std::vector<int64_t>& arrival_step) {
  std::vector<rollout::RequestId> ids(requests.size());
  size_t next = 0;
  for (int64_t step = 0; next < order.size() || engine.has_unfinished(); ++step) {
    while (next < order.size() && arrival_step[next] <= step) {
      ids[order[next]] = engine.add_request(requests[order[next]]);
      ++next;
    }
    engine.step();
  }
  std::vector<RequestResult> out;
  for (auto id : ids) out.push_back(engine.take_result(id));
  return out;
}

inline std::vector<RequestResult> run_all_at_once(Engine& engine, const std::vector<GenerationRequest>& requests) {
  std::vector<int> order(requests.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
  return run_schedule(engine, requests, order, std::vector<int64_t>(order.size(), 0));
}

inline RequestResult run_alone(Precision precision, const GenerationRequest& request, EngineOptions options = {}) {
  Engine engine = make_engine(precision, options);
  return run_all_at_once(engine, {request})[0];
}

inline bool same_result(const RequestResult& a, const RequestResult& b) {
  return a.output_ids == b.output_ids && same_bits(a.logprobs, b.logprobs) && a.finish_reason == b.finish_reason;
}

inline void expect_same_results(const std::vector<RequestResult>& got, const std::vector<RequestResult>& want,
                                const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_TRUE(same_result(got[i], want[i])) << what << ": request " << i << " differs from its alone run";
  }
}

}  // namespace lockstep::testing
