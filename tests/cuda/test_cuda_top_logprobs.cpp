// Top log-probs on the CUDA runner (GenerationRequest::top_logprobs), by the CPU's contract: per
// generated token the N most likely tokens of the log-softmax the token was drawn from, ordered by
// log-prob with ties to the lower id; the sampled token's entry has the bits of its log-prob; at
// T = 0 or 1 each value is the runner's score of that token after the same prefix; and a request
// alone or in a batch of others (with and without top log-probs) gets the same bytes.
#include <cstring>

#include "../rollout/rollout_test_helpers.h"
#include "cuda_test_util.h"
#include "model/runner_score.h"

namespace lockstep::testing {
namespace {

constexpr int32_t kTop = 20;

std::unique_ptr<ModelRunner> cuda_runner() {
  return make_runner(Device::cuda, fixture_weights(Precision::bfloat16).clone(), Precision::bfloat16);
}

Engine cuda_engine() { return Engine(cuda_runner(), EngineOptions{}); }

bool same_float(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

bool same_tops(const std::vector<std::vector<TopLogprob>>& a, const std::vector<std::vector<TopLogprob>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t t = 0; t < a.size(); ++t) {
    if (a[t].size() != b[t].size()) return false;
    for (size_t i = 0; i < a[t].size(); ++i)
      if (a[t][i].token != b[t][i].token || !same_float(a[t][i].logprob, b[t][i].logprob)) return false;
  }
  return true;
}

// Greedy, T = 1, T = 1 with top-k and top-p (the token drawn on the host), and T = 0.7.
std::vector<GenerationRequest> top_requests() {
  const std::vector<GenerationRequest> mixed = mixed_requests();
  std::vector<GenerationRequest> r = {mixed[7], mixed[0], mixed[4], mixed[3]};
  r[3].sampling.temperature = 0.7f;
  for (auto& x : r) x.top_logprobs = kTop;
  return r;
}

const std::vector<RequestResult>& alone() {
  static std::vector<RequestResult> out;
  if (out.empty())
    for (const auto& r : top_requests()) {
      Engine e = cuda_engine();
      out.push_back(run_all_at_once(e, {r})[0]);
    }
  return out;
}

TEST(CudaTopLogprobs, SortedAndTheSampledTokensEntryIsItsLogprob) {
  LS_SKIP_WITHOUT_GPU();
  for (size_t q = 0; q < alone().size(); ++q) {
    const RequestResult& res = alone()[q];
    ASSERT_EQ(res.top_logprobs.size(), res.output_ids.size()) << "request " << q;
    for (size_t t = 0; t < res.output_ids.size(); ++t) {
      const auto& top = res.top_logprobs[t];
      ASSERT_EQ(top.size(), size_t(kTop));
      if (q == 0) {  // greedy: the top-1 is the token
        EXPECT_EQ(top[0].token, res.output_ids[t]) << "token " << t;
        EXPECT_TRUE(same_float(top[0].logprob, res.logprobs[t])) << "token " << t;
      }
      for (size_t i = 0; i < top.size(); ++i) {
        EXPECT_LE(top[i].logprob, 0.0f);
        if (top[i].token == res.output_ids[t]) EXPECT_TRUE(same_float(top[i].logprob, res.logprobs[t]));
        if (i > 0)
          EXPECT_TRUE(top[i - 1].logprob > top[i].logprob ||
                      (top[i - 1].logprob == top[i].logprob && top[i - 1].token < top[i].token))
              << "request " << q << " token " << t << " rank " << i;
      }
      // A token ranked below the last listed one cannot be more likely than it.
      if (res.logprobs[t] > top.back().logprob) {
        bool listed = false;
        for (const auto& x : top) listed = listed || x.token == res.output_ids[t];
        EXPECT_TRUE(listed) << "request " << q << " token " << t;
      }
    }
  }
}

TEST(CudaTopLogprobs, ValuesAreTheRunnersScoreOfEachCandidate) {
  LS_SKIP_WITHOUT_GPU();
  auto runner = cuda_runner();
  const auto requests = top_requests();
  for (size_t q = 0; q < 3; ++q) {  // T = 0 and T = 1: the score path's log-softmax
    const RequestResult& res = alone()[q];
    std::vector<std::vector<int32_t>> seqs;
    for (size_t t = 0; t < res.output_ids.size(); ++t)
      for (const TopLogprob& x : res.top_logprobs[t]) {
        std::vector<int32_t> s = concat(requests[q].prompt, head(res.output_ids, t));
        s.push_back(x.token);
        seqs.push_back(std::move(s));
      }
    const auto scored = runner_score_sequences(*runner, seqs);
    size_t k = 0;
    for (size_t t = 0; t < res.output_ids.size(); ++t)
      for (size_t i = 0; i < res.top_logprobs[t].size(); ++i, ++k)
        EXPECT_TRUE(same_float(res.top_logprobs[t][i].logprob, scored[k].back()))
            << "request " << q << " token " << t << " rank " << i;
  }
}

TEST(CudaTopLogprobs, AloneAndInABatchGiveTheSameBytes) {
  LS_SKIP_WITHOUT_GPU();
  std::vector<GenerationRequest> batch = top_requests();
  for (const auto& r : mixed_requests()) batch.push_back(r);  // neighbours without top log-probs
  Engine e = cuda_engine();
  const auto together = run_all_at_once(e, batch);
  for (size_t q = 0; q < alone().size(); ++q) {
    EXPECT_TRUE(same_result(together[q], alone()[q])) << "request " << q;
    EXPECT_TRUE(same_tops(together[q].top_logprobs, alone()[q].top_logprobs)) << "request " << q;
  }
  for (size_t q = alone().size(); q < batch.size(); ++q) EXPECT_TRUE(together[q].top_logprobs.empty());
}

}  // namespace
}  // namespace lockstep::testing
