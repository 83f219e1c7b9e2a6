// Shared helpers of the CUDA kernels: error checks and bf16 conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/error.h"

#define LS_CUDA_CHECK(expr)                                                             \
  do {                                                                                  \
    cudaError_t ls_err_ = (expr);                                                       \
    LS_CHECK(ls_err_ == cudaSuccess, #expr, " failed: ", cudaGetErrorString(ls_err_));  \
  } while (0)

// After a launch: a bad configuration shows up here, not at the next synchronisation.
#define LS_CUDA_LAUNCHED() LS_CUDA_CHECK(cudaGetLastError())

namespace lockstep::cuda {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
// Round to nearest even (the recipe's only cast).
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Lets a kernel launched after this one with programmatic dependent launch (the GEMMs) start
// now: it prefetches weights and waits (griddepcontrol.wait) for this kernel's results.
__device__ __forceinline__ void allow_next_kernel_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::); }

}  // namespace lockstep::cuda
