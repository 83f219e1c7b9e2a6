#include "train/optimizer.h"

#include <cmath>
#include <cstring>

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
    float lanes[kSquaresLanes] = {};
    const int64_t begin = std::min(n, c * chunk), end = std::min(n, (c + 1) * chunk);
    int64_t i = begin;
    for (; i + kSquaresLanes <= end; i += kSquaresLanes)  // whole rounds of the lanes: vectorised
      for (int j = 0; j < kSquaresLanes; ++j) lanes[j] += x[i + j] * x[i + j];
    for (int j = 0; i + j < end; ++j) lanes[j] += x[i + j] * x[i + j];
    partial[c] = pairwise_tree(lanes, kSquaresLanes);
  }
  return tree8(partial);
}

float global_grad_norm(const std::map<std::string, Tensor>& grads) {
  float total = 0.0f;
  for (const auto& [name, g] : grads) total += canonical_sum_squares(g.data<float>(), g.numel());
  return std::sqrt(total);
}

float global_grad_norm(const ModelWeights& grads, const ParamScope& scope) {
  return global_grad_norm(named_tensors(grads, scope));
}

namespace {

// The tensors of a structure in the names table's order, and their names.
struct Slots {
  std::vector<std::string> names;
  std::vector<const Tensor*> tensors;
};
Slots slots_of(const ModelWeights& w, const ParamScope& scope) {
  Slots s;
  for_each_param(
      w,
      [&](const ParamSlot& slot, const Tensor& t) {
        s.names.push_back(param_name(w.config, slot));
        s.tensors.push_back(&t);
      },
      scope);
  return s;
}
std::vector<Tensor*> mutable_slots(ModelWeights& w, const ParamScope& scope) {
  std::vector<Tensor*> out;
  for_each_param(
      w, [&](const ParamSlot&, Tensor& t) { out.push_back(&t); }, scope);
  return out;
}

void round_into(const Tensor& master, Tensor& param, Precision precision) {
  const float* s = master.data<float>();
  float* d = param.data<float>();
  for (int64_t i = 0; i < master.numel(); ++i) d[i] = precision == Precision::bfloat16 ? round_bf16(s[i]) : s[i];
}

// Same structure and shapes as `like` (names from the table), else the first difference.
void check_like(const ModelWeights& like, const ModelWeights& w, const ParamScope& scope, const char* what) {
  const Slots a = slots_of(like, scope), b = slots_of(w, scope);
  LS_CHECK(a.names.size() == b.names.size(), "optimizer: ", what, " has ", b.names.size(), " tensors, expected ",
           a.names.size());
  for (size_t i = 0; i < a.names.size(); ++i) {
    LS_CHECK(a.names[i] == b.names[i], "optimizer: ", what, " has ", b.names[i], " where ", a.names[i], " is expected");
    LS_CHECK(b.tensors[i]->dtype() == DType::f32 && b.tensors[i]->shape() == a.tensors[i]->shape(), "optimizer: ", what,
             " ", a.names[i], " has shape ", shape_str(b.tensors[i]->shape()), ", expected fp32 ",
             shape_str(a.tensors[i]->shape()));
  }
}

}  // namespace

AdamW::AdamW(const OptimizerConfig& config, const ModelWeights& params, const ParamScope& scope)
    : config_(config), scope_(scope) {
  master_ = params.zeros_like();
  exp_avg_ = params.zeros_like();
  exp_avg_sq_ = params.zeros_like();
  const Slots from = slots_of(params, scope_);
  std::vector<Tensor*> to = mutable_slots(master_, scope_);
  for (size_t i = 0; i < to.size(); ++i) *to[i] = from.tensors[i]->to_f32();
  retie();
}

void AdamW::retie() {
  // A tied lm_head held with the embedding is the embedding's tensor in every state.
  if (!master_.config.tie_word_embeddings || !scope_.embed || !scope_.head) return;
  for (ModelWeights* w : {&master_, &exp_avg_, &exp_avg_sq_}) w->lm_head = w->embed;
}

OptimizerStepResult AdamW::step(const ModelWeights& grads, ModelWeights& params, Precision precision) {
  return step(grads, global_grad_norm(grads, scope_), params, precision);
}

OptimizerStepResult AdamW::step(const ModelWeights& grads, float grad_norm, ModelWeights& params, Precision precision) {
  // Check everything before any state changes, so a bad step leaves the optimizer intact.
  check_like(master_, grads, scope_, "the gradients");
  const Slots g = slots_of(grads, scope_);
  for (size_t i = 0; i < g.names.size(); ++i) {
    const float* p = g.tensors[i]->data<float>();
    for (int64_t j = 0; j < g.tensors[i]->numel(); ++j)
      LS_CHECK(std::isfinite(p[j]), "non-finite gradient in tensor ", g.names[i], " at element ", j, " (value ", p[j],
               ")");
  }
  OptimizerStepResult r = update(grads, grad_norm);
  copy_to_model(params, precision);
  return r;
}

