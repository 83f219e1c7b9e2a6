// configs/arith_grpo_cuda.toml on the GPU: its model (configs/arith_model_cuda.json) passes every
// shape check of the CUDA runner, its one-launch decode included, and the job runs at its real
// model size (a few tiny steps) truly on policy.
#include <gtest/gtest.h>

#include <string>

#include "../rl/newcomer_util.h"
#include "cuda_test_util.h"
#include "model/config.h"
#include "model/cuda/cuda_runner.h"
#include "rl/trainer.h"

namespace lockstep::rl {
namespace {

const std::string kSource = LOCKSTEP_SOURCE_DIR;

TEST(CudaNewcomerConfig, ModelTakesTheOneLaunchDecode) {
  std::string why;
  EXPECT_TRUE(one_launch_decode_supported(ModelConfig::load(kSource + "/configs/arith_model_cuda.json"), &why)) << why;
}

TEST(CudaNewcomerConfig, RunsAtItsModelSize) {
  LS_SKIP_WITHOUT_GPU();
  testing::TempDir dir("cuda_newcomer");
  TrainConfig c = testing::newcomer_config("configs/arith_grpo_cuda.toml", dir, 16, 4);
  ASSERT_EQ(c.device, "cuda");
  c.sft_warmup_steps = 3;
  c.num_rollout = 2;
  c.n_samples_per_eval_prompt = 2;
  const TrainSummary s = run_training(c);
  EXPECT_EQ(s.steps_run, 2);
  EXPECT_EQ(s.max_abs_diff, 0.0);
  const testing::RecordCounts n = testing::count_records(c);
  EXPECT_EQ(n.sft, 3);
  EXPECT_EQ(n.evals, 2);  // before the first step and after the last (eval-interval 10)
}

}  // namespace
}  // namespace lockstep::rl
