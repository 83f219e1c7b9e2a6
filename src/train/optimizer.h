// AdamW with fp32 master weights, learning-rate schedules, and clipping by the canonical
// global gradient norm (docs/numerics.md, rule 11).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/weights.h"

namespace lockstep {

enum class LrSchedule { constant, linear, cosine };
LrSchedule lr_schedule_from_name(const std::string& name);  // constant | linear | cosine
const char* lr_schedule_name(LrSchedule s);

struct OptimizerConfig {
  double lr = 1e-3;
  double min_lr = 0.0;  // end of the linear / cosine decay
  LrSchedule schedule = LrSchedule::constant;
  int64_t warmup_steps = 0;  // linear warmup from 0 to lr
  int64_t decay_steps = 0;   // steps after warmup over which linear / cosine decay to min_lr
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;  // decoupled; applied to matrices only (norm weights are exempt)
  double clip_grad = 1.0;     // clip by global norm; <= 0 disables
};

// The learning rate used by optimizer step `step` (0-based count of steps already taken).
double learning_rate_at(const OptimizerConfig& c, int64_t step);

// Canonical sum of squares of one tensor: the flattened tensor is cut into 8 equal chunks
// (zero-padded); each chunk is summed in fp32 in kSquaresLanes interleaved lanes (lane j the
// elements at offsets = j mod kSquaresLanes, ascending) folded by the pairwise tree; the 8
// chunks are combined by the pairwise tree.
float canonical_sum_squares(const float* x, int64_t n);
// sqrt of the per-tensor canonical sums, added in global-name (map) order in fp32.
float global_grad_norm(const std::map<std::string, Tensor>& grads);
// The same of gradients in the structure of the weights (the part `scope` of the model).
float global_grad_norm(const ModelWeights& grads, const ParamScope& scope = {});

struct OptimizerStepResult {
  float grad_norm = 0;  // before clipping
  double lr = 0;
  bool clipped = false;
};

// optimizer.safetensors: "master.<name>", "exp_avg.<name>" and "exp_avg_sq.<name>" (parts 0, 1
// and 2) of each parameter by global name, the step in the metadata. Written and read tensor
// by tensor, so a state held on the GPU needs one tensor on the host, not 12 bytes a parameter.
struct AdamWStateLayout {
  std::vector<std::string> names;  // the parameters' global names, in the names table's order
  std::vector<Shape> shapes;
};
AdamWStateLayout adamw_state_layout(const ModelWeights& like, const ParamScope& scope = {});
// fill(part, i, dst): parameter i's values of `part` into dst (numel of shapes[i] floats).
void write_adamw_state(const std::string& path, int64_t step, const AdamWStateLayout& layout,
                       const std::function<void(int part, size_t i, float* dst)>& fill);
// Checks every name, shape and dtype of the file against `layout` first, then hands each
// tensor over as fp32 (finite, checked as it is read) to take(part, i, values); returns the
// step. Errors name the file and the tensor.
int64_t read_adamw_state(const std::string& path, const AdamWStateLayout& layout,
                         const std::function<void(int part, size_t i, Tensor&& values)>& take);

// AdamW over parameters, gradients and states of one structure: the weights' (ModelWeights),
// the whole model or a rank's shards (`scope`). AdamW is elementwise, so a shard's update is
// the slice of the full update once every rank uses the same global norm.
class AdamW {
 public:
  AdamW() = default;
  // fp32 master copies of `params`, which hold the part `scope` of the model.
  AdamW(const OptimizerConfig& config, const ModelWeights& params, const ParamScope& scope = {});

  // One step given the canonical global gradient norm of the whole model's gradients
  // (global_grad_norm, or parallel_grad_norm over shards). `grads` has the structure of the
  // parameters; shapes and finiteness are checked before any state changes (a non-finite
  // gradient fails naming the tensor). The masters are written into `params`, rounded to
  // bf16 in that recipe.
  OptimizerStepResult step(const ModelWeights& grads, float grad_norm, ModelWeights& params, Precision precision);
  // The same with the norm of `grads` (one rank holding the whole model).
  OptimizerStepResult step(const ModelWeights& grads, ModelWeights& params, Precision precision);

  int64_t steps_taken() const { return step_; }
  const ParamScope& scope() const { return scope_; }
  const ModelWeights& master() const { return master_; }
  const ModelWeights& exp_avg() const { return exp_avg_; }
  const ModelWeights& exp_avg_sq() const { return exp_avg_sq_; }
  // Replaces the state (e.g. full tensors gathered from shards, or a shard's slices of a
  // checkpoint's full state): each of this optimizer's structure and shapes.
  void load_state(int64_t step, const ModelWeights& master, const ModelWeights& exp_avg,
                  const ModelWeights& exp_avg_sq);

  // State as tensors ("master.<name>", "exp_avg.<name>", "exp_avg_sq.<name>") plus the step.
  void save(const std::string& path) const;
  // Loads state saved by save(); checks every name and shape against this optimizer.
  void load(const std::string& path);
  // Writes the master weights into a model (rounded to bf16 in that recipe).
  void copy_to_model(ModelWeights& weights, Precision precision) const;

 private:
  OptimizerStepResult update(const ModelWeights& grads, float grad_norm);
  void retie();

  OptimizerConfig config_;
  ParamScope scope_;
  int64_t step_ = 0;
  ModelWeights master_, exp_avg_, exp_avg_sq_;
};

}  // namespace lockstep