OptimizerStepResult AdamW::update(const ModelWeights& grads, float grad_norm) {
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
  const std::vector<Tensor*> masters = mutable_slots(master_, scope_), ms = mutable_slots(exp_avg_, scope_),
                             vs = mutable_slots(exp_avg_sq_, scope_);
  const Slots gs = slots_of(grads, scope_);
  for (size_t k = 0; k < masters.size(); ++k) {
    const bool decayed = masters[k]->ndim() >= 2;  // matrices; the norm weights are exempt
    float* p = masters[k]->data<float>();
    float* m = ms[k]->data<float>();
    float* v = vs[k]->data<float>();
    const float* g = gs.tensors[k]->data<float>();
    for (int64_t i = 0; i < masters[k]->numel(); ++i) {
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
  check_like(master_, weights, scope_, "the model");
  const Slots from = slots_of(master_, scope_);
  std::vector<Tensor*> to = mutable_slots(weights, scope_);
  for (size_t i = 0; i < to.size(); ++i) round_into(*from.tensors[i], *to[i], precision);
}

void AdamW::save(const std::string& path) const {
  const ModelWeights* parts[] = {&master_, &exp_avg_, &exp_avg_sq_};
  std::vector<const Tensor*> of[3];
  for (int p = 0; p < 3; ++p) of[p] = slots_of(*parts[p], scope_).tensors;
  write_adamw_state(path, step_, adamw_state_layout(master_, scope_), [&](int part, size_t i, float* dst) {
    std::memcpy(dst, of[part][i]->data<float>(), of[part][i]->nbytes());
  });
}

void AdamW::load(const std::string& path) {
  ModelWeights* parts[] = {&master_, &exp_avg_, &exp_avg_sq_};
  std::vector<Tensor*> of[3];
  for (int p = 0; p < 3; ++p) of[p] = mutable_slots(*parts[p], scope_);
  step_ = read_adamw_state(path, adamw_state_layout(master_, scope_),
                           [&](int part, size_t i, Tensor&& values) { *of[part][i] = std::move(values); });
  retie();
}

namespace {
constexpr const char* kAdamWParts[3] = {"master.", "exp_avg.", "exp_avg_sq."};
}  // namespace

AdamWStateLayout adamw_state_layout(const ModelWeights& like, const ParamScope& scope) {
  AdamWStateLayout layout;
  const Slots s = slots_of(like, scope);
  layout.names = s.names;
  for (const Tensor* t : s.tensors) layout.shapes.push_back(t->shape());
  return layout;
}

void write_adamw_state(const std::string& path, int64_t step, const AdamWStateLayout& layout,
                       const std::function<void(int part, size_t i, float* dst)>& fill) {
  const size_t n = layout.names.size();
  std::vector<SafetensorsEntry> entries;
  for (int part = 0; part < 3; ++part)
    for (size_t i = 0; i < n; ++i)
      entries.push_back({kAdamWParts[part] + layout.names[i], DType::f32, layout.shapes[i]});
  write_safetensors(path, entries,
                    [&](size_t k, std::vector<std::byte>& scratch) -> const void* {
                      const size_t i = k % n;
                      scratch.resize(size_t(shape_numel(layout.shapes[i])) * 4);
                      fill(int(k / n), i, reinterpret_cast<float*>(scratch.data()));
                      return scratch.data();
                    },
                    {{"step", std::to_string(step)}, {"format", "lockstep-adamw-v1"}});
}

int64_t read_adamw_state(const std::string& path, const AdamWStateLayout& layout,
                         const std::function<void(int part, size_t i, Tensor&& values)>& take) {
  SafetensorsReader r = SafetensorsReader::open(path);
  auto it = r.metadata().find("step");
  LS_CHECK(it != r.metadata().end(), path, ": optimizer state has no 'step' metadata");
  int64_t step = -1;
  try {
    size_t used = 0;
    step = std::stoll(it->second, &used);
    LS_CHECK(used == it->second.size(), "trailing characters");
  } catch (const std::exception&) {
    fail(path, ": optimizer state's 'step' metadata is '", it->second, "', expected a step count");
  }
  LS_CHECK(step >= 0, path, ": optimizer state's 'step' metadata is ", step, ", expected a count >= 0");
  const size_t expected = 3 * layout.names.size();
  LS_CHECK(r.names().size() == expected, path, ": expected ", expected, " optimizer tensors, found ", r.names().size());
  for (int part = 0; part < 3; ++part)
    for (size_t i = 0; i < layout.names.size(); ++i) {
      const std::string name = kAdamWParts[part] + layout.names[i];
      LS_CHECK(r.contains(name), path, ": optimizer state has no tensor '", name, "'");
      const Tensor& t = r.get(name);
      LS_CHECK(t.dtype() == DType::f32 && t.shape() == layout.shapes[i], path, ": tensor '", name, "' is ",
               dtype_name(t.dtype()), " ", shape_str(t.shape()), ", expected F32 ", shape_str(layout.shapes[i]));
    }
  for (int part = 0; part < 3; ++part)
    for (size_t i = 0; i < layout.names.size(); ++i)
      take(part, i, r.get_f32(kAdamWParts[part] + layout.names[i], layout.shapes[i]));
  return step;
}

void AdamW::load_state(int64_t step, const ModelWeights& master, const ModelWeights& exp_avg,
                       const ModelWeights& exp_avg_sq) {
  check_like(master_, master, scope_, "master");
  check_like(master_, exp_avg, scope_, "exp_avg");
  check_like(master_, exp_avg_sq, scope_, "exp_avg_sq");
  LS_CHECK(step >= 0, "optimizer state: step ", step, " is negative");
  step_ = step;
  const std::pair<const ModelWeights*, ModelWeights*> parts[] = {
      {&master, &master_}, {&exp_avg, &exp_avg_}, {&exp_avg_sq, &exp_avg_sq_}};
  for (auto [from, to] : parts) {
    const Slots src = slots_of(*from, scope_);
    std::vector<Tensor*> dst = mutable_slots(*to, scope_);
    for (size_t i = 0; i < dst.size(); ++i) *dst[i] = src.tensors[i]->clone();
  }
  retie();
}

}  // namespace lockstep
