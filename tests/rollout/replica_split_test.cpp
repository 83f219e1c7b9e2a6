// Outcomes of requests split over engine replicas: the wire form round-trips every field
// and refuses damaged input, and one replica runs every request like a plain engine.
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "rollout/replica_split.h"
#include "rollout_test_helpers.h"

namespace lockstep::rollout {
namespace {

std::vector<std::pair<uint64_t, RequestOutcome>> sample_outcomes() {
  RequestOutcome a, b, c;
  a.result.output_ids = {5, 9, 2};
  a.result.logprobs = {-0.5f, -1.25f, -3e-8f};
  a.result.weight_versions = {3, 3, 4};
  a.result.finish_reason = FinishReason::stop;
  b.error = "in.jsonl:7: prompt: token id 99999 is out of range";
  c.result.finish_reason = FinishReason::length;  // no tokens at all
  return {{4, a}, {0, b}, {11, c}};
}

TEST(ReplicaSplit, OutcomesRoundTripEveryField) {
  const auto in = sample_outcomes();
  const auto out = decode_outcomes(encode_outcomes(in));
  ASSERT_EQ(out.size(), in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ(out[i].first, in[i].first);
    EXPECT_EQ(out[i].second.error, in[i].second.error);
    EXPECT_EQ(out[i].second.result.output_ids, in[i].second.result.output_ids);
    ASSERT_EQ(out[i].second.result.logprobs.size(), in[i].second.result.logprobs.size());
    if (!in[i].second.result.logprobs.empty()) {  // memcmp may not be given null pointers
      EXPECT_EQ(std::memcmp(out[i].second.result.logprobs.data(), in[i].second.result.logprobs.data(),
                            in[i].second.result.logprobs.size() * sizeof(float)),
                0);
    }
    EXPECT_EQ(out[i].second.result.weight_versions, in[i].second.result.weight_versions);
    EXPECT_EQ(out[i].second.result.finish_reason, in[i].second.result.finish_reason);
  }
  EXPECT_TRUE(decode_outcomes("").empty());
}

// Every truncation and a bad finish reason are refused with an error, never read past.
TEST(ReplicaSplit, DamagedBytesAreRefused) {
  const std::string bytes = encode_outcomes(sample_outcomes());
  int refused = 0;
  for (size_t n = 1; n < bytes.size(); ++n) {
    try {
      decode_outcomes(bytes.substr(0, n));
    } catch (const Error&) {
      ++refused;
    }
  }
  // A cut at an entry boundary is a shorter valid list; every other cut is refused.
  EXPECT_GE(refused, int(bytes.size()) - 3);
  std::string bad = encode_outcomes({sample_outcomes()[2]});
  bad[bad.size() - 4] = 9;  // finish reason 9
  EXPECT_THROW(decode_outcomes(bad), Error);
  std::string huge = bytes;
  const uint64_t big = uint64_t(1) << 60;  // the error string's length
  std::memcpy(huge.data() + 8, &big, sizeof(big));
  EXPECT_THROW(decode_outcomes(huge), Error);
}

TEST(ReplicaSplit, OneReplicaRunsEveryRequestLikeAPlainEngine) {
  const Precision p = Precision::float32;
  std::vector<std::optional<GenerationRequest>> reqs;
  for (int i = 0; i < 4; ++i) {
    GenerationRequest q;
    q.prompt = {int32_t(3 + i), 7, int32_t(11 * i % 50)};
    q.max_new_tokens = 3 + i;
    q.sampling.seed = 40 + uint64_t(i);
    reqs.push_back(q);
  }
  reqs[1].reset();
  GenerationRequest bad;
  bad.prompt = {};  // refused by add_request
  reqs.push_back(bad);
  const ModelWeights& w = lockstep::testing::fixture_weights(p);
  Engine plain(make_cpu_runner(w.clone(), p), {});
  Engine split(make_cpu_runner(w.clone(), p), {});
  const auto got = run_on_replicas(split, reqs, 1, 0, nullptr);
  ASSERT_EQ(got.size(), reqs.size());
  EXPECT_FALSE(got[4].error.empty());
  for (size_t i = 0; i < 4; ++i) {
    if (!reqs[i]) continue;
    const RequestId id = plain.add_request(*reqs[i]);
    plain.run_to_completion();
    const RequestResult want = plain.take_result(id);
    EXPECT_TRUE(got[i].error.empty());
    EXPECT_EQ(got[i].result.output_ids, want.output_ids) << i;
    EXPECT_EQ(std::memcmp(got[i].result.logprobs.data(), want.logprobs.data(), want.logprobs.size() * sizeof(float)),
              0)
        << i;
  }
  EXPECT_THROW(run_on_replicas(split, reqs, 2, 2, nullptr), Error);
}

}  // namespace
}  // namespace lockstep::rollout
