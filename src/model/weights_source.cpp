#include "model/weights_source.h"

#include "core/error.h"

namespace lockstep {

WeightsSource::WeightsSource(const ModelWeights& weights, std::string description)
    : tensors_(weights.named()), description_(std::move(description)) {}

std::vector<std::string> WeightsSource::names() const {
  std::vector<std::string> out;
  for (const auto& [name, t] : tensors_) out.push_back(name);
  return out;
}

Shape WeightsSource::shape(const std::string& name) const {
  LS_CHECK(contains(name), description_, ": no tensor '", name, "'");
  return tensors_.at(name)->shape();
}

DType WeightsSource::dtype(const std::string& name) const {
  LS_CHECK(contains(name), description_, ": no tensor '", name, "'");
  return tensors_.at(name)->dtype();
}

Tensor WeightsSource::read(const std::string& name, const Box& box) const {
  LS_CHECK(contains(name), description_, ": no tensor '", name, "'");
  return slice_tensor(*tensors_.at(name), box);
}

}  // namespace lockstep
