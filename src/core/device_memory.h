// Allocation and copies on a device; the CUDA versions live in device_memory_cuda.cpp.
#pragma once
#include <cstddef>
#include <memory>

#include "core/tensor.h"

namespace lockstep {

std::shared_ptr<void> device_alloc(Device device, size_t bytes);
void device_memset_zero(Device device, void* p, size_t bytes);
void device_copy(Device dst_device, void* dst, Device src_device, const void* src, size_t bytes);
bool cuda_available();

}  // namespace lockstep
