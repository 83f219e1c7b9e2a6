// Qwen3-30B-A3B-shaped layers (hidden 2048, 32/4 heads of 128, 128 experts of 768, top 8)
// with random weights: the GPU bfloat16 forward against the CPU float32 and bfloat16 forwards.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "cuda_test_util.h"
#include "model/cuda/cuda_runner.h"
#include "model/runner_score.h"

namespace lockstep {
namespace {

struct Stats {
  double median, p90, max;
};
Stats diff_stats(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  std::vector<double> d;
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t t = 0; t < a[i].size(); ++t) d.push_back(std::abs(double(a[i][t]) - double(b[i][t])));
  std::sort(d.begin(), d.end());
  return {d[d.size() / 2], d[d.size() * 9 / 10], d.back()};
}

TEST(CudaQwen3_30B, TwoRandomLayersMatchCpuWithinBf16Rounding) {
  LS_SKIP_WITHOUT_GPU();
  ModelConfig config = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/models/qwen3-30b-a3b/config.json");
  config.num_hidden_layers = 2;
  config.vocab_size = 4096;  // the layers are full size; a small head keeps the CPU side fast
  config.max_position_embeddings = 1024;
  ModelWeights weights = ModelWeights::random(config, 5, Precision::bfloat16);
  std::vector<std::vector<int32_t>> seqs;
  for (int s = 0; s < 3; ++s) {
    std::vector<int32_t> ids;
    for (int t = 0; t < 24 + 20 * s; ++t) ids.push_back(int32_t((t * 2654435761u + s * 97u) % 4096));
    seqs.push_back(ids);
  }
  auto gpu_runner = make_runner(Device::cuda, weights.clone(), Precision::bfloat16);
  auto gpu = runner_score_sequences(*gpu_runner, seqs);
  auto gpu_alone = runner_score_sequences(*gpu_runner, {seqs[2]});
  EXPECT_EQ(std::memcmp(gpu_alone[0].data(), gpu[2].data(), gpu[2].size() * 4), 0) << "batch invariance";
  Qwen3Moe cpu32(weights.clone(), Precision::float32);
  Qwen3Moe cpu16(std::move(weights), Precision::bfloat16);
  auto f32 = score_sequences(cpu32, seqs), b16 = score_sequences(cpu16, seqs);
  Stats g32 = diff_stats(gpu, f32), c32 = diff_stats(b16, f32), g16 = diff_stats(gpu, b16);
  std::printf("[30B layers] |gpu bf16 - cpu f32| median %.3g p90 %.3g max %.3g\n", g32.median, g32.p90, g32.max);
  std::printf("[30B layers] |cpu bf16 - cpu f32| median %.3g p90 %.3g max %.3g\n", c32.median, c32.p90, c32.max);
  std::printf("[30B layers] |gpu bf16 - cpu bf16| median %.3g p90 %.3g max %.3g\n", g16.median, g16.p90, g16.max);
  // Within bf16 rounding: the GPU recipe is as far from fp32 as the CPU bf16 recipe is (two
  // bf16 recipes differ only in rounding order), with slack for routing near-ties.
  EXPECT_LE(g32.median, std::max(2.0 * c32.median, 1e-2));
  EXPECT_LE(g32.p90, std::max(3.0 * c32.p90, 5e-2));
}

}  // namespace
}  // namespace lockstep
