#include "train/grad_accumulate.h"

#include "core/error.h"
#include "kernels/canonical.h"

namespace lockstep {

std::vector<std::pair<int64_t, int64_t>> canonical_microbatches(int64_t batch_size, int64_t num_microbatches) {
  LS_CHECK(is_power_of_two(num_microbatches), "--num-microbatches must be a power of two, got ", num_microbatches);
  LS_CHECK(batch_size % num_microbatches == 0, "--global-batch-size ", batch_size,
           " does not divide into --num-microbatches ", num_microbatches);
  const int64_t size = batch_size / num_microbatches;
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t m = 0; m < num_microbatches; ++m) out.push_back({m * size, (m + 1) * size});
  return out;
}

void add_grads(GradMap& a, const GradMap& b) {
  LS_CHECK(a.size() == b.size(), "add_grads: ", a.size(), " vs ", b.size(), " tensors");
  for (auto& [name, t] : a) {
    auto it = b.find(name);
    LS_CHECK(it != b.end() && it->second.numel() == t.numel(), "add_grads: tensor ", name, " missing or mis-shaped");
    float* x = t.data<float>();
    const float* y = it->second.data<float>();
    for (int64_t i = 0; i < t.numel(); ++i) x[i] += y[i];
  }
}

PairwiseGradAccumulator::PairwiseGradAccumulator(int64_t count) : count_(count) {
  LS_CHECK(is_power_of_two(count), "gradient accumulation: the micro-batch count must be a power of two, got ", count);
}

void PairwiseGradAccumulator::push(GradMap grads) {
  LS_CHECK(pushed_ < count_, "gradient accumulation: more than ", count_, " micro-batches pushed");
  ++pushed_;
  stack_.push_back({0, std::move(grads)});
  // Two partials of the same level are siblings in the tree: left + right.
  while (stack_.size() >= 2 && stack_[stack_.size() - 1].first == stack_[stack_.size() - 2].first) {
    auto right = std::move(stack_.back());
    stack_.pop_back();
    add_grads(stack_.back().second, right.second);
    ++stack_.back().first;
  }
}

GradMap PairwiseGradAccumulator::finish() {
  LS_CHECK(pushed_ == count_ && stack_.size() == 1, "gradient accumulation: ", pushed_, " of ", count_,
           " micro-batches pushed");
  GradMap out = std::move(stack_.back().second);
  stack_.clear();
  pushed_ = 0;
  return out;
}

}  // namespace lockstep
