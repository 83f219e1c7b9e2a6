// --audit-weight-sync: after every sync the engine's weights equal the trainer's by global
// name; and the audit names a tensor when they do not.
#include <gtest/gtest.h>

#include "checkpoint/audit.h"
#include "model/runner.h"
#include "model/weights_source.h"
#include "rl_test_util.h"
#include "rl/tiny_model.h"
#include "rl/trainer.h"
#include "rollout/engine.h"

namespace lockstep::rl {
namespace {

TEST(AuditWeightSync, ShortRunAuditsEverySyncAndPasses) {
  testing::TempDir dir("audit");
  TrainConfig c = testing::tiny_run(dir, "audit");
  c.audit_weight_sync = true;
  TrainSummary s = run_training(c);
  EXPECT_EQ(s.steps_run, c.num_rollout);
}

TEST(AuditWeightSync, EngineWeightsFollowUpdatesAndADifferenceIsNamed) {
  ModelConfig config = ModelConfig::load(std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe/config.json");
  ModelWeights a = ModelWeights::random(config, 1, Precision::float32);
  ModelWeights b = a.clone();
  b.layers[1].experts[5].down.data<float>()[7] += 1.0f;
  rollout::Engine engine(make_cpu_runner(a.clone(), Precision::float32), rollout::EngineOptions{});
  auto audit = [](const ModelWeights& w, const char* name) { return audit_checkpoint(WeightsSource(w, name)); };
  EXPECT_FALSE(first_difference(audit(a, "a"), audit(engine.weights(), "engine")));
  engine.update_weights(b, rollout::UpdatePolicy::finish);
  EXPECT_FALSE(first_difference(audit(b, "b"), audit(engine.weights(), "engine")));
  auto diff = first_difference(audit(a, "a"), audit(engine.weights(), "engine"));
  ASSERT_TRUE(diff);
  EXPECT_NE(diff->find("model.layers.1.mlp.experts.5.down_proj.weight"), std::string::npos) << *diff;
}

}  // namespace
}  // namespace lockstep::rl
