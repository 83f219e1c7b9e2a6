// Top log-probs (GenerationRequest::top_logprobs): per generated token, the N most likely
// tokens of the same canonical log-softmax the sampled token's log-prob comes from. The top-1
// of a greedy request is its token, every value is the trainer's score of that token after the
// same prefix bit for bit, and the list is ordered by log-prob with ties to the lower id.
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "kernels/cpu/sampling.h"
#include "model/qwen3_moe.h"
#include "rollout_test_helpers.h"

namespace lockstep::testing {
namespace {

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

TEST(TopLogprobs, AreTheScoresOfTheMostLikelyTokens) {
  for (Precision p : {Precision::float32, Precision::bfloat16}) {
    Engine engine = make_engine(p);
    const Qwen3Moe model(fixture_weights(p).clone(), p);
    const std::vector<int32_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
    for (float temperature : {0.0f, 1.0f}) {
      GenerationRequest r = make_request(prompt, temperature, 0, 1.0f, 11, 6);
      r.top_logprobs = 5;
      const auto id = engine.add_request(r);
      engine.run_to_completion();
      const RequestResult res = engine.take_result(id);
      ASSERT_EQ(res.top_logprobs.size(), res.output_ids.size());
      // Score every listed token after its prefix, as `lockstep score` does.
      std::vector<std::vector<int32_t>> seqs;
      for (size_t t = 0; t < res.output_ids.size(); ++t)
        for (const TopLogprob& x : res.top_logprobs[t]) {
          std::vector<int32_t> s = prompt;
          s.insert(s.end(), res.output_ids.begin(), res.output_ids.begin() + int64_t(t));
          s.push_back(x.token);
          seqs.push_back(std::move(s));
        }
      const auto scored = score_sequences(model, seqs);
      size_t k = 0;
      for (size_t t = 0; t < res.output_ids.size(); ++t) {
        const auto& top = res.top_logprobs[t];
        ASSERT_EQ(top.size(), 5u);
        if (temperature == 0.0f) {
          EXPECT_EQ(top[0].token, res.output_ids[t]);
          EXPECT_TRUE(same_bits(top[0].logprob, res.logprobs[t]));
        }
        for (size_t i = 0; i < top.size(); ++i, ++k) {
          EXPECT_TRUE(same_bits(top[i].logprob, scored[k].back())) << "token " << t << " rank " << i;
          if (top[i].token == res.output_ids[t]) {
            EXPECT_TRUE(same_bits(top[i].logprob, res.logprobs[t]));
          }
          if (i > 0) {
            EXPECT_TRUE(top[i - 1].logprob > top[i].logprob ||
                        (top[i - 1].logprob == top[i].logprob && top[i - 1].token < top[i].token));
          }
        }
      }
    }
  }
}

TEST(TopLogprobs, TiesGoToTheLowerIdAndTheRangeIsChecked) {
  const std::vector<float> logits = {1.0f, 3.0f, 2.0f, 3.0f, 3.0f};
  int32_t tokens[4];
  float values[4];
  cpu::top_logprobs_row(logits.data(), 5, 0.0f, 4, tokens, values);
  EXPECT_EQ(std::vector<int32_t>(tokens, tokens + 4), (std::vector<int32_t>{1, 3, 4, 2}));
  EXPECT_TRUE(same_bits(values[0], values[2]));
  EXPECT_LT(values[3], values[0]);
  Engine engine = make_engine(Precision::float32);
  GenerationRequest r = make_request({1, 2}, 0.0f, 0, 1.0f, 0, 2);
  r.top_logprobs = 21;
  try {
    engine.add_request(r);
    FAIL() << "accepted";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "top_logprobs = 21 is outside [0, 20]");
  }
  r.top_logprobs = 0;
  const auto id = engine.add_request(r);
  engine.run_to_completion();
  EXPECT_TRUE(engine.take_result(id).top_logprobs.empty());  // not asked: not reported
}

}  // namespace
}  // namespace lockstep::testing
