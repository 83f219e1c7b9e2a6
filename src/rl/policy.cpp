#include "rl/policy.h"

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/error.h"
#ifdef LOCKSTEP_CUDA
#include "model/cuda/cuda_trainer.h"
#endif
#include "parallel/shard_plan.h"
#include "train/grad_accumulate.h"

namespace lockstep::rl {

Policy::Policy(dist::Communicator& world, const ResolvedTopology& topo, ModelWeights full, Precision precision,
               const OptimizerConfig& oc, bool device)
    : world_(world),
      layout_(ShardLayout::make(full.config, topo.topo, topo.layer_split, world.rank())),
      precision_(precision),
      oc_(oc),
      full_(std::move(full)) {
  LS_CHECK(!device || world.size() == 1, "train --device cuda: one rank");
  if (device) return;  // the device holds the model and the optimizer state
  model_ = std::make_unique<Qwen3Moe>(world_, layout_, slice_local_weights(full_, layout_), precision_);
  grad_ = std::make_unique<ParallelGrad>(*model_);
  optimizer_ = AdamW(oc_, model_->weights(), layout_.scope());
}

void Policy::require_host_model(const char* what) const {
  LS_CHECK(model_ != nullptr, "policy: ", what, " needs the host model, which a device-mode policy does not keep");
}

Policy::~Policy() = default;

void Policy::use_device_runner(ModelRunner* runner, int64_t recompute_num_layers) {
  LS_CHECK(world_.size() == 1 && runner && runner->device() == Device::cuda,
           "train --device cuda: one rank, with a CUDA runner");
  device_runner_ = runner;
  recompute_num_layers_ = recompute_num_layers;
#ifdef LOCKSTEP_CUDA
  if (model_) {
    device_state_ = std::make_shared<CudaTrainState>(*runner, oc_, optimizer_, recompute_num_layers_);
  } else if (!resumed_optimizer_.empty()) {
    device_state_ = std::make_shared<CudaTrainState>(*runner, oc_, resumed_optimizer_, full_, recompute_num_layers_);
    resumed_optimizer_.clear();
  } else {
    LS_CHECK(precision_ == Precision::bfloat16, "train --device cuda: the bfloat16 recipe");
    device_state_ = std::make_shared<CudaTrainState>(*runner, oc_, recompute_num_layers_);
  }
#else
  fail("train --device cuda: this build has no CUDA backend");
#endif
}

std::vector<std::vector<float>> Policy::score_all(const std::vector<std::vector<int32_t>>& seqs) {
#ifdef LOCKSTEP_CUDA
  if (on_device()) return cuda_score_sequences(*device_runner_, seqs);
#endif
  require_host_model("scoring");
  std::vector<std::vector<float>> lp = model_->score(seqs);
  size_t n = 0;
  for (const auto& s : seqs) n += s.size() - 1;
  std::vector<float> flat;
  if (root())
    for (const auto& v : lp) flat.insert(flat.end(), v.begin(), v.end());
  flat.resize(n);
  world_.broadcast_n(flat.data(), n, 0);
  lp.assign(seqs.size(), {});
  size_t at = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    lp[i].assign(flat.begin() + at, flat.begin() + at + (seqs[i].size() - 1));
    at += seqs[i].size() - 1;
  }
  return lp;
}

Policy::DeviceStepInfo Policy::device_step_info() const {
  DeviceStepInfo info;
#ifdef LOCKSTEP_CUDA
  if (device_state_) {
    info.recomputed_layers = device_state_->recomputed_layers();
    info.layer_major = device_state_->micro_batch_order() == MicroBatchOrder::layer_major;
  }
#endif
  return info;
}

std::vector<std::vector<double>> Policy::compute_grads(const std::vector<std::vector<int32_t>>& seqs,
                                                       int64_t num_microbatches, const SampleLoss& loss,
                                                       const std::function<size_t(int64_t)>& record_size,
                                                       bool want_entropy) {
  const Topology& t = layout_.topo;
  LS_CHECK(num_microbatches % t.dp == 0, "--num-microbatches ", num_microbatches,
           " must be a multiple of the data-parallel size ", t.dp, " (each replica takes whole micro-batches)");
  const auto ranges = canonical_microbatches(int64_t(seqs.size()), num_microbatches);
  const int64_t per = num_microbatches / t.dp, d = layout_.coords.dp;
  std::vector<std::vector<std::vector<int32_t>>> mine;
  for (int64_t j = d * per; j < (d + 1) * per; ++j)
    mine.emplace_back(seqs.begin() + ranges[j].first, seqs.begin() + ranges[j].second);
  std::vector<std::vector<double>> records(seqs.size());
  for (size_t i = 0; i < seqs.size(); ++i) records[i].assign(record_size(int64_t(i)), 0.0);
  const auto upstream = [&](int64_t j, const auto& lp, const auto& ent) {
    const int64_t first = ranges[d * per + j].first;
    std::vector<SequenceGradInput> up(lp.size());
    for (size_t k = 0; k < lp.size(); ++k) {
      const int64_t i = first + int64_t(k);
      static const std::vector<float> no_entropy;
      up[k] = loss(i, lp[k], want_entropy ? ent[k] : no_entropy, records[i]);
      LS_CHECK(records[i].size() == record_size(i), "parallel train: the loss record of sample ", i, " has ",
               records[i].size(), " values, expected ", record_size(i));
    }
    return up;
  };
#ifdef LOCKSTEP_CUDA
  if (on_device())
    device_state_->compute_grads(mine, want_entropy, upstream);
  else
#endif
  {
    require_host_model("the backward");
    grads_ = grad_->step_grads(mine, want_entropy, upstream);
  }
  // Each replica's records come from its (tp 0, last stage) rank, to every rank.
  for (int r = 0; r < t.dp; ++r) {
    const int holder = t.rank_of(0, r, t.pp - 1);
    const int64_t begin = ranges[r * per].first, end = ranges[(r + 1) * per - 1].second;
    std::vector<double> flat;
    for (int64_t i = begin; i < end; ++i) flat.insert(flat.end(), records[i].begin(), records[i].end());
    world_.broadcast_n(flat.data(), flat.size(), holder);
    size_t at = 0;
    for (int64_t i = begin; i < end; ++i) {
      std::copy(flat.begin() + at, flat.begin() + at + records[i].size(), records[i].begin());
      at += records[i].size();
    }
  }
  return records;
}

