// Weight updates in buckets (Engine::begin_weight_update / load_weight_bucket /
// end_weight_update, ModelRunner::load_weight_bucket): the same semantics as
// update_weights (drain, flush, one version bump), the same bits afterwards, only the given
// boxes replaced, and misuse refused.
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "kernels/cpu/elementwise.h"
#include "rollout_test_helpers.h"

namespace lockstep::testing {
namespace {

using rollout::UpdatePolicy;

// A runner that only forwards to a CPU runner and does not override load_weight_bucket:
// it exercises ModelRunner's default (export, replace, load_weights).
class ForwardingRunner final : public ModelRunner {
 public:
  explicit ForwardingRunner(std::unique_ptr<ModelRunner> inner) : inner_(std::move(inner)) {}
  const ModelConfig& config() const override { return inner_->config(); }
  Device device() const override { return inner_->device(); }
  Precision precision() const override { return inner_->precision(); }
  void allocate_kv(int64_t n, int64_t p) override { inner_->allocate_kv(n, p); }
  std::vector<SampleResult> forward_sample(const ForwardBatch& b, const std::vector<SampleRequest>& r) override {
    return inner_->forward_sample(b, r);
  }
  std::vector<float> forward_logprobs(const ForwardBatch& b, const std::vector<int32_t>& t) override {
    return inner_->forward_logprobs(b, t);
  }
  void load_weights(const ModelWeights& w) override {
    ++full_loads;
    inner_->load_weights(w);
  }
  ModelWeights export_weights() const override { return inner_->export_weights(); }
  int full_loads = 0;

