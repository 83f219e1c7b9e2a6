// AdamW with fp32 master weights, learning-rate schedules, and clipping by the canonical
// global gradient norm (docs/numerics.md, rule 11).
#pragma once
#include <cstdint>
#include <map>
#include <string>

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
// (zero-padded), each summed in ascending order in fp32, combined by the pairwise tree.
float canonical_sum_squares(const float* x, int64_t n);
// sqrt of the per-tensor canonical sums, added in global-name (map) order in fp32.
float global_grad_norm(const std::map<std::string, Tensor>& grads);

struct OptimizerStepResult {
  float grad_norm = 0;  // before clipping
  double lr = 0;
  bool clipped = false;
};

class AdamW {
 public:
  AdamW() = default;
  // Takes master copies (fp32) of every parameter of `weights`, by global name.
  AdamW(const OptimizerConfig& config, const ModelWeights& weights);

  // One step. `grads` holds an fp32 gradient for every parameter (checked: names, shapes,
  // finiteness; a non-finite gradient fails naming the tensor, before any state changes).
  // The model's weights become the master weights, rounded to bf16 in that recipe.
  OptimizerStepResult step(std::map<std::string, Tensor>& grads, ModelWeights& weights, Precision precision);

  // Sharded form (parallel/parallel_backward.h): masters of the given tensors (a rank's
  // shards, by global name). AdamW is elementwise, so a shard's update is the slice of the
  // full update once every rank uses the same global norm.
  AdamW(const OptimizerConfig& config, const std::vector<std::pair<std::string, Tensor*>>& params);
  // One step given the canonical global gradient norm of all shards (parallel_grad_norm);
  // the same checks and arithmetic as step(). Writes the masters into `params`.
  OptimizerStepResult step_sharded(std::map<std::string, Tensor>& grads, float grad_norm,
                                   const std::vector<std::pair<std::string, Tensor*>>& params, Precision precision);

  int64_t steps_taken() const { return step_; }
  const std::map<std::string, Tensor>& master() const { return master_; }
  const std::map<std::string, Tensor>& exp_avg() const { return exp_avg_; }
  const std::map<std::string, Tensor>& exp_avg_sq() const { return exp_avg_sq_; }
  // Replaces the state (e.g. full tensors gathered from shards, or a shard's slices of a
  // checkpoint's full state); every map must hold exactly this optimizer's names and shapes.
  void load_state(int64_t step, const std::map<std::string, Tensor>& master, const std::map<std::string, Tensor>& exp_avg,
                  const std::map<std::string, Tensor>& exp_avg_sq);

  // State as tensors ("master.<name>", "exp_avg.<name>", "exp_avg_sq.<name>") plus the step.
  void save(const std::string& path) const;
  // Loads state saved by save(); checks every name and shape against this optimizer.
  void load(const std::string& path);
  // Writes the master weights into a model (rounded to bf16 in that recipe).
  void copy_to_model(ModelWeights& weights, Precision precision) const;

 private:
  void check_grads(const std::map<std::string, Tensor>& grads) const;
  OptimizerStepResult update(const std::map<std::string, Tensor>& grads, float grad_norm);

  OptimizerConfig config_;
  int64_t step_ = 0;
  std::map<std::string, Tensor> master_, exp_avg_, exp_avg_sq_;
};

}  // namespace lockstep