OptimizerStepResult Policy::apply(bool inject_nan) {
#ifdef LOCKSTEP_CUDA
  if (on_device()) {
    if (inject_nan) device_state_->poison_first_gradient();
    return device_state_->apply(precision_);
  }
#endif
  require_host_model("the optimizer step");
  if (inject_nan) {  // the test hook poisons the first of the rank's tensors by name
    auto named = named_tensors(grads_, layout_.scope());
    if (!named.empty()) named.begin()->second.data<float>()[0] = std::nanf("");
  }
  // A non-finite gradient fails on every rank: where the bad tensor is held, the optimizer's
  // check names it first.
  const float norm = parallel_grad_norm(world_, full_.config, layout_, grads_);
  OptimizerStepResult r = optimizer_.step(grads_, norm, model_->weights(), precision_);
  grads_ = {};
  return r;
}

void Policy::pull_device_weights() {
  const ModelWeights w = device_runner_->export_weights();
  auto from = w.named();
  for (auto& [name, t] : full_.named()) std::memcpy(t->data<float>(), from.at(name)->data<float>(), t->nbytes());
}

const ModelWeights& Policy::sync_full() {
  if (on_device()) {
    pull_device_weights();
    return full_;
  }
  require_host_model("sync_full");
  std::map<std::string, Tensor> gathered = gather_full(world_, full_.config, layout_, model_->weights());
  for (auto& [name, t] : full_.named()) {
    if (root()) *t = gathered.at(name).clone();
    world_.broadcast_n(t->data<float>(), size_t(t->numel()), 0);
  }
  return full_;
}

WeightSyncStats Policy::stream_weights(const ShardLayout& engine_layout,
                                       const std::function<void(std::vector<WeightPiece>&&)>& load_bucket,
                                       const WeightSyncOptions& options) {
  require_host_model("the weight sync");
  return lockstep::stream_weights(world_, full_.config, layout_, local_named(model_->weights(), layout_), engine_layout,
                                  load_bucket, options);
}

const ModelWeights& Policy::gather_to_root() {
  if (on_device()) {
    pull_device_weights();
    return full_;
  }
  require_host_model("gather_to_root");
  std::map<std::string, Tensor> gathered = gather_full(world_, full_.config, layout_, model_->weights());
  if (root())  // in place: a tied lm_head keeps sharing the embedding's storage
    for (auto& [name, t] : full_.named()) std::memcpy(t->data<float>(), gathered.at(name).data<float>(), t->nbytes());
  return full_;
}

AdamW Policy::gather_optimizer() {
  require_host_model("gather_optimizer");
  const ModelConfig& cfg = full_.config;
  auto master = gather_full(world_, cfg, layout_, optimizer_.master());
  auto exp_avg = gather_full(world_, cfg, layout_, optimizer_.exp_avg());
  auto exp_avg_sq = gather_full(world_, cfg, layout_, optimizer_.exp_avg_sq());
  AdamW full(oc_, full_);
  if (root()) {
    ModelWeights m = full_.zeros_like(), a = full_.zeros_like(), v = full_.zeros_like();
    copy_from_named(m, master);
    copy_from_named(a, exp_avg);
    copy_from_named(v, exp_avg_sq);
    full.load_state(optimizer_.steps_taken(), m, a, v);
  }
  return full;
}

std::function<void(const std::string& path)> Policy::optimizer_writer() {
#ifdef LOCKSTEP_CUDA
  if (on_device()) return [this](const std::string& path) { device_state_->save_optimizer(path, full_); };
#endif
  auto gathered = std::make_shared<AdamW>(gather_optimizer());
  return [gathered](const std::string& path) { gathered->save(path); };
}

void Policy::load_optimizer(const std::string& optimizer_file) {
  LS_CHECK(!on_device(), "policy: load the optimizer state before use_device_runner, which makes the device's from it");
  if (model_) {
    AdamW full_optimizer(oc_, full_);
    full_optimizer.load(optimizer_file);
    optimizer_.load_state(full_optimizer.steps_taken(), slice_local_weights(full_optimizer.master(), layout_),
                          slice_local_weights(full_optimizer.exp_avg(), layout_),
                          slice_local_weights(full_optimizer.exp_avg_sq(), layout_));
  } else {
    resumed_optimizer_ = optimizer_file;  // device mode, one rank: read by use_device_runner
  }
}

}  // namespace lockstep::rl
