#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "kernels/cpu/elementwise.h"
#include "kernels/cpu/log_softmax.h"
#include "model/runner.h"

namespace lockstep {

namespace {

class CpuRunner final : public ModelRunner {
 public:
  CpuRunner(ModelWeights weights, Precision precision) : model_(std::move(weights), precision) {}

  const ModelConfig& config() const override { return model_.config(); }
  Device device() const override { return Device::cpu; }
  Precision precision() const override { return model_.precision(); }

  void allocate_kv(int64_t num_pages, int64_t page_size) override {
    cache_ = KvCache(model_.config(), num_pages, page_size);
  }

  std::vector<SampleResult> forward_sample(const ForwardBatch& batch,
                                           const std::vector<SampleRequest>& requests) override {
    std::vector<float> hidden = model_.forward(batch, cache_);
    const int64_t H = config().hidden_size, V = config().vocab_size;
    // Only the sampled rows need logits.
    std::vector<float> rows(requests.size() * H);
    for (size_t i = 0; i < requests.size(); ++i)
      std::copy(hidden.begin() + requests[i].row * H, hidden.begin() + (requests[i].row + 1) * H, rows.begin() + i * H);
    std::vector<float> logits = model_.logits(rows.data(), int64_t(requests.size()));
    std::vector<SampleResult> out(requests.size());
    for (size_t i = 0; i < requests.size(); ++i) out[i] = sample_logits_row(logits.data() + i * V, V, requests[i]);
    return out;
  }

  std::vector<float> forward_logprobs(const ForwardBatch& batch, const std::vector<int32_t>& targets) override {
    LS_CHECK(targets.size() == batch.tokens.size(), "forward_logprobs: one target per token expected");
    std::vector<float> hidden = model_.forward(batch, cache_);
    std::vector<float> logits = model_.logits(hidden.data(), batch.size());
    const int64_t V = config().vocab_size;
    std::vector<float> out(targets.size(), std::numeric_limits<float>::quiet_NaN());
    for (size_t t = 0; t < targets.size(); ++t)
      if (targets[t] >= 0) cpu::log_softmax_gather(logits.data() + t * V, &targets[t], &out[t], 1, V);
    return out;
  }

  ModelWeights export_weights() const override { return model_.weights().clone(); }

  void load_weight_bucket(const std::vector<WeightPiece>& pieces) override {
    const auto named = model_.weights().named();
    for (const std::string& name : apply_weight_pieces(model_.weights(), pieces))
      if (model_.precision() == Precision::bfloat16) {
        Tensor& t = *named.at(name);
        cpu::round_to_bf16(t.data<float>(), t.numel());
      }
  }

  void load_weights(const ModelWeights& weights) override {
    model_.weights() = weights.clone();
    if (model_.precision() == Precision::bfloat16)
      for (auto& [name, t] : model_.weights().named()) cpu::round_to_bf16(t->data<float>(), t->numel());
  }

 private:
  Qwen3Moe model_;
  KvCache cache_;
};

}  // namespace

ModelWeights ModelRunner::export_weights() const {
  fail("this model runner (", device_name(device()), ") cannot export its weights for an audit");
}

std::vector<std::string> apply_weight_pieces(ModelWeights& weights, const std::vector<WeightPiece>& pieces) {
  const auto named = weights.named();
  std::vector<std::string> touched;
  for (const WeightPiece& p : pieces) {
    auto it = named.find(p.name);
    LS_CHECK(it != named.end(), "weight bucket: '", p.name, "' is not a tensor of this model");
    Tensor& t = *it->second;
    const Box whole = full_box(t.shape());
    bool inside = p.box.size() == whole.size();
    for (size_t d = 0; inside && d < whole.size(); ++d)
      inside = p.box[d].begin >= 0 && p.box[d].begin <= p.box[d].end && p.box[d].end <= whole[d].end;
    LS_CHECK(inside, "weight bucket: box ", box_str(p.box), " of '", p.name, "' is outside its shape ",
             shape_str(t.shape()));
    LS_CHECK(p.value.dtype() == DType::f32 && p.value.shape() == box_shape(p.box), "weight bucket: '", p.name, "' box ",
             box_str(p.box), " needs f32 values of shape ", shape_str(box_shape(p.box)), ", got ",
             dtype_name(p.value.dtype()), shape_str(p.value.shape()));
    copy_intersection(p.value, p.box, t, whole);
    if (touched.empty() || touched.back() != p.name) touched.push_back(p.name);
  }
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  return touched;
}

void ModelRunner::load_weight_bucket(const std::vector<WeightPiece>& pieces) {
  ModelWeights w = export_weights();
  apply_weight_pieces(w, pieces);
  load_weights(w);
}

std::unique_ptr<ModelRunner> make_cpu_runner(ModelWeights weights, Precision precision) {
  return std::make_unique<CpuRunner>(std::move(weights), precision);
}

#ifndef LOCKSTEP_CUDA
std::unique_ptr<ModelRunner> make_runner(Device device, ModelWeights weights, Precision precision) {
  LS_CHECK(device == Device::cpu, "--device cuda: this build has no CUDA backend (configure with -DLOCKSTEP_CUDA=ON)");
  return make_cpu_runner(std::move(weights), precision);
}
std::unique_ptr<ModelRunner> make_runner_from(Device device, const ModelWeights& weights, Precision precision) {
  return make_runner(device, weights.clone(), precision);
}
#endif

}  // namespace lockstep
