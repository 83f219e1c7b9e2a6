// The one-launch decode kernel (steps of one token, every layer in one launch) against the
// per-op kernels and the whole-sequence forward, bit for bit: D2 for the decode path that
// batch 1 takes.
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>

#include "cuda_test_util.h"
#include "kernels/cuda/decode_layers.h"
#include "model/cuda/cuda_runner.h"
#include "model/runner_score.h"

namespace lockstep {
namespace {

using testing::same_bits_f;

ModelConfig qwen3_30b_config(int64_t layers) {
  ModelConfig c = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/models/qwen3-30b-a3b/config.json");
  c.num_hidden_layers = layers;
  c.vocab_size = 4096;
  c.max_position_embeddings = 1024;
  return c;
}

std::vector<int32_t> token_ids(int64_t n, uint32_t salt, int64_t vocab) {
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < n; ++t) ids.push_back(int32_t((t * 2654435761u + salt * 97u) % uint32_t(vocab)));
  return ids;
}

// Prefill of `prefill` tokens in one step, then one token per step (pages shuffled): the
// log-probs of every next token.
std::vector<float> prefill_then_decode(ModelRunner& runner, const std::vector<int32_t>& ids, int64_t prefill,
                                       int64_t page_size) {
  const int64_t pages = (int64_t(ids.size()) + page_size - 1) / page_size;
  runner.allocate_kv(pages + 3, page_size);
  std::vector<int32_t> table(size_t(pages + 3));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937_64(uint64_t(page_size)));
  std::vector<float> lp;
  for (int64_t begin = 0; begin + 1 < int64_t(ids.size());) {
    const int64_t end = begin == 0 ? prefill : begin + 1;
    ForwardBatch batch;
    std::vector<int32_t> targets;
    for (int64_t t = begin; t < end; ++t) {
      batch.tokens.push_back(ids[size_t(t)]);
      batch.positions.push_back(int32_t(t));
      batch.page_tables.push_back(table.data());
      targets.push_back(ids[size_t(t + 1)]);
    }
    auto step = runner.forward_logprobs(batch, targets);
    lp.insert(lp.end(), step.begin(), step.end());
    begin = end;
  }
  return lp;
}

void expect_decode_equals_whole_forward(const ModelConfig& config, const char* what) {
  std::string why;
  ASSERT_TRUE(one_launch_decode_supported(config, &why)) << what << ": " << why;
  auto runner = make_cuda_runner_random(config, 11);  // the one-launch decode (the default)
  const auto seq = token_ids(150, 3, config.vocab_size);
  const auto whole = runner_score_sequences(*runner, {seq})[0];
  for (int64_t page_size : {16, 64}) {
    const auto decoded = prefill_then_decode(*runner, seq, 100, page_size);
    EXPECT_TRUE(same_bits_f(decoded, whole)) << what << ", page size " << page_size;
  }
  // The per-op kernels at one token (the path every other step size takes) give the same bits.
  setenv("LOCKSTEP_ONE_LAUNCH_DECODE", "0", 1);
  auto per_op = make_cuda_runner_random(config, 11);
  unsetenv("LOCKSTEP_ONE_LAUNCH_DECODE");
  EXPECT_TRUE(same_bits_f(prefill_then_decode(*per_op, seq, 100, 64), whole)) << what << ", per-op kernels";
}

TEST(CudaDecodeLayers, OneTokenStepsEqualWholeSequenceForwardAt30BShapes) {
  LS_SKIP_WITHOUT_GPU();
  expect_decode_equals_whole_forward(qwen3_30b_config(3), "Qwen3-30B-A3B layers");
}

TEST(CudaDecodeLayers, OneTokenStepsEqualWholeSequenceForwardAtOtherShapes) {
  LS_SKIP_WITHOUT_GPU();
  // head_dim 64, 8 query heads per kv head, 32 experts of 2048, top 4: o_proj (K 2048) and
  // down (K 2048) in the row form split over the warps, 4 chunks per stage.
  ModelConfig c = qwen3_30b_config(2);
  c.hidden_size = 1024;
  c.num_attention_heads = 32;
  c.num_key_value_heads = 4;
  c.head_dim = 64;
  c.num_experts = 32;
  c.num_experts_per_tok = 4;
  c.moe_intermediate_size = 2048;
  expect_decode_equals_whole_forward(c, "hidden 1024, head_dim 64");
}

TEST(CudaDecodeLayers, TraceTimesEveryPhaseOfTheLastStep) {
  LS_SKIP_WITHOUT_GPU();
  cuda::decode_layers_trace(true);  // before the runner's first step: its graphs record
  auto runner = make_cuda_runner_random(qwen3_30b_config(4), 5);
  const auto seq = token_ids(70, 5, 4096);
  prefill_then_decode(*runner, seq, 66, 64);
  const std::string report = cuda::decode_layers_trace_report();
  cuda::decode_layers_trace(false);
  for (const char* phase : {"combine+norm", "attention", "o_proj items", "ranks", "gate_up items", "down barrier"})
    EXPECT_NE(report.find(phase), std::string::npos) << phase << " missing:\n" << report;
  // The per-layer totals (CTA 0 and the mean over CTAs): a step of 4 layers takes microseconds.
  const size_t at = report.find("\nlayer");
  ASSERT_NE(at, std::string::npos) << report;
  double cta0 = 0, mean = 0;
  ASSERT_EQ(std::sscanf(report.c_str() + at + 6, "%lf %lf", &cta0, &mean), 2) << report;
  EXPECT_GT(cta0, 1.0) << report;
  EXPECT_GT(mean, 1.0) << report;
  EXPECT_LT(mean, 10000.0) << report;
}

TEST(CudaDecodeLayers, RefusesShapesItCannotRun) {
  const ModelConfig good = qwen3_30b_config(2);
  std::string why;
  EXPECT_TRUE(one_launch_decode_supported(good, &why)) << why;
  auto refused = [&](ModelConfig c, const char* expected) {
    EXPECT_FALSE(one_launch_decode_supported(c, &why)) << expected;
    EXPECT_NE(why.find(expected), std::string::npos) << why;
  };
  ModelConfig c = good;
  c.head_dim = 16;
  refused(c, "head_dim");
  c = good;
  c.moe_intermediate_size = 96;
  refused(c, "intermediate");
  c = good;
  c.num_experts_per_tok = 9;
  refused(c, "experts per token");
  c = good;
  c.mlp_only_layers = {1};
  refused(c, "MoE");
}

}  // namespace
}  // namespace lockstep
