// In-memory weights seen as a checkpoint, so `lockstep audit` can fingerprint live weights
// (the trainer's after a sync, the engine's) the same way it does files.
#pragma once
#include "checkpoint/sharded.h"
#include "model/weights.h"

namespace lockstep {

class WeightsSource final : public CheckpointSource {
 public:
  WeightsSource(const ModelWeights& weights, std::string description);
  std::string describe() const override { return description_; }
  std::vector<std::string> names() const override;
  bool contains(const std::string& name) const override { return tensors_.count(name) != 0; }
  Shape shape(const std::string& name) const override;
  DType dtype(const std::string& name) const override;
  Tensor read(const std::string& name, const Box& box) const override;

 private:
  std::map<std::string, const Tensor*> tensors_;
  std::string description_;
};

}  // namespace lockstep
