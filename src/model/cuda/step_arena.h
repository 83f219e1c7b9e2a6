// Device memory for the buffers of one training step, kept from step to step: the step's
// allocations are carved from one block sized by the largest step so far, so once the sizes
// repeat a step makes no cudaMalloc and no cudaFree (which synchronises the device). A step
// larger than the block takes its overflow from the allocator, and the next reset() sizes the
// block for it. Bits never depend on where a buffer lies. (The device is a parameter so that
// the bookkeeping is tested on the CPU too.)
#pragma once
#include <algorithm>
#include <memory>
#include <vector>

#include "core/device_memory.h"

namespace lockstep::cuda_model {

class StepArena {
 public:
  explicit StepArena(Device device = Device::cuda) : device_(device) {}

  template <typename T>
  T* alloc(int64_t n) {
    // cudaMalloc's alignment, so vector loads and TMA descriptors see the same addresses' kind.
    const size_t bytes = (size_t(std::max<int64_t>(n, 1)) * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    if (!block_ && want_ > 0) {
      block_ = device_alloc(device_, want_);
      capacity_ = want_;
    }
    void* p = nullptr;
    if (offset_ + bytes <= capacity_) {
      p = static_cast<char*>(block_.get()) + offset_;
      offset_ += bytes;
    } else {
      overflow_.push_back(device_alloc(device_, bytes));
      p = overflow_.back().get();
    }
    used_ += bytes;
    return static_cast<T*>(p);
  }

  // The step's buffers are free again (call after the stream is done with them). The block
  // stays if it held the whole step; else it goes and the next step's first alloc makes one
  // of the size of the largest step so far.
  void reset() {
    want_ = std::max(want_, used_);
    used_ = offset_ = 0;
    if (!overflow_.empty() || capacity_ < want_) {
      overflow_.clear();
      block_.reset();
      capacity_ = 0;
    }
  }

  // Before a step's first alloc, its planned bytes (the memory plan's): a plan larger than any
  // before drops the block, so that the step allocates afresh (then sizes the block) rather
  // than overflowing a block whose unused tail the plan did not count.
  void prepare(double planned_bytes) {
    if (planned_bytes <= planned_ || used_ > 0) return;
    planned_ = planned_bytes;
    block_.reset();
    capacity_ = want_ = 0;
  }

  // Frees the block between steps (nothing allocated since the last reset), for memory the
  // rollout engine's own buffers need; the next step makes it again.
  void release_if_idle() {
    if (used_ > 0) return;
    block_.reset();
    capacity_ = 0;
  }

  // Device bytes held between steps (free for the next step's buffers).
  size_t held_bytes() const { return used_ > 0 ? 0 : capacity_; }

 private:
  static constexpr size_t kAlign = 256;
  Device device_;
  std::shared_ptr<void> block_;
  // offset_: the block's bytes handed out this step; used_: all bytes of this step (block and
  // overflow); want_: the largest step's; planned_: the largest plan prepared for.
  size_t capacity_ = 0, offset_ = 0, used_ = 0, want_ = 0;
  double planned_ = 0;
  std::vector<std::shared_ptr<void>> overflow_;
};

}  // namespace lockstep::cuda_model
