// The GPU trainer's state (CudaTrainState, cuda_trainer.h): the micro-batch tree of device
// gradients, the canonical norm and AdamW on the device, writing the runner's weights.
#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <optional>

#include "kernels/cuda/adamw.h"
#include "model/cuda/cuda_trainer_impl.h"

namespace lockstep {

struct CudaTrainState::Impl {
  cuda_model::CudaRunner& r;
  OptimizerConfig config;
  int64_t recompute_num_layers = kRecomputeAuto;  // CudaTrainer's
  int64_t recomputed_layers = 0;                  // the most a micro-batch of the last step recomputed
  MicroBatchOrder order = MicroBatchOrder::batch_major;  // the last step's
  std::optional<MicroBatchOrder> forced_order;           // the test hook's
  int64_t step = 0;
  bool has_optimizer = true;            // false: gradients only (no masters or moments)
  std::vector<DeviceSegment> segments;  // for_each_param order
  std::vector<std::string> names;
  cuda_model::DeviceFloats master, exp_avg, exp_avg_sq;
  // The micro-batch tree: (level, partial sum); the finished sum is stack.front().
  std::vector<std::pair<int, std::unique_ptr<cuda_model::DeviceFloats>>> stack, spare;
  cuda_model::DeviceArena tables;
  cuda::AdamWTensor* adamw = nullptr;  // device table, one entry per segment
  const float** grad_ptrs = nullptr;
  int64_t* numels = nullptr;
  float* partials = nullptr;
  int64_t max_numel = 0;

