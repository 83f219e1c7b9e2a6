// DAPO dynamic sampling: groups with equal rewards are dropped and more prompts drawn until the
// batch is full (a scripted source and engine make every decision known), and a training run
// with the filter keeps only groups with signal.
#include <gtest/gtest.h>

#include <fstream>

#include "core/error.h"
#include "core/philox.h"
#include "rl/environment.h"
#include "rl/step_rollout.h"
#include "rl/train_checkpoint.h"
#include "rl/trainer.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

// Prompt at position p is {p}; the reward of a sample is 1 unless p % 3 == 0, where it is the
// parity of the sample's response token (so those groups are mixed).
class ScriptedSource : public PromptSource {
 public:
  TaskExample prompt(uint64_t, int64_t position) override { return {{int32_t(position)}, {}}; }
  TaskExample demonstration(uint64_t, int64_t) override { return {}; }
  int64_t max_prompt_len() const override { return 1; }
  int64_t max_sequence_len() const override { return 2; }
  void check_model(const ModelConfig&, const std::string&) const override {}
  void set_stops(rollout::GenerationRequest&) const override {}
  std::string text(const std::vector<int32_t>&) const override { return ""; }
  std::vector<float> rewards(const std::vector<int64_t>& positions, const std::vector<TaskExample>& prompts,
                             const std::vector<std::vector<int32_t>>& responses) override {
    std::vector<float> out;
    for (size_t i = 0; i < positions.size(); ++i) {
      EXPECT_EQ(prompts[i].prompt[0], positions[i]);
      out.push_back(always_flat || positions[i] % 3 != 0 ? 1.0f : float(responses[i][0] % 2));
    }
    return out;
  }
  bool always_flat = false;
};

// Each request's response is its index in the round; the seeds are recorded.
struct ScriptedEngine {
  std::vector<std::vector<uint64_t>> seeds;  // per round
  std::vector<rollout::RequestOutcome> operator()(const std::vector<std::optional<rollout::GenerationRequest>>& r) {
    seeds.emplace_back();
    std::vector<rollout::RequestOutcome> out(r.size());
    for (size_t i = 0; i < r.size(); ++i) {
      out[i].result.output_ids = {int32_t(i)};
      out[i].result.logprobs = {-1.0f};
      seeds.back().push_back(r[i]->sampling.seed);
    }
    return out;
  }
};

// The default environment: one turn, the source's reward.
std::unique_ptr<Environment> single_turn(PromptSource& source) {
  return make_environment(TrainConfig(), source, nullptr);
}

TrainConfig scripted_config(bool filter) {
  TrainConfig c;
  c.rollout_batch_size = 2;
  c.n_samples_per_prompt = 2;
  c.dynamic_sampling_filter = filter;
  return c;
}

TEST(DynamicSampling, DropsFlatGroupsAndDrawsMorePromptsInOrder) {
  ScriptedSource source;
  ScriptedEngine engine;
  StepRollout r = sample_step(scripted_config(true), source, *single_turn(source), 0, 77, 0, 1, std::ref(engine));
  // Round 0: prompts 0 (mixed, kept) and 1 (flat); round 1: prompts 2 (flat) and 3 (mixed, kept).
  ASSERT_EQ(r.samples.size(), 4u);
  EXPECT_EQ(r.samples[0].example.prompt[0], 0);
  EXPECT_EQ(r.samples[2].example.prompt[0], 3);
  EXPECT_EQ(r.samples[0].reward, 0.0f);
  EXPECT_EQ(r.samples[1].reward, 1.0f);
  EXPECT_EQ(r.prompts_drawn, 4);
  EXPECT_EQ(r.rounds, 2);
  EXPECT_EQ(r.dropped, (std::map<std::string, int64_t>{{"1.0", 2}}));
  ASSERT_EQ(engine.seeds.size(), 2u);
  EXPECT_EQ(engine.seeds[0][3], mix_seed(77, 3));  // round 0: the seeds of a run without the filter
  EXPECT_EQ(engine.seeds[1][3], mix_seed(77, 3 + (uint64_t(1) << 32)));
  nlohmann::json m;
  r.add_metrics(m, scripted_config(true));
  EXPECT_EQ(m["rollout/dynamic_filter/drop_zero_std_1.0"], 2);
  EXPECT_EQ(m["rollout/dynamic_filter/sampled_prompts"], 4);
  EXPECT_EQ(m["rollout/dynamic_filter/rounds"], 2);
}

TEST(DynamicSampling, OffIsOneRoundAndOverSamplingDrawsMorePerRound) {
  ScriptedSource source;
  ScriptedEngine engine;
  StepRollout r = sample_step(scripted_config(false), source, *single_turn(source), 0, 5, 10, 1, std::ref(engine));
  EXPECT_EQ(r.prompts_drawn, 2);
  EXPECT_EQ(r.samples[2].example.prompt[0], 11);
  nlohmann::json m;
  r.add_metrics(m, scripted_config(false));
  EXPECT_TRUE(m.empty());
  TrainConfig over = scripted_config(true);
  over.over_sampling_batch_size = 6;
  r = sample_step(over, source, *single_turn(source), 0, 5, 0, 1, std::ref(engine));
  EXPECT_EQ(r.rounds, 1);  // prompts 0 and 3 are the mixed ones among 0..5
  EXPECT_EQ(r.prompts_drawn, 6);
  EXPECT_EQ(r.samples[2].example.prompt[0], 3);
  EXPECT_EQ(r.dropped.at("1.0"), 2);  // prompts 1 and 2; 4 and 5 came after the batch was full
}

TEST(DynamicSampling, NoSignalAtAllIsAnErrorAfterTheRoundLimit) {
  ScriptedSource source;
  source.always_flat = true;
  ScriptedEngine engine;
  try {
    sample_step(scripted_config(true), source, *single_turn(source), 0, 5, 0, 7, std::ref(engine));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "rollout step 7: --dynamic-sampling-filter kept 0 of 2 prompt groups after 64 rounds (128 prompts): "
              "every other group's samples got equal rewards, so there is no signal to train on");
  }
  TrainConfig bad;
  bad.over_sampling_batch_size = 3;
  EXPECT_THROW(validate(bad), Error);  // fewer than --rollout-batch-size 16
}

TEST(DynamicSampling, TrainingKeepsOnlyGroupsWithSignal) {
  testing::TempDir dir("dynamic_run");
  TrainConfig c = testing::tiny_run(dir, "dyn");
  c.task_digits = 1;  // easy enough that a short warm start gives some groups mixed rewards
  c.sft_warmup_steps = 15;
  c.dynamic_sampling_filter = true;
  c.over_sampling_batch_size = 8;
  c.save = dir.sub("save");
  run_training(c);
  int64_t sampled = 0;
  for (const auto& m : testing::read_metrics(c)) {
    if (!m.contains("step")) continue;
    EXPECT_EQ(m["rollout/zero_std_ratio"], 0.0);
    EXPECT_EQ(m["rollout/dynamic_filter/sampled_prompts"].get<int64_t>() % 8, 0);
    sampled += m["rollout/dynamic_filter/sampled_prompts"].get<int64_t>();
  }
  EXPECT_GE(sampled, 3 * 8);
  const auto state = load_trainer_state(checkpoint_dir(c.save, 3));
  EXPECT_EQ(state.data_position, sampled);
}

}  // namespace
}  // namespace lockstep::rl
