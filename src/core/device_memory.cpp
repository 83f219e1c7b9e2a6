#include "core/device_memory.h"

#include <cstdlib>
#include <cstring>

#include "core/error.h"

#ifdef LOCKSTEP_CUDA
#include <cuda_runtime.h>
#define LS_CUDA_OK(expr)                                                              \
  do {                                                                                \
    cudaError_t e_ = (expr);                                                          \
    LS_CHECK(e_ == cudaSuccess, #expr, " failed: ", cudaGetErrorString(e_));          \
  } while (0)
#endif

namespace lockstep {

std::shared_ptr<void> device_alloc(Device device, size_t bytes) {
  if (device == Device::cpu) {
    // 64-byte alignment for vector loads.
    size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    LS_CHECK(p, "out of host memory allocating ", bytes, " bytes");
    return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  }
#ifdef LOCKSTEP_CUDA
  void* p = nullptr;
  LS_CUDA_OK(cudaMalloc(&p, bytes));
  return std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
#else
  fail("--device cuda: this build has no CUDA backend (configure with -DLOCKSTEP_CUDA=ON)");
#endif
}

void device_memset_zero(Device device, void* p, size_t bytes) {
  if (device == Device::cpu) {
    std::memset(p, 0, bytes);
    return;
  }
#ifdef LOCKSTEP_CUDA
  LS_CUDA_OK(cudaMemset(p, 0, bytes));
#endif
}

void device_copy(Device dst_device, void* dst, Device src_device, const void* src, size_t bytes) {
  if (dst_device == Device::cpu && src_device == Device::cpu) {
    std::memcpy(dst, src, bytes);
    return;
  }
#ifdef LOCKSTEP_CUDA
  LS_CUDA_OK(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
#else
  fail("device copy: this build has no CUDA backend");
#endif
}

bool cuda_available() {
#ifdef LOCKSTEP_CUDA
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

}  // namespace lockstep
