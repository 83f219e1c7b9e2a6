// AdamW, schedules, the canonical gradient norm and optimizer-state checkpoints.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "core/philox.h"
#include "train/optimizer.h"

namespace lockstep {
namespace {
using GradMap = std::map<std::string, Tensor>;

ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 16;
  c.hidden_size = 8;
  c.intermediate_size = 8;
  c.moe_intermediate_size = 4;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.head_dim = 4;
  c.num_experts = 2;
  c.num_experts_per_tok = 1;
  c.max_position_embeddings = 32;
  return c;
}

// Gradients in the structure of the weights.
ModelWeights random_grads(const ModelWeights& w, uint64_t seed, float scale) {
  ModelWeights g = w.zeros_like();
  uint64_t stream = 0;
  for (const auto& [name, t] : g.named()) {
    for (int64_t i = 0; i < t->numel(); ++i)
      t->data<float>()[i] = scale * (philox_uniform(seed, stream, uint64_t(i)) * 2.0f - 1.0f);
    ++stream;
  }
  return g;
}

// The procedure written out plainly: chunk c of canonical_chunk(n), lane j of 64 the offsets
// = j (mod 64), lanes and chunks folded by their pairwise trees.
float plain_sum_squares(const std::vector<float>& x) {
  const int64_t n = int64_t(x.size()), chunk = (n + 7) / 8;
  std::vector<float> partial(8);
  for (int64_t c = 0; c < 8; ++c) {
    std::vector<float> lanes(64, 0.0f);
    for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) {
      const float square = x[size_t(i)] * x[size_t(i)];
      lanes[size_t((i - c * chunk) % 64)] += square;
    }
    for (int64_t width = 64; width > 1; width /= 2)
      for (int64_t j = 0; j < width / 2; ++j) lanes[size_t(j)] = lanes[size_t(2 * j)] + lanes[size_t(2 * j + 1)];
    partial[size_t(c)] = lanes[0];
  }
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
         ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

TEST(OptimSumSquares, MatchesTheCanonicalChunksOfLanes) {
  // 37: chunks of 5 (the last short, then empty); 8 * 64 * 3 + 40: chunks of 197 (three rounds
  // of the lanes and a part round); 100003: long chunks with a ragged end.
  for (const size_t n : {size_t(37), size_t(8 * 64 * 3 + 40), size_t(100003)}) {
    std::vector<float> x(n);
    for (size_t i = 0; i < x.size(); ++i) x[i] = philox_uniform(1, 2, i) - 0.5f;
    const float expected = plain_sum_squares(x);
    const float got = canonical_sum_squares(x.data(), int64_t(n));
    EXPECT_EQ(std::memcmp(&got, &expected, 4), 0) << n << " values";
    double ref = 0;
    for (float v : x) ref += double(v) * v;
    EXPECT_NEAR(got, ref, 1e-6 * ref) << n << " values";
  }
}

TEST(OptimGradNorm, SumsTensorsInNameOrder) {
  GradMap g;
  g["b"] = Tensor::zeros({3}, DType::f32);
  g["a"] = Tensor::zeros({2}, DType::f32);
  g["b"].data<float>()[0] = 3;
  g["a"].data<float>()[1] = 4;
  EXPECT_EQ(global_grad_norm(g), 5.0f);
}

TEST(OptimSchedule, WarmupLinearCosine) {
  OptimizerConfig c;
  c.lr = 1.0;
  c.min_lr = 0.1;
  c.warmup_steps = 4;
  c.decay_steps = 10;
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 3), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 100), 1.0);  // constant
  c.schedule = LrSchedule::linear;
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 4), 1.0);
  EXPECT_NEAR(learning_rate_at(c, 9), 0.1 + 0.9 * 0.5, 1e-12);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 14), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 50), 0.1);
  c.schedule = LrSchedule::cosine;
  EXPECT_NEAR(learning_rate_at(c, 9), 0.1 + 0.9 * 0.5, 1e-12);
  EXPECT_NEAR(learning_rate_at(c, 14), 0.1, 1e-12);
  EXPECT_THROW(lr_schedule_from_name("exp"), Error);
}

TEST(OptimAdamW, OneStepMatchesTheFormula) {
  ModelWeights w = ModelWeights::random(tiny_config(), 7, Precision::float32);
  OptimizerConfig c;
  c.lr = 0.01;
  c.weight_decay = 0.1;
  c.clip_grad = 0;
  AdamW opt(c, w);
  ModelWeights g = random_grads(w, 3, 0.5f);
  ModelWeights before = w.clone();
  opt.step(g, w, Precision::float32);
  for (const auto& [name, t] : w.named()) {
    const float* p0 = before.named().at(name)->data<float>();
    const float* gi = g.named().at(name)->data<float>();
    for (int64_t i = 0; i < t->numel(); ++i) {
      // Step 1: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
      double decayed = t->ndim() >= 2 ? p0[i] * (1 - 0.01 * 0.1) : p0[i];
      double expected = decayed - 0.01 * gi[i] / (std::fabs(gi[i]) + 1e-8);
      ASSERT_NEAR(t->data<float>()[i], expected, 1e-6) << name << "[" << i << "]";
    }
  }
  EXPECT_EQ(opt.steps_taken(), 1);
}

