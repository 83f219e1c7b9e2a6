// The GPU trainer's memory plan (train/train_memory.h): its parts agree with the model's real
// tensors, grow with the step, and put the 8-layer Qwen3-30B-A3B slice on one H200.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>

#include "../model/test_helpers.h"
#include "model/weights.h"
#include "train/train_memory.h"

namespace lockstep {
namespace {

TEST(TrainMemory, PartsMatchTheModelsTensors) {
  const ModelWeights w = ModelWeights::load(testing::fixture_model_dir(), Precision::bfloat16);
  const ModelConfig& c = w.config;
  double params = 0, weight_bytes = 0;
  for (const auto& [name, t] : named_tensors(w)) {
    params += double(t.numel());
    weight_bytes += double(t.numel()) * (t.ndim() == 1 ? 4 : 2);  // bf16 matrices, fp32 norms
  }
  EXPECT_EQ(trainer_parameter_count(c), params);
  const TrainMemory one = cuda_train_memory(c, 1000, 1), four = cuda_train_memory(c, 1000, 4);
  EXPECT_EQ(one.weights, weight_bytes);
  EXPECT_EQ(one.optimizer, 3 * params * 4);
  EXPECT_EQ(one.gradients, params * 4);
  EXPECT_EQ(four.gradients, 3 * params * 4);  // the tree of 4 holds 3 levels
  EXPECT_EQ(one.logits, 1000.0 * double(c.vocab_size) * 4 + 8 * 1000.0 * 4);
  const TrainMemory more = cuda_train_memory(c, 2000, 1);
  EXPECT_GT(more.activations, one.activations);
  EXPECT_EQ(more.weights, one.weights);
}

TEST(TrainMemory, TheEightLayerSliceFitsOneH200AndTheWholeModelDoesNot) {
  ModelConfig c = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/models/qwen3-30b-a3b/config.json");
  const double h200 = 141e9, h100 = 80e9;
  ModelConfig slice = c;
  slice.num_hidden_layers = 8;
  const double eight = cuda_train_memory(slice, 8192, 1).total();
  EXPECT_LT(eight, h200);
  EXPECT_GT(eight, h100);  // the optimizer state alone is 12 bytes a parameter
  EXPECT_GT(cuda_train_memory(c, 8192, 1).total(), h200);
  slice.num_hidden_layers = 9;
  EXPECT_GT(cuda_train_memory(slice, 8192, 1).total(), eight);
}

TEST(TrainMemory, LayersNotRecomputedKeepTheirIntermediates) {
  ModelConfig c = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/models/qwen3-30b-a3b/config.json");
  c.num_hidden_layers = 8;
  EXPECT_EQ(kept_layer_count(c, kRecomputeAll), 0);
  EXPECT_EQ(kept_layer_count(c, 8), 0);
  EXPECT_EQ(kept_layer_count(c, 11), 0);
  EXPECT_EQ(kept_layer_count(c, 3), 5);
  EXPECT_EQ(kept_layer_count(c, 0), 8);
  const TrainMemory all = cuda_train_memory(c, 8192, 1), none = cuda_train_memory(c, 8192, 1, 0),
                    five = cuda_train_memory(c, 8192, 1, 3);
  EXPECT_EQ(none.activations - all.activations, 8 * kept_layer_bytes(c, 8192));
  EXPECT_EQ(five.activations - all.activations, 5 * kept_layer_bytes(c, 8192));
  EXPECT_EQ(none.weights + none.optimizer + none.gradients + none.logits,
            all.weights + all.optimizer + all.gradients + all.logits);
  // A layer's kept intermediates at 8192 tokens: the experts' rows (8 a token) dominate: output,
  // [gate | up], SwiGLU, and with keep_expert_input_rows their input rows (bf16).
  EXPECT_GT(kept_layer_bytes(c, 8192), 8192.0 * 8 * (2048 + 3 * 768) * 2);
  EXPECT_LT(kept_layer_bytes(c, 8192), 1e9);
  EXPECT_LT(none.total(), 141e9);  // keeping every layer's still fits an H200 at 8 layers
  const double without_rows = kept_layer_bytes(c, 8192);
  set_keep_expert_input_rows(true);
  EXPECT_EQ(kept_layer_bytes(c, 8192) - without_rows, 8192.0 * 8 * 2048 * 2);
  EXPECT_LT(cuda_train_memory(c, 8192, 1, 0).total(), 141e9);
  set_keep_expert_input_rows(false);
}

// The attention backward's dS tiles, when kept: one sequence's lower triangle of 64 x 64 bf16
// tiles for each of the 32 heads, at most 1 GiB, in the step's activations.
TEST(TrainMemory, TheAttentionDsScratchIsOneSequencesTilesAtMostAGibibyte) {
  ModelConfig c = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/models/qwen3-30b-a3b/config.json");
  c.num_hidden_layers = 8;
  EXPECT_EQ(attention_ds_scratch_bytes(c, 512), 32.0 * (8 * 9 / 2) * 64 * 64 * 2);
  EXPECT_EQ(attention_ds_scratch_bytes(c, 2048 + 1), 32.0 * (33 * 34 / 2) * 64 * 64 * 2);
  EXPECT_EQ(attention_ds_scratch_bytes(c, 8192), double(int64_t(1) << 30));  // 2.16 GB uncapped
  EXPECT_TRUE(keep_attention_ds());                                          // the default
  const double on = cuda_train_memory(c, 8192, 1).activations;
  set_keep_attention_ds(false);
  EXPECT_EQ(on - cuda_train_memory(c, 8192, 1).activations, double(int64_t(1) << 30));
  set_keep_attention_ds(true);
}

// --recompute-num-layers -1 keeps as many layers as the memory holds beside the step, and
// recomputes every layer when even that does not fit (the step's check then refuses it).
TEST(TrainMemory, TheDefaultRecomputesTheFewestLayersThatFit) {
  ModelConfig c = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/models/qwen3-30b-a3b/config.json");
  c.num_hidden_layers = 8;
  const double layer = kept_layer_bytes(c, 8192);
  const double all = cuda_train_memory(c, 8192, 1, kRecomputeAll).step_bytes(false);
  const double all_held = cuda_train_memory(c, 8192, 1, kRecomputeAll).step_bytes(true);
  EXPECT_EQ(all - all_held, cuda_train_memory(c, 8192, 1).gradients);
  const auto count = [&](double available, bool held = false) {
    return recomputed_layer_count(c, 8192, 1, kRecomputeAuto, held, available);
  };
  // Available bytes whose usable part (less the 3% headroom, above 1 GiB here) is the step with
  // every layer recomputed plus `kept` layers' intermediates.
  ASSERT_GT(0.03 * all, double(int64_t(1) << 30));
  const auto room_for = [&](double kept) { return (all + kept * layer) / 0.97; };
  EXPECT_EQ(count(1e15), 0);  // room for everything
  EXPECT_EQ(count(all), 8);   // no room even for the step: every layer (refused later)
  EXPECT_EQ(count(room_for(0.5)), 8);
  EXPECT_EQ(count(room_for(1.01)), 7);
  EXPECT_EQ(count(room_for(3.5)), 5);
  EXPECT_EQ(count(room_for(8.5)), 0);
  // Held gradients leave more room: the same bytes keep more layers.
  EXPECT_LT(count(room_for(1.01), true), count(room_for(1.01)));
  // An explicit count is taken as given (clamped to the layers), whatever the memory.
  EXPECT_EQ(recomputed_layer_count(c, 8192, 1, 3, false, 1e15), 3);
  EXPECT_EQ(recomputed_layer_count(c, 8192, 1, 0, false, 1.0), 0);
  EXPECT_EQ(recomputed_layer_count(c, 8192, 1, 11, false, 1e15), 8);
  // The chosen count's plan fits what was available less the headroom.
  std::set<int64_t> seen;
  for (const double available : {120e9, 47e9, 45e9, 44e9, 30e9}) {
    const int64_t r = count(available);
    seen.insert(r);
    if (r < 8) {
      EXPECT_LE(cuda_train_memory(c, 8192, 1, r).step_bytes(false), 0.97 * available) << available;
    }
    if (r > 0) {
      EXPECT_GT(cuda_train_memory(c, 8192, 1, r - 1).step_bytes(false), 0.97 * available) << available;
    }
  }
  EXPECT_GE(seen.size(), 4u);  // none, all, and some in between
}

// A step of many micro-batches taken layer by layer keeps one buffer of the model's gradients
// and log2(M) scratch levels of its largest part (a layer here), each micro-batch its layer
// inputs and residual gradient; the trainer takes that order only where the batch-major step
// does not fit (or never, with a tied lm_head).
TEST(TrainMemory, LayerMajorStepsKeepOneGradientBuffer) {
  ModelConfig c = ModelConfig::load(std::string(LOCKSTEP_SOURCE_DIR) + "/models/qwen3-30b-a3b/config.json");
  c.num_hidden_layers = 8;
  const double params = trainer_parameter_count(c), H = double(c.hidden_size), t = 8192;
  const auto layer_major = [&](int64_t m) {
    return cuda_train_memory(c, 8192, m, kRecomputeAll, MicroBatchOrder::layer_major);
  };
  const TrainMemory batch = cuda_train_memory(c, 8192, 8), layer = layer_major(8);
  EXPECT_EQ(batch.gradients, 4 * params * 4);
  EXPECT_EQ(batch.tree_levels, 0.0);
  EXPECT_EQ(layer.gradients, params * 4);
  EXPECT_EQ(layer.tree_levels, 3 * largest_gradient_unit(c) * 4);
  EXPECT_EQ(layer_major(1).tree_levels, 0.0);
  EXPECT_EQ(layer.activations - layer_major(1).activations, 7 * ((8 + 2) * t * H * 2 + t * H * 4));
  // The largest part is a layer (its 128 experts), larger than the head's lm_head.
  EXPECT_GT(largest_gradient_unit(c), double(c.vocab_size) * H + H);
  EXPECT_LT(largest_gradient_unit(c) * 8, params);
  // Issue 18's RL step at 8 layers (8 micro-batches of 8192 tokens) fits one H200 only so.
  EXPECT_GT(batch.total(), 141e9);
  EXPECT_LT(layer.total(), 141e9);
  // The order: batch-major where it fits or for one micro-batch, else layer-major.
  const double batch_step = cuda_train_memory(c, 8192, 8, kRecomputeAll).step_bytes(false);
  EXPECT_EQ(micro_batch_order(c, 8192, 1, false, 1.0), MicroBatchOrder::batch_major);
  EXPECT_EQ(micro_batch_order(c, 8192, 8, false, 1e15), MicroBatchOrder::batch_major);
  EXPECT_EQ(micro_batch_order(c, 8192, 8, false, batch_step / 0.96), MicroBatchOrder::batch_major);
  EXPECT_EQ(micro_batch_order(c, 8192, 8, false, batch_step), MicroBatchOrder::layer_major);
  EXPECT_EQ(micro_batch_order(c, 8192, 8, true, batch_step), MicroBatchOrder::batch_major);  // held
  c.tie_word_embeddings = true;
  EXPECT_EQ(micro_batch_order(c, 8192, 8, false, 1.0), MicroBatchOrder::batch_major);
}

}  // namespace
}  // namespace lockstep
