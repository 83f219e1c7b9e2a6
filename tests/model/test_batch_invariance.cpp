// D1 on the CPU: a sequence's log-probs are the same bits alone, in any batch, in any
// order, and with any thread count.
#include <gtest/gtest.h>

#include <algorithm>

#include "core/thread_pool.h"
#include "model/runner_score.h"
#include "test_helpers.h"

namespace lockstep {
namespace {

using testing::fixture_model_dir;
using testing::golden_ids;
using testing::same_bits;

class BatchInvariance : public ::testing::TestWithParam<Precision> {};

TEST_P(BatchInvariance, AloneBatchedReorderedAndThreaded) {
  Precision p = GetParam();
  Qwen3Moe model(ModelWeights::load(fixture_model_dir(), p), p);
  std::vector<std::vector<int32_t>> seqs;
  for (int i = 0; i < 5; ++i) seqs.push_back(golden_ids("seq" + std::to_string(i) + ".input_ids"));
  std::vector<std::vector<float>> alone;
  for (const auto& s : seqs) alone.push_back(score_sequences(model, {s})[0]);

  auto check = [&](const std::vector<int>& order, int64_t budget, int threads) {
    set_num_threads(threads);
    std::vector<std::vector<int32_t>> batch;
    for (int i : order) batch.push_back(seqs[i]);
    auto out = score_sequences(model, batch, budget);
    for (size_t j = 0; j < order.size(); ++j)
      EXPECT_TRUE(same_bits(out[j], alone[order[j]]))
          << "seq" << order[j] << " at batch slot " << j << ", budget " << budget << ", threads " << threads;
  };
  check({0, 1, 2, 3, 4}, 1 << 20, 2);
  check({4, 3, 2, 1, 0}, 1 << 20, 1);
  check({2, 0, 4, 1, 3}, 100, 3);
  check({1, 1, 3, 2, 2, 0}, 1 << 20, 4);  // duplicates in one batch
  set_num_threads(2);
  // The runner path (the engine's runner, as `score --device cuda` drives its GPU runner):
  // the same packing and steps, the same bits.
  auto runner = make_cpu_runner(model.weights().clone(), p);
  for (int64_t budget : {int64_t(1) << 20, int64_t(100)}) {
    auto out = runner_score_sequences(*runner, seqs, budget);
    for (size_t j = 0; j < seqs.size(); ++j)
      EXPECT_TRUE(same_bits(out[j], alone[j])) << "runner, seq" << j << ", budget " << budget;
  }
}

INSTANTIATE_TEST_SUITE_P(Recipes, BatchInvariance, ::testing::Values(Precision::float32, Precision::bfloat16),
                         [](const auto& info) { return std::string(precision_name(info.param)); });

}  // namespace
}  // namespace lockstep