TEST(OptimAdamW, ClipsByGlobalNormAndReportsTheUnclippedNorm) {
  ModelWeights w = ModelWeights::random(tiny_config(), 7, Precision::float32);
  OptimizerConfig c;
  c.clip_grad = 0.5;
  AdamW a(c, w), b(c, w);
  ModelWeights wa = w.clone(), wb = w.clone();
  ModelWeights g = random_grads(w, 3, 1.0f);
  float norm = global_grad_norm(g);
  ASSERT_EQ(norm, global_grad_norm(named_tensors(g)));  // the structure's norm is the by-name one
  ASSERT_GT(norm, 0.5f);
  ModelWeights scaled = g.clone();
  float coef = 0.5f / (norm + 1e-6f);
  for (auto& [n, t] : scaled.named())
    for (int64_t i = 0; i < t->numel(); ++i) t->data<float>()[i] *= coef;
  auto ra = a.step(g, wa, Precision::float32);
  EXPECT_TRUE(ra.clipped);
  EXPECT_EQ(ra.grad_norm, norm);
  c.clip_grad = 0;
  AdamW plain(c, w);
  plain.step(scaled, wb, Precision::float32);
  for (const auto& [name, t] : wa.named())
    EXPECT_EQ(std::memcmp(t->raw(), wb.named().at(name)->raw(), t->nbytes()), 0) << name;
}

TEST(OptimAdamW, Bfloat16RecipeKeepsFp32MastersAndRoundsTheModel) {
  ModelWeights w = ModelWeights::random(tiny_config(), 7, Precision::bfloat16);
  OptimizerConfig c;
  c.lr = 1e-4;  // small enough that many updates vanish after rounding
  AdamW opt(c, w);
  ModelWeights g = random_grads(w, 5, 1.0f);
  opt.step(g, w, Precision::bfloat16);
  bool master_differs = false;
  for (const auto& [name, t] : w.named()) {
    const Tensor& m = *opt.master().named().at(name);
    for (int64_t i = 0; i < t->numel(); ++i) {
      float v = t->data<float>()[i];
      ASSERT_EQ(v, round_bf16(m.data<float>()[i]));
      master_differs |= v != m.data<float>()[i];
    }
  }
  EXPECT_TRUE(master_differs);
}

TEST(OptimAdamW, NonFiniteGradientFailsNamingTheTensorAndChangesNothing) {
  ModelWeights w = ModelWeights::random(tiny_config(), 7, Precision::float32);
  AdamW opt(OptimizerConfig{}, w);
  ModelWeights g = random_grads(w, 3, 1.0f);
  g.final_norm.data<float>()[2] = std::nanf("");
  ModelWeights before = w.clone();
  try {
    opt.step(g, w, Precision::float32);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.norm.weight"), std::string::npos) << e.what();
  }
  EXPECT_EQ(opt.steps_taken(), 0);
  for (const auto& [name, t] : w.named())
    EXPECT_EQ(std::memcmp(t->raw(), before.named().at(name)->raw(), t->nbytes()), 0);
}

TEST(OptimAdamW, SavedStateResumesBitForBit) {
  namespace fs = std::filesystem;
  ModelWeights w = ModelWeights::random(tiny_config(), 7, Precision::bfloat16);
  OptimizerConfig c;
  c.weight_decay = 0.01;
  c.schedule = LrSchedule::cosine;
  c.decay_steps = 5;
  AdamW full(c, w);
  ModelWeights wf = w.clone();
  for (int s = 0; s < 2; ++s) {
    ModelWeights g = random_grads(w, 10 + s, 1.0f);
    full.step(g, wf, Precision::bfloat16);
  }
  std::string path = (fs::temp_directory_path() / ("ls_optim_" + std::to_string(::getpid()) + ".safetensors")).string();
  full.save(path);
  for (int s = 2; s < 4; ++s) {
    ModelWeights g = random_grads(w, 10 + s, 1.0f);
    full.step(g, wf, Precision::bfloat16);
  }
  AdamW resumed(c, w);
  resumed.load(path);
  EXPECT_EQ(resumed.steps_taken(), 2);
  ModelWeights wr = w.clone();
  resumed.copy_to_model(wr, Precision::bfloat16);
  for (int s = 2; s < 4; ++s) {
    ModelWeights g = random_grads(w, 10 + s, 1.0f);
    resumed.step(g, wr, Precision::bfloat16);
  }
  for (const auto& [name, t] : wf.named()) {
    EXPECT_EQ(std::memcmp(t->raw(), wr.named().at(name)->raw(), t->nbytes()), 0) << name;
    EXPECT_EQ(std::memcmp(full.master().named().at(name)->raw(), resumed.master().named().at(name)->raw(), t->nbytes()),
              0)
        << name;
  }
  fs::remove(path);
}

