#include "train/optimizer.h"

#include <cmath>

#include "checkpoint/safetensors.h"
#include "core/error.h"
#include "kernels/canonical.h"

namespace lockstep {

LrSchedule lr_schedule_from_name(const std::string& name) {
  if (name == "constant") return LrSchedule::constant;
  if (name == "linear") return LrSchedule::linear;
  if (name == "cosine") return LrSchedule::cosine;
  fail("--lr-decay-style: expected 'constant', 'linear' or 'cosine', got '", name, "'");
}

const char* lr_schedule_name(LrSchedule s) {
  switch (s) {
    case LrSchedule::constant: return "constant";
    case LrSchedule::linear: return "linear";
    case LrSchedule::cosine: return "cosine";
  }
  return "?";
}

double learning_rate_at(const OptimizerConfig& c, int64_t step) {
  if (c.warmup_steps > 0 && step < c.warmup_steps) return c.lr * double(step + 1) / double(c.warmup_steps);
  if (c.schedule == LrSchedule::constant || c.decay_steps <= 0) return c.lr;
  double progress = std::min(1.0, double(step - c.warmup_steps) / double(c.decay_steps));
  double fraction = c.schedule == LrSchedule::linear ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return c.min_lr + (c.lr - c.min_lr) * fraction;
}

float canonical_sum_squares(const float* x, int64_t n) {
  const int64_t chunk = canonical_chunk(n);
  float partial[kTMax];
  for (int c = 0; c < kTMax; ++c) {
    float acc = 0.0f;
    const int64_t begin = std::min(n, c * chunk), end = std::min(n, (c + 1) * chunk);
    for (int64_t i = begin; i < end; ++i) acc += x[i] * x[i];
    partial[c] = acc;
  }
  return tree8(partial);
}

float global_grad_norm(const std::map<std::string, Tensor>& grads) {
  float total = 0.0f;
  for (const auto& [name, g] : grads) total += canonical_sum_squares(g.data<float>(), g.numel());
  return std::sqrt(total);
}

AdamW::AdamW(const OptimizerConfig& config, const ModelWeights& weights) : config_(config) {
  for (const auto& [name, t] : weights.named()) {
    master_[name] = t->to_f32();
    exp_avg_[name] = Tensor::zeros(t->shape(), DType::f32);
    exp_avg_sq_[name] = Tensor::zeros(t->shape(), DType::f32);
  }
}

namespace {

void check_finite(const std::string& name, const Tensor& g) {
  const float* p = g.data<float>();
  for (int64_t i = 0; i < g.numel(); ++i)
    LS_CHECK(std::isfinite(p[i]), "non-finite gradient in tensor ", name, " at element ", i, " (value ", p[i], ")");
}

}  // namespace

AdamW::AdamW(const OptimizerConfig& config, const std::vector<std::pair<std::string, Tensor*>>& params)
    : config_(config) {
  for (const auto& [name, t] : params) {
    master_[name] = t->to_f32();
    exp_avg_[name] = Tensor::zeros(t->shape(), DType::f32);
    exp_avg_sq_[name] = Tensor::zeros(t->shape(), DType::f32);
  }
}

OptimizerStepResult AdamW::step(std::map<std::string, Tensor>& grads, ModelWeights& weights, Precision precision) {
  check_grads(grads);
  OptimizerStepResult r = update(grads, global_grad_norm(grads));
  copy_to_model(weights, precision);
  return r;
}

OptimizerStepResult AdamW::step_sharded(std::map<std::string, Tensor>& grads, float grad_norm,
                                        const std::vector<std::pair<std::string, Tensor*>>& params,
                                        Precision precision) {
  check_grads(grads);
  OptimizerStepResult r = update(grads, grad_norm);
  for (const auto& [name, t] : params) {
    const Tensor& src = master_.at(name);
    const float* s = src.data<float>();
    float* d = t->data<float>();
    for (int64_t i = 0; i < src.numel(); ++i) d[i] = precision == Precision::bfloat16 ? round_bf16(s[i]) : s[i];
  }
  return r;
}

void AdamW::check_grads(const std::map<std::string, Tensor>& grads) const {
  // Check everything before any state changes, so a bad step leaves the optimizer intact.
  LS_CHECK(grads.size() == master_.size(), "optimizer: expected gradients for ", master_.size(), " tensors, got ",
           grads.size());
  for (const auto& [name, m] : master_) {
    auto it = grads.find(name);
    LS_CHECK(it != grads.end(), "optimizer: no gradient for parameter ", name);
    LS_CHECK(it->second.dtype() == DType::f32 && it->second.shape() == m.shape(), "optimizer: gradient of ", name,
             " has shape ", shape_str(it->second.shape()), ", expected fp32 ", shape_str(m.shape()));
    check_finite(name, it->second);
  }
}

OptimizerStepResult AdamW::update(const std::map<std::string, Tensor>& grads, float grad_norm) {
  OptimizerStepResult r;
  r.grad_norm = grad_norm;
  LS_CHECK(std::isfinite(r.grad_norm), "optimizer: the global gradient norm is not finite (", r.grad_norm, ")");
  r.lr = learning_rate_at(config_, step_);
  float clip_coef = 1.0f;
  if (config_.clip_grad > 0 && r.grad_norm > float(config_.clip_grad)) {
    clip_coef = float(config_.clip_grad) / (r.grad_norm + 1e-6f);
    r.clipped = true;
  }
  ++step_;
  const float b1 = float(config_.beta1), b2 = float(config_.beta2), eps = float(config_.eps);
  const float one_minus_b1 = float(1.0 - config_.beta1), one_minus_b2 = float(1.0 - config_.beta2);
  const float bc1 = float(1.0 - std::pow(config_.beta1, double(step_)));
  const float bc2 = float(1.0 - std::pow(config_.beta2, double(step_)));
  const float lr = float(r.lr);
  const float decay = float(1.0 - r.lr * config_.weight_decay);
  for (auto& [name, master] : master_) {
    const bool decayed = master.ndim() >= 2;
    float* p = master.data<float>();
    float* m = exp_avg_.at(name).data<float>();
    float* v = exp_avg_sq_.at(name).data<float>();
    const float* g = grads.at(name).data<float>();
    for (int64_t i = 0; i < master.numel(); ++i) {
      float gi = r.clipped ? g[i] * clip_coef : g[i];
      m[i] = b1 * m[i] + one_minus_b1 * gi;
      v[i] = b2 * v[i] + one_minus_b2 * (gi * gi);
      float m_hat = m[i] / bc1;
      float v_hat = v[i] / bc2;
      float w = decayed ? p[i] * decay : p[i];
      p[i] = w - lr * (m_hat / (std::sqrt(v_hat) + eps));
    }
  }
  return r;
}

void AdamW::copy_to_model(ModelWeights& weights, Precision precision) const {
  auto named = weights.named();
  LS_CHECK(named.size() == master_.size(), "optimizer: the model has ", named.size(), " tensors, the optimizer ",
           master_.size());
  for (auto& [name, t] : named) {
    const Tensor& src = master_.at(name);
    const float* s = src.data<float>();
    float* d = t->data<float>();
    for (int64_t i = 0; i < src.numel(); ++i) d[i] = precision == Precision::bfloat16 ? round_bf16(s[i]) : s[i];
  }
}

void AdamW::save(const std::string& path) const {
  std::map<std::string, Tensor> out;
  for (const auto& [name, t] : master_) {
    out["master." + name] = t;
    out["exp_avg." + name] = exp_avg_.at(name);
    out["exp_avg_sq." + name] = exp_avg_sq_.at(name);
  }
  write_safetensors(path, out, {{"step", std::to_string(step_)}, {"format", "lockstep-adamw-v1"}});
}

void AdamW::load(const std::string& path) {
  SafetensorsReader r = SafetensorsReader::open(path);
  auto it = r.metadata().find("step");
  LS_CHECK(it != r.metadata().end(), path, ": optimizer state has no 'step' metadata");
  step_ = std::stoll(it->second);
  size_t expected = 3 * master_.size();
  LS_CHECK(r.names().size() == expected, path, ": expected ", expected, " optimizer tensors, found ", r.names().size());
  for (auto& [name, t] : master_) {
    t = r.get_f32("master." + name, t.shape()).clone();
    exp_avg_.at(name) = r.get_f32("exp_avg." + name, t.shape()).clone();
    exp_avg_sq_.at(name) = r.get_f32("exp_avg_sq." + name, t.shape()).clone();
  }
}

void AdamW::load_state(int64_t step, const std::map<std::string, Tensor>& master,
                       const std::map<std::string, Tensor>& exp_avg, const std::map<std::string, Tensor>& exp_avg_sq) {
  const std::pair<const char*, const std::map<std::string, Tensor>*> parts[] = {
      {"master", &master}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (auto [what, m] : parts) {
    LS_CHECK(m->size() == master_.size(), "optimizer state: ", what, " has ", m->size(), " tensors, expected ",
             master_.size());
    for (const auto& [name, t] : master_) {
      auto it = m->find(name);
      LS_CHECK(it != m->end(), "optimizer state: ", what, " has no tensor ", name);
      LS_CHECK(it->second.dtype() == DType::f32 && it->second.shape() == t.shape(), "optimizer state: ", what, ".",
               name, " has shape ", shape_str(it->second.shape()), ", expected fp32 ", shape_str(t.shape()));
    }
  }
  LS_CHECK(step >= 0, "optimizer state: step ", step, " is negative");
  step_ = step;
  for (auto& [name, t] : master_) {
    t = master.at(name).clone();
    exp_avg_.at(name) = exp_avg.at(name).clone();
    exp_avg_sq_.at(name) = exp_avg_sq.at(name).clone();
  }
}

}  // namespace lockstep