 private:
  std::unique_ptr<ModelRunner> inner_;
};

// Every tensor of `w` as one whole piece per bucket, `per_bucket` tensors per bucket.
std::vector<std::vector<WeightPiece>> whole_tensor_buckets(const ModelWeights& w, size_t per_bucket) {
  std::vector<std::vector<WeightPiece>> buckets(1);
  for (const auto& [name, t] : w.named()) {
    if (buckets.back().size() == per_bucket) buckets.emplace_back();
    buckets.back().push_back({name, full_box(t->shape()), t->clone()});
  }
  return buckets;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

bool same_weights(const ModelWeights& a, const ModelWeights& b) {
  const auto x = a.named(), y = b.named();
  for (const auto& [name, t] : x)
    if (!same_bytes(*t, *y.at(name))) return false;
  return x.size() == y.size();
}

TEST(WeightBucketUpdate, BucketsBumpTheVersionOnceAndGiveUpdateWeightsBits) {
  const Precision precision = Precision::float32;
  const ModelWeights target = ModelWeights::random(fixture_weights(precision).config, 5, precision);
  auto requests = mixed_requests();
  Engine by_buckets = make_engine(precision), whole = make_engine(precision);
  run_all_at_once(by_buckets, requests);  // fills the prefix cache under version 0
  EXPECT_GT(by_buckets.pages().cached_pages(), 0);
  by_buckets.begin_weight_update(UpdatePolicy::finish);
  EXPECT_TRUE(by_buckets.updating_weights());
  EXPECT_EQ(by_buckets.pages().cached_pages(), 0);  // flushed before any bucket
  const auto buckets = whole_tensor_buckets(target, 7);
  ASSERT_GT(buckets.size(), 2u);
  for (const auto& b : buckets) {
    by_buckets.load_weight_bucket(b);
    EXPECT_EQ(by_buckets.weight_version(), 0);  // no bump per bucket
  }
  by_buckets.end_weight_update();
  EXPECT_FALSE(by_buckets.updating_weights());
  EXPECT_EQ(by_buckets.weight_version(), 1);
  whole.update_weights(target, UpdatePolicy::finish);
  EXPECT_TRUE(same_weights(by_buckets.weights(), whole.weights()));
  EXPECT_TRUE(same_weights(by_buckets.weights(), target));
  auto a = run_all_at_once(by_buckets, requests), b = run_all_at_once(whole, requests);
  expect_same_results(a, b, "buckets vs update_weights");
  for (const auto& r : a)
    for (int64_t v : r.weight_versions) EXPECT_EQ(v, 1);
}

TEST(WeightBucketUpdate, BeginDrainsStartedRequestsUnderTheOldVersion) {
  const Precision precision = Precision::float32;
  auto requests = mixed_requests();
  EngineOptions o;
  o.max_batch_tokens = 64;
  Engine engine = make_engine(precision, o);
  auto a = engine.add_request(requests[0]);
  engine.step();
  auto c = engine.add_request(requests[3]);  // not started: runs after the update
  auto drained = engine.begin_weight_update(UpdatePolicy::finish);
  EXPECT_FALSE(drained.empty());
  EXPECT_TRUE(engine.result(a).finished());
  EXPECT_TRUE(engine.result(c).output_ids.empty());
  engine.step();  // nothing is admitted while the update is in progress
  EXPECT_TRUE(engine.result(c).output_ids.empty());
  for (const auto& b : whole_tensor_buckets(fixture_weights(precision), 1000)) engine.load_weight_bucket(b);
  engine.end_weight_update();
  engine.run_to_completion();
  const auto ra = engine.take_result(a), rc = engine.take_result(c);
  for (int64_t v : ra.weight_versions) EXPECT_EQ(v, 0);
  for (int64_t v : rc.weight_versions) EXPECT_EQ(v, 1);
  EXPECT_TRUE(same_result(rc, run_alone(precision, requests[3])));
}

TEST(WeightBucketUpdate, MisuseIsRefused) {
  Engine engine = make_engine(Precision::float32);
  const auto bucket = whole_tensor_buckets(fixture_weights(Precision::float32), 3).front();
  EXPECT_THROW(engine.load_weight_bucket(bucket), Error);  // outside an update
  EXPECT_THROW(engine.end_weight_update(), Error);         // no update begun
  engine.begin_weight_update(UpdatePolicy::abort);
  EXPECT_THROW(engine.begin_weight_update(UpdatePolicy::finish), Error);  // nested
  EXPECT_THROW(engine.update_weights(fixture_weights(Precision::float32), UpdatePolicy::finish), Error);
  engine.load_weight_bucket(bucket);
  engine.end_weight_update();
  EXPECT_EQ(engine.weight_version(), 1);
  EXPECT_THROW(engine.end_weight_update(), Error);  // already ended
  try {
    engine.load_weight_bucket(bucket);
    ADD_FAILURE() << "a bucket outside an update was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("begin_weight_update"), std::string::npos) << e.what();
  }
}

// A piece replaces exactly its box; every other value stays. The CPU runner's override and
// the base-class default (export, replace, load) agree; bf16 rounds like load_weights.
TEST(WeightBucketUpdate, APieceReplacesOnlyItsBox) {
  for (Precision precision : {Precision::float32, Precision::bfloat16}) {
    const ModelWeights start = fixture_weights(precision).clone();
    const std::string name = "model.layers.1.self_attn.o_proj.weight";  // [64, 64]
    Box box{{3, 9}, {10, 30}};
    Tensor values = Tensor::zeros(box_shape(box), DType::f32);
    for (int64_t i = 0; i < values.numel(); ++i) values.data<float>()[i] = 0.1234567f + float(i);  // not bf16 values
    std::vector<WeightPiece> bucket{{name, box, values}};
    ModelWeights want = start.clone();
    Tensor& o = want.layers[1].o_proj;
    for (int64_t r = 3; r < 9; ++r)
      for (int64_t c = 10; c < 30; ++c) o.data<float>()[r * 64 + c] = values.data<float>()[(r - 3) * 20 + (c - 10)];
    if (precision == Precision::bfloat16) cpu::round_to_bf16(o.data<float>(), o.numel());

    auto cpu = make_cpu_runner(start.clone(), precision);
    cpu->load_weight_bucket(bucket);
    EXPECT_TRUE(same_weights(cpu->export_weights(), want)) << precision_name(precision);

    ForwardingRunner fwd(make_cpu_runner(start.clone(), precision));
    fwd.load_weight_bucket(bucket);
    EXPECT_EQ(fwd.full_loads, 1);
    EXPECT_TRUE(same_weights(fwd.export_weights(), want)) << precision_name(precision);
  }
}

TEST(WeightBucketUpdate, BadPiecesAreRefusedNamingTheTensor) {
  auto runner = make_cpu_runner(fixture_weights(Precision::float32).clone(), Precision::float32);
  auto expect_error = [&](const WeightPiece& p, const std::string& needle) {
    try {
      runner->load_weight_bucket({p});
      ADD_FAILURE() << "accepted " << p.name << " " << box_str(p.box);
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const Box in{{0, 2}, {0, 4}}, outside{{60, 70}, {0, 4}};
  expect_error({"model.layers.9.self_attn.o_proj.weight", in, Tensor::zeros({2, 4}, DType::f32)},
               "model.layers.9.self_attn.o_proj.weight");
  expect_error({"model.layers.0.self_attn.o_proj.weight", outside, Tensor::zeros({10, 4}, DType::f32)}, "outside");
  expect_error({"model.layers.0.self_attn.o_proj.weight", in, Tensor::zeros({4, 2}, DType::f32)}, "shape");
}

}  // namespace
}  // namespace lockstep::testing