// The state file read and written tensor by tensor (as a GPU-held state does it): what
// AdamW::save writes is what write_adamw_state writes of the same values, and read_adamw_state
// hands back every tensor's bits in the names table's order.
TEST(OptimAdamW, StateFileTensorByTensorIsAdamWsFile) {
  namespace fs = std::filesystem;
  ModelWeights w = ModelWeights::random(tiny_config(), 8, Precision::bfloat16);
  AdamW opt(OptimizerConfig{}, w);
  ModelWeights wf = w.clone();
  for (int s = 0; s < 3; ++s) opt.step(random_grads(w, 20 + s, 1.0f), wf, Precision::bfloat16);
  const std::string dir = (fs::temp_directory_path() / ("ls_adamw_state_" + std::to_string(::getpid()))).string();
  fs::create_directories(dir);
  opt.save(dir + "/saved.safetensors");
  const AdamWStateLayout layout = adamw_state_layout(w);
  ASSERT_EQ(layout.names.size(), w.named().size());
  const ModelWeights* parts[] = {&opt.master(), &opt.exp_avg(), &opt.exp_avg_sq()};
  int filled = 0;
  write_adamw_state(dir + "/streamed.safetensors", opt.steps_taken(), layout, [&](int part, size_t i, float* dst) {
    const Tensor& t = *parts[part]->named().at(layout.names[i]);
    std::memcpy(dst, t.raw(), t.nbytes());
    ++filled;
  });
  EXPECT_EQ(filled, 3 * int(layout.names.size()));
  const auto bytes = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  EXPECT_EQ(bytes(dir + "/saved.safetensors"), bytes(dir + "/streamed.safetensors"));
  int taken = 0;
  const int64_t step =
      read_adamw_state(dir + "/streamed.safetensors", layout, [&](int part, size_t i, Tensor&& values) {
        const Tensor& want = *parts[part]->named().at(layout.names[i]);
        EXPECT_EQ(std::memcmp(values.raw(), want.raw(), want.nbytes()), 0) << part << " " << layout.names[i];
        ++taken;
      });
  EXPECT_EQ(step, 3);
  EXPECT_EQ(taken, 3 * int(layout.names.size()));
  fs::remove_all(dir);
}

// A state file that does not match the model is refused before any tensor is handed over,
// naming the file and the tensor: another shape, a tensor stored in bf16, a missing tensor, a
// step that is not a count.
TEST(OptimAdamW, StateFileMismatchesAreRefusedBeforeAnyTensor) {
  namespace fs = std::filesystem;
  ModelWeights w = ModelWeights::random(tiny_config(), 9, Precision::bfloat16);
  const AdamWStateLayout layout = adamw_state_layout(w);
  const std::string dir = (fs::temp_directory_path() / ("ls_adamw_bad_" + std::to_string(::getpid()))).string();
  fs::create_directories(dir);
  const std::string path = dir + "/optimizer.safetensors";
  const auto write_state = [&](const std::function<void(std::map<std::string, Tensor>&)>& damage,
                               const std::string& step = "1") {
    std::map<std::string, Tensor> tensors;
    for (const char* part : {"master.", "exp_avg.", "exp_avg_sq."})
      for (size_t i = 0; i < layout.names.size(); ++i)
        tensors[part + layout.names[i]] = Tensor::zeros(layout.shapes[i], DType::f32);
    damage(tensors);
    write_safetensors(path, tensors, {{"step", step}, {"format", "lockstep-adamw-v1"}});
  };
  const auto error_of = [&]() {
    int taken = 0;
    try {
      read_adamw_state(path, layout, [&](int, size_t, Tensor&&) { ++taken; });
    } catch (const Error& e) {
      EXPECT_EQ(taken, 0) << e.what();
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string last = "exp_avg_sq." + layout.names.back();
  write_state([&](auto& t) { t[last] = Tensor::zeros({int64_t(3)}, DType::f32); });
  std::string e = error_of();
  EXPECT_NE(e.find(path), std::string::npos) << e;
  EXPECT_NE(e.find("'" + last + "' is F32 [3], expected F32"), std::string::npos) << e;
  write_state([&](auto& t) { t[last] = t[last].to_dtype(DType::bf16); });
  e = error_of();
  EXPECT_NE(e.find("'" + last + "' is BF16"), std::string::npos) << e;
  write_state([&](auto& t) {
    t.erase(last);
    t["exp_avg_sq.other"] = Tensor::zeros({int64_t(1)}, DType::f32);
  });
  e = error_of();
  EXPECT_NE(e.find("has no tensor '" + last + "'"), std::string::npos) << e;
  write_state([&](auto&) {}, "2x");
  e = error_of();
  EXPECT_NE(e.find("'step' metadata is '2x', expected a step count"), std::string::npos) << e;
  write_state([&](auto&) {});
  EXPECT_EQ(error_of(), "no error");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace lockstep
