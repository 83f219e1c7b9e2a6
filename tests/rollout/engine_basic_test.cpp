// The engine's basic behaviour: HF greedy parity, stops, aborts, and bad requests that
// leave the other requests undisturbed.
#include <gtest/gtest.h>

#include "core/error.h"
#include "rollout_test_helpers.h"

namespace lockstep::testing {
namespace {

using rollout::FinishReason;

TEST(RolloutEngine, GreedyMatchesHuggingFaceFloat32) {
  Engine engine = make_engine(Precision::float32);
  auto prompt = golden_ids("greedy.prompt");
  auto want = golden_ids("greedy.output");
  auto r = run_all_at_once(engine, {make_request(prompt, 0.0f, 0, 1.0f, 0, int64_t(want.size()))})[0];
  EXPECT_EQ(r.output_ids, want);  // greedy.output is the continuation only
  EXPECT_EQ(r.finish_reason, FinishReason::length);
}

TEST(RolloutEngine, StopTokenIdsEndWithStop) {
  auto request = make_request(golden_ids("seq0.input_ids"), 1.0f, 0, 1.0f, 5, 12);
  auto free_run = run_alone(Precision::float32, request);
  ASSERT_GE(free_run.output_ids.size(), 4u);
  request.stop_token_ids = {free_run.output_ids[3]};
  auto stopped = run_alone(Precision::float32, request);
  EXPECT_EQ(stopped.finish_reason, FinishReason::stop);
  // It stops at the first occurrence, keeping the stop token, and agrees bit for bit before it.
  size_t first = std::find(free_run.output_ids.begin(), free_run.output_ids.end(), free_run.output_ids[3]) -
                 free_run.output_ids.begin();
  ASSERT_EQ(stopped.output_ids.size(), first + 1);
  EXPECT_TRUE(std::equal(stopped.output_ids.begin(), stopped.output_ids.end(), free_run.output_ids.begin()));
  EXPECT_EQ(std::memcmp(stopped.logprobs.data(), free_run.logprobs.data(), stopped.logprobs.size() * 4), 0);
}

TEST(RolloutEngine, StopStringsUseTheDetokenizer) {
  auto request = make_request(golden_ids("seq1.input_ids"), 1.0f, 0, 1.0f, 6, 12);
  auto free_run = run_alone(Precision::float32, request);
  ASSERT_GE(free_run.output_ids.size(), 3u);
  EngineOptions options;
  options.detokenize = [](const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t id : ids) s += "<" + std::to_string(id) + ">";
    return s;
  };
  request.stop_strings = {"<" + std::to_string(free_run.output_ids[2]) + ">"};
  auto stopped = run_alone(Precision::float32, request, options);
  EXPECT_EQ(stopped.finish_reason, FinishReason::stop);
  EXPECT_LE(stopped.output_ids.size(), 3u);
  // Without a detokenizer the request is refused.
  Engine plain = make_engine(Precision::float32);
  EXPECT_THROW(plain.add_request(request), Error);
}

TEST(RolloutEngine, StopsAtTheContextEnd) {
  auto prompt = golden_ids("seq4.input_ids");
  while (prompt.size() < 509) prompt.push_back(prompt[prompt.size() % 130]);
  auto r = run_alone(Precision::float32, make_request(prompt, 1.0f, 0, 1.0f, 3, 50));
  EXPECT_EQ(r.output_ids.size(), 3u);  // positions 509, 510, 511
  EXPECT_EQ(r.finish_reason, FinishReason::length);
}

TEST(RolloutEngine, AbortReportsAbortAndKeepsTokens) {
  Engine engine = make_engine(Precision::float32);
  auto requests = mixed_requests();
  auto a = engine.add_request(requests[0]);
  auto b = engine.add_request(requests[1]);
  for (int i = 0; i < 4; ++i) engine.step();
  engine.abort(a);
  auto events = engine.step();
  bool reported = false;
  for (const auto& e : events) reported |= e.id == a && e.finish_reason == FinishReason::abort;
  EXPECT_TRUE(reported);
  engine.run_to_completion();
  auto ra = engine.take_result(a);
  EXPECT_EQ(ra.finish_reason, FinishReason::abort);
  EXPECT_EQ(ra.output_ids.size(), 4u);
  auto alone_a = run_alone(Precision::float32, requests[0]);
  EXPECT_TRUE(std::equal(ra.output_ids.begin(), ra.output_ids.end(), alone_a.output_ids.begin()));
  EXPECT_TRUE(same_result(engine.take_result(b), run_alone(Precision::float32, requests[1])));
  EXPECT_EQ(engine.pages().available(), engine.pages().num_pages());  // every page is back
}

std::string error_of(Engine& engine, const GenerationRequest& r) {
  try {
    engine.add_request(r);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(RolloutEngine, BadRequestsAreRefusedAndOthersUndisturbed) {
  for (Precision precision : {Precision::float32, Precision::bfloat16}) {
    Engine engine = make_engine(precision);
    auto good = mixed_requests();
    auto base = good[0];
    std::vector<std::pair<GenerationRequest, std::string>> bad;
    auto r = base;
    r.prompt.assign(600, 1);
    bad.push_back({r, "max_position_embeddings"});
    r = base;
    r.prompt.clear();
    bad.push_back({r, "empty"});
    r = base;
    r.prompt[3] = 512;
    bad.push_back({r, "input_ids[3] = 512"});
    r = base;
    r.prompt[0] = -1;
    bad.push_back({r, "input_ids[0] = -1"});
    r = base;
    r.sampling.top_p = 0.0f;
    bad.push_back({r, "top_p"});
    r = base;
    r.sampling.top_p = 1.5f;
    bad.push_back({r, "top_p"});
    r = base;
    r.sampling.temperature = -0.5f;
    bad.push_back({r, "temperature"});
    r = base;
    r.sampling.top_k = -2;
    bad.push_back({r, "top_k"});

    std::vector<rollout::RequestId> ids;
    for (size_t i = 0; i < good.size(); ++i) {
      ids.push_back(engine.add_request(good[i]));
      if (i < bad.size()) {
        std::string message = error_of(engine, bad[i].first);
        EXPECT_NE(message.find(bad[i].second), std::string::npos) << "got: '" << message << "'";
      }
      engine.step();
    }
    engine.run_to_completion();
    for (size_t i = 0; i < good.size(); ++i)
      EXPECT_TRUE(same_result(engine.take_result(ids[i]), run_alone(precision, good[i])))
          << precision_name(precision) << " request " << i;
  }
}

TEST(RolloutEngine, ZeroNewTokensFinishesAtOnce) {
  Engine engine = make_engine(Precision::float32);
  auto id = engine.add_request(make_request({1, 2, 3}, 1.0f, 0, 1.0f, 0, 0));
  auto events = engine.step();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].finish_reason, FinishReason::length);
  EXPECT_TRUE(engine.result(id).output_ids.empty());
}

}  // namespace
}  // namespace lockstep::testing
