// The rollout engine on the CUDA runner (bfloat16 recipe): a request's tokens and log-prob
// bits do not depend on what runs with it, the arrival order, the step budget, chunked
// prefill, the page size, prefix-cache hits or preemption (D1), and equal the runner's
// whole-sequence score (D2) bit for bit.
#include "../rollout/rollout_test_helpers.h"
#include "cuda_test_util.h"
#include "model/cuda/cuda_runner.h"
#include "model/runner_score.h"

namespace lockstep::testing {
namespace {

Engine make_cuda_engine(EngineOptions options = {}) {
  return Engine(make_runner(Device::cuda, fixture_weights(Precision::bfloat16).clone(), Precision::bfloat16),
                std::move(options));
}

const std::vector<GenerationRequest>& requests() {
  static const auto r = mixed_requests();
  return r;
}

// Each request alone in a fresh engine: the reference every other run must equal.
const std::vector<RequestResult>& alone() {
  static std::vector<RequestResult> out;
  if (out.empty())
    for (const auto& r : requests()) {
      Engine e = make_cuda_engine();
      out.push_back(run_all_at_once(e, {r})[0]);
    }
  return out;
}

TEST(CudaEngine, AloneRunsAreSane) {
  LS_SKIP_WITHOUT_GPU();
  for (size_t i = 0; i < alone().size(); ++i) {
    EXPECT_EQ(int64_t(alone()[i].output_ids.size()), requests()[i].max_new_tokens);
    for (float lp : alone()[i].logprobs) EXPECT_LE(lp, 0.0f);
  }
}

TEST(CudaEngine, BatchedInSeveralOrdersAndBudgets) {
  LS_SKIP_WITHOUT_GPU();
  const int n = int(requests().size());
  for (int64_t budget : {4096, 13})
    for (const std::vector<int>& order : {std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}, {4, 0, 6, 2, 7, 1, 5, 3}}) {
      EngineOptions o;
      o.max_batch_tokens = budget;
      Engine e = make_cuda_engine(o);
      expect_same_results(run_schedule(e, requests(), order, std::vector<int64_t>(n, 0)), alone(),
                          "budget " + std::to_string(budget));
    }
  EngineOptions o;
  o.max_batch_tokens = 64;
  Engine e = make_cuda_engine(o);
  expect_same_results(run_schedule(e, requests(), {2, 5, 0, 7, 1, 4, 6, 3}, {0, 0, 1, 3, 4, 9, 9, 15}), alone(),
                      "arriving mid-run");
}

TEST(CudaEngine, ChunkedPrefillAndPageSizes) {
  LS_SKIP_WITHOUT_GPU();
  for (int64_t chunk : {1, 7, 64}) {
    EngineOptions o;
    o.prefill_chunk = chunk;
    o.max_batch_tokens = chunk == 1 ? 4096 : 100;
    Engine e = make_cuda_engine(o);
    expect_same_results(run_all_at_once(e, requests()), alone(), "chunk " + std::to_string(chunk));
  }
  for (int64_t page : {1, 5, 64}) {
    EngineOptions o;
    o.page_size = page;
    o.kv_pages = 4096 / page;
    Engine e = make_cuda_engine(o);
    expect_same_results(run_all_at_once(e, requests()), alone(), "page size " + std::to_string(page));
  }
}

TEST(CudaEngine, PrefixCacheHitsAndPreemption) {
  LS_SKIP_WITHOUT_GPU();
  std::vector<GenerationRequest> reqs = requests();
  reqs.push_back(requests()[4]);
  reqs.push_back(requests()[0]);
  EngineOptions o;
  o.max_batch_tokens = 64;
  Engine e = make_cuda_engine(o);
  auto got = run_schedule(e, reqs, {4, 0, 2, 5, 6, 8, 9, 1, 3, 7}, {0, 0, 0, 6, 6, 7, 7, 8, 8, 8});
  EXPECT_GT(e.stats().prefix_hit_tokens, 200);
  std::vector<RequestResult> want = alone();
  want.push_back(alone()[4]);
  want.push_back(alone()[0]);
  expect_same_results(got, want, "prefix hits");
  for (bool cache : {true, false}) {
    EngineOptions p;
    p.kv_pages = 12;
    p.prefix_cache = cache;
    p.max_batch_tokens = 80;
    Engine pe = make_cuda_engine(p);
    expect_same_results(run_all_at_once(pe, requests()), alone(), cache ? "preemption (cache)" : "preemption");
    EXPECT_GT(pe.stats().preemptions, 0);
  }
}

TEST(CudaEngine, LogprobsEqualTheWholeSequenceScore) {
  LS_SKIP_WITHOUT_GPU();
  auto runner = make_runner(Device::cuda, fixture_weights(Precision::bfloat16).clone(), Precision::bfloat16);
  std::vector<std::vector<int32_t>> seqs;
  for (size_t i = 0; i < requests().size(); ++i) seqs.push_back(concat(requests()[i].prompt, alone()[i].output_ids));
  auto scored = runner_score_sequences(*runner, seqs);
  for (size_t i = 0; i < requests().size(); ++i) {
    const size_t p = requests()[i].prompt.size();
    std::vector<float> tail(scored[i].begin() + (p - 1), scored[i].end());
    EXPECT_TRUE(same_bits(tail, alone()[i].logprobs)) << "request " << i;
  }
}

}  // namespace
}  // namespace lockstep::testing