  explicit Impl(cuda_model::CudaRunner& runner) : r(runner) {}
  void allocate_state(const OptimizerConfig& optimizer_config, int64_t recompute);
  cudaStream_t st() const { return r.stream(); }
  std::unique_ptr<cuda_model::DeviceFloats> take_buffer() {
    if (!spare.empty()) {
      auto b = std::move(spare.back().second);
      spare.pop_back();
      return b;
    }
    auto b = std::make_unique<cuda_model::DeviceFloats>();
    b->allocate(r.config());
    return b;
  }
  cuda_model::DeviceFloats& grads() const {
    LS_CHECK(stack.size() == 1, "cuda train state: apply without a complete compute_grads");
    return *stack.front().second;
  }
  // The device tables of the finished gradients' pointers (they move with the buffer).
  void write_tables() {
    const cuda_model::DeviceFloats& g = grads();
    std::vector<cuda::AdamWTensor> host(segments.size());
    std::vector<const float*> gp(segments.size());
    std::vector<int64_t> n(segments.size());
    for (size_t i = 0; i < segments.size(); ++i) {
      const auto& seg = segments[i];
      auto& t = host[i];
      t.master = cuda_model::segment_ptr(master, seg);
      t.exp_avg = cuda_model::segment_ptr(exp_avg, seg);
      t.exp_avg_sq = cuda_model::segment_ptr(exp_avg_sq, seg);
      t.grad = gp[i] = cuda_model::segment_ptr(g, seg);
      cuda_model::runner_segment_ptr(r, seg, &t.weight_bf16, &t.weight_f32);
      t.numel = n[i] = seg.numel;
      t.decayed = seg.is_norm ? 0 : 1;
    }
    r.upload(adamw, host.data(), host.size() * sizeof(host[0]));
    r.upload(grad_ptrs, gp.data(), gp.size() * sizeof(gp[0]));
    r.upload(numels, n.data(), n.size() * sizeof(n[0]));
  }
};

namespace {

// The runner as a CUDA runner (else refused).
cuda_model::CudaRunner& cuda_runner_of(ModelRunner& runner) {
  auto* cuda_runner = dynamic_cast<cuda_model::CudaRunner*>(&runner);
  LS_CHECK(cuda_runner != nullptr, "cuda train state: the runner is not a CUDA runner");
  return *cuda_runner;
}

}  // namespace

// The segments and their names, the masters' and moments' buffers and the device tables.
void CudaTrainState::Impl::allocate_state(const OptimizerConfig& optimizer_config, int64_t recompute) {
  const ModelConfig& c = r.config();
  config = optimizer_config;
  recompute_num_layers = recompute;
  segments = device_segments(c);
  for (const auto& seg : segments) {
    names.push_back(param_name(c, seg.slot));
    max_numel = std::max(max_numel, seg.numel);
  }
  for (auto* d : {&master, &exp_avg, &exp_avg_sq}) d->allocate(c);
  adamw = tables.alloc<cuda::AdamWTensor>(int64_t(segments.size()));
  grad_ptrs = const_cast<const float**>(tables.alloc<float*>(int64_t(segments.size())));
  numels = tables.alloc<int64_t>(int64_t(segments.size()));
  partials = tables.alloc<float>(int64_t(segments.size()) * 8);
}

CudaTrainState::CudaTrainState(ModelRunner& runner, const OptimizerConfig& config, const AdamW& optimizer,
                               int64_t recompute_num_layers)
    : impl_(std::make_unique<Impl>(cuda_runner_of(runner))) {
  Impl& m = *impl_;
  m.allocate_state(config, recompute_num_layers);
  m.step = optimizer.steps_taken();
  // The host state, tensor by tensor, in the names table's order (the segments' order).
  const std::pair<const ModelWeights*, cuda_model::DeviceFloats*> parts[] = {
      {&optimizer.master(), &m.master}, {&optimizer.exp_avg(), &m.exp_avg}, {&optimizer.exp_avg_sq(), &m.exp_avg_sq}};
  for (auto [host, dev] : parts) {
    size_t k = 0;
    for_each_param(*host, [&](const ParamSlot&, const Tensor& t) {
      const auto& seg = m.segments.at(k++);
      LS_CHECK(t.numel() == seg.numel, "cuda train state: ", m.names[k - 1], " has ", t.numel(), " values, expected ",
               seg.numel);
      m.r.upload(cuda_model::segment_ptr(*dev, seg), t.data<float>(), size_t(seg.numel) * 4);
    });
  }
}

namespace {

// The state file's layout over `like`, checked against the device segments (the same order).
AdamWStateLayout device_state_layout(const ModelWeights& like, const std::vector<std::string>& names,
                                     const std::vector<DeviceSegment>& segments) {
  AdamWStateLayout layout = adamw_state_layout(like);
  LS_CHECK(layout.names == names, "cuda train state: the model's parameters (", layout.names.size(),
           ") are not the device state's (", names.size(), ")");
  for (size_t i = 0; i < segments.size(); ++i)
    LS_CHECK(shape_numel(layout.shapes[i]) == segments[i].numel, "cuda train state: ", names[i], " has ",
             shape_numel(layout.shapes[i]), " values, expected ", segments[i].numel);
  return layout;
}

}  // namespace

CudaTrainState::CudaTrainState(ModelRunner& runner, const OptimizerConfig& config, const std::string& optimizer_file,
                               const ModelWeights& like, int64_t recompute_num_layers)
    : impl_(std::make_unique<Impl>(cuda_runner_of(runner))) {
  Impl& m = *impl_;
  m.allocate_state(config, recompute_num_layers);
  cuda_model::DeviceFloats* parts[] = {&m.master, &m.exp_avg, &m.exp_avg_sq};
  m.step = read_adamw_state(optimizer_file, device_state_layout(like, m.names, m.segments),
                            [&](int part, size_t i, Tensor&& values) {
                              m.r.upload(cuda_model::segment_ptr(*parts[part], m.segments[i]), values.data<float>(),
                                         size_t(values.numel()) * 4);
                            });
}

void CudaTrainState::save_optimizer(const std::string& path, const ModelWeights& like) const {
  const Impl& m = *impl_;
  LS_CHECK(m.has_optimizer, "cuda train state: save of a gradients-only state (it holds no optimizer)");
  const cuda_model::DeviceFloats* parts[] = {&m.master, &m.exp_avg, &m.exp_avg_sq};
  write_adamw_state(path, m.step, device_state_layout(like, m.names, m.segments), [&](int part, size_t i, float* dst) {
    m.r.download(dst, cuda_model::segment_ptr(*parts[part], m.segments[i]), size_t(m.segments[i].numel) * 4);
  });
}

CudaTrainState::CudaTrainState(ModelRunner& runner, const OptimizerConfig& config, int64_t recompute_num_layers)
    : impl_(std::make_unique<Impl>(cuda_runner_of(runner))) {
  Impl& m = *impl_;
  m.allocate_state(config, recompute_num_layers);
  for (const auto& seg : m.segments) {
    cuda::bf16_t* matrix = nullptr;
    float* norm = nullptr;
    cuda_model::runner_segment_ptr(m.r, seg, &matrix, &norm);
    float* master = cuda_model::segment_ptr(m.master, seg);
    if (matrix)
      cuda::widen_bf16(matrix, master, seg.numel, m.st());
    else
      LS_CUDA_CHECK(cudaMemcpyAsync(master, norm, size_t(seg.numel) * 4, cudaMemcpyDeviceToDevice, m.st()));
  }
  for (auto* d : {&m.exp_avg, &m.exp_avg_sq})
    for (const auto& [p, n] : d->buffers) LS_CUDA_CHECK(cudaMemsetAsync(p, 0, size_t(n) * 4, m.st()));
  LS_CUDA_CHECK(cudaStreamSynchronize(m.st()));
}

CudaTrainState::CudaTrainState(ModelRunner& runner, int64_t recompute_num_layers)
    : impl_(std::make_unique<Impl>(cuda_runner_of(runner))) {
  impl_->recompute_num_layers = recompute_num_layers;
  impl_->has_optimizer = false;
}

CudaTrainState::~CudaTrainState() = default;

void CudaTrainState::compute_grads(const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                                   bool want_entropy, const UpstreamFn& upstream) {
  Impl& m = *impl_;
  LS_CHECK(is_power_of_two(int64_t(micro_batches.size())),
           "gradient accumulation: the micro-batch count must be a power of two, got ", micro_batches.size());
  for (auto& e : m.stack) m.spare.push_back(std::move(e));
  m.stack.clear();
  cuda_model::CudaTrainer trainer(m.r, m.recompute_num_layers);
  m.recomputed_layers = 0;
  const double held = double(m.spare.size()) * trainer_parameter_count(m.r.config()) * 4;
  m.order = m.forced_order ? *m.forced_order : trainer.micro_batch_order_for(micro_batches, held);
  if (m.order == MicroBatchOrder::layer_major) {
    auto g = m.take_buffer();
    m.spare.clear();  // one buffer of the model's gradients: the others go back to the device
    trainer.step_grads_layer_major(micro_batches, want_entropy, upstream, g.get());
    m.recomputed_layers = trainer.last_recomputed_layers();
    m.stack.push_back({std::countr_zero(micro_batches.size()), std::move(g)});
    return;
  }
  for (size_t j = 0; j < micro_batches.size(); ++j) {
    auto g = m.take_buffer();
    trainer.step_grads(
        micro_batches[j], want_entropy,
        [&](int64_t, const auto& lp, const auto& ent) { return upstream(int64_t(j), lp, ent); }, g.get());
    m.recomputed_layers = std::max(m.recomputed_layers, trainer.last_recomputed_layers());
    m.stack.push_back({0, std::move(g)});
    // Two partials of the same level are siblings: left += right (PairwiseGradAccumulator).
    while (m.stack.size() >= 2 && m.stack[m.stack.size() - 1].first == m.stack[m.stack.size() - 2].first) {
      auto right = std::move(m.stack.back());
      m.stack.pop_back();
      m.stack.back().second->add(*right.second, m.st());
      ++m.stack.back().first;
      m.spare.push_back(std::move(right));
    }
  }
  // A tied lm_head's gradient is in the embedding's (cuda_step_grads adds it).
}

int64_t CudaTrainState::recomputed_layers() const { return impl_->recomputed_layers; }

MicroBatchOrder CudaTrainState::micro_batch_order() const { return impl_->order; }

void CudaTrainState::force_micro_batch_order(std::optional<MicroBatchOrder> order) { impl_->forced_order = order; }

ModelWeights CudaTrainState::gradients() const {
  return cuda_model::download_named(impl_->grads(), impl_->r.config(), impl_->st());
}

void CudaTrainState::poison_first_gradient() {
  Impl& m = *impl_;
  // The first tensor by name, as the host hook poisons named_tensors' first.
  size_t first = 0;
  for (size_t i = 1; i < m.names.size(); ++i)
    if (m.names[i] < m.names[first]) first = i;
  const float nan = std::nanf("");
  m.r.upload(cuda_model::segment_ptr(m.grads(), m.segments[first]), &nan, 4);
}

OptimizerStepResult CudaTrainState::apply(Precision precision) {
  Impl& m = *impl_;
  LS_CHECK(m.has_optimizer, "cuda train state: apply on a gradients-only state (it holds no optimizer)");
  const cuda_model::DeviceFloats& g = m.grads();
  m.write_tables();
  const int64_t count = int64_t(m.segments.size());
  // Finiteness first, naming the first bad tensor in the names table's order (the host's).
  cuda::sum_squares_chunks(m.grad_ptrs, m.numels, count, m.partials, m.st());
  std::vector<float> partials(size_t(count) * 8);
  m.r.download(partials.data(), m.partials, partials.size() * 4);
  std::vector<float> css(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) css[size_t(i)] = tree8(partials.data() + i * 8);
  for (int64_t i = 0; i < count; ++i) {
    if (std::isfinite(css[size_t(i)])) continue;
    const float* p = cuda_model::segment_ptr(g, m.segments[size_t(i)]);
    const int64_t at = cuda::first_nonfinite(p, m.segments[size_t(i)].numel, m.st());
    if (at < 0) continue;  // finite values whose squares overflow: the norm check below
    float value = 0;
    m.r.download(&value, p + at, 4);
    fail("non-finite gradient in tensor ", m.names[size_t(i)], " at element ", at, " (value ", value, ")");
  }
  // The canonical global norm: per tensor, then summed in global-name order.
  std::vector<size_t> order(static_cast<size_t>(count));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return m.names[a] < m.names[b]; });
  float total = 0.0f;
  for (size_t i : order) total += css[i];
  OptimizerStepResult res;
  res.grad_norm = std::sqrt(total);
  LS_CHECK(std::isfinite(res.grad_norm), "optimizer: the global gradient norm is not finite (", res.grad_norm, ")");
  // The scalars exactly as AdamW::update makes them.
  const OptimizerConfig& oc = m.config;
  res.lr = learning_rate_at(oc, m.step);
  cuda::AdamWScalars sc;
  if (oc.clip_grad > 0 && res.grad_norm > float(oc.clip_grad)) {
    sc.clip_coef = float(oc.clip_grad) / (res.grad_norm + 1e-6f);
    sc.clipped = 1;
    res.clipped = true;
  }
  ++m.step;
  sc.beta1 = float(oc.beta1), sc.beta2 = float(oc.beta2), sc.eps = float(oc.eps);
  sc.one_minus_beta1 = float(1.0 - oc.beta1), sc.one_minus_beta2 = float(1.0 - oc.beta2);
  sc.bias1 = float(1.0 - std::pow(oc.beta1, double(m.step)));
  sc.bias2 = float(1.0 - std::pow(oc.beta2, double(m.step)));
  sc.lr = float(res.lr);
  sc.decay = float(1.0 - res.lr * oc.weight_decay);
  sc.round_bf16 = precision == Precision::bfloat16 ? 1 : 0;
  cuda::adamw_step(m.adamw, count, m.max_numel, sc, m.st());
  // A tied lm_head is the embedding: the runner's head copy follows it.
  const ModelConfig& c = m.r.config();
  if (c.tie_word_embeddings) m.r.copy_embedding_to_head();
  LS_CUDA_CHECK(cudaStreamSynchronize(m.st()));
  return res;
}

AdamW CudaTrainState::download(const ModelWeights& like) const {
  const Impl& m = *impl_;
  LS_CHECK(m.has_optimizer, "cuda train state: download of a gradients-only state (it holds no optimizer)");
  ModelWeights parts[3] = {like.zeros_like(), like.zeros_like(), like.zeros_like()};
  const cuda_model::DeviceFloats* from[3] = {&m.master, &m.exp_avg, &m.exp_avg_sq};
  for (int p = 0; p < 3; ++p) {
    size_t k = 0;
    for_each_param(parts[p], [&](const ParamSlot&, Tensor& t) {
      const auto& seg = m.segments.at(k++);
      m.r.download(t.data<float>(), cuda_model::segment_ptr(*from[p], seg), size_t(seg.numel) * 4);
    });
  }
  AdamW out(m.config, like);
  out.load_state(m.step, parts[0], parts[1], parts[2]);
  return out;
}

}  // namespace lockstep
