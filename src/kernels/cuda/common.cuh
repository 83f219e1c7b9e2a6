// Shared helpers of the CUDA kernels: error checks and bf16 conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

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

// 2^x, and e^x as 2^(x * log2 e), on the special function unit (ex2.approx: relative error about
// 2^-22, subnormal results flushed to zero; exp(-inf) = 0). One instruction after the multiply
// where expf takes about a dozen; a kernel that uses it does so in every path (prefill and
// decode alike), so its bits stay one fixed function of the inputs.
__device__ __forceinline__ float exp2_sfu(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float exp_sfu(float x) { return exp2_sfu(x * 1.44269504088896341f); }

// SwiGLU of one element, bf16 inputs widened: the one procedure of every kernel that applies it.
__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.0f + expf(-g)) * u; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
// The streaming multiprocessors of the device current at the first call (one GPU a process).
inline int sm_count() {
  static const int count = [] {
    int device = 0, n = 0;
    LS_CUDA_CHECK(cudaGetDevice(&device));
    LS_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }();
  return count;
}

// Programmatic dependent launch: every kernel of the forward is launched with
// launch_after_previous(), so its launch and setup overlap the previous kernel in the stream.
// Before touching memory a kernel waits for the previous kernel (its completion and its
// memory: wait_for_previous_kernel); allow_next_kernel_launch lets the next kernel start.
// The GEMMs prefetch weights (read-only) between the two. Without a programmatic launch the
// wait returns at once.
__device__ __forceinline__ void wait_for_previous_kernel() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void allow_next_kernel_launch() { asm volatile("griddepcontrol.launch_dependents;\n" ::); }
// The prologue of a kernel that reads nothing before the previous kernel is done.
__device__ __forceinline__ void start_after_previous() {
  wait_for_previous_kernel();
  allow_next_kernel_launch();
}

// The launch attribute of clusters of `cluster` CTAs along x.
inline cudaLaunchAttribute cluster_attribute(unsigned cluster) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return attr;
}

// How a kernel is launched: after_previous, a programmatic dependent launch (the kernel waits
// with wait_for_previous_kernel before touching memory); cluster, CTAs a cluster along x (1: no
// cluster attribute).
struct LaunchOptions {
  bool after_previous = false;
  unsigned cluster = 1;
};

template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   LaunchOptions options, Args&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned count = 0;
  if (options.after_previous) {
    attr[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (options.cluster > 1) attr[count++] = cluster_attribute(options.cluster);
  cfg.attrs = attr;
  cfg.numAttrs = count;
  LS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

template <typename... KernelArgs, typename... Args>
void launch_after_previous(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                           Args&&... args) {
  launch_kernel(kernel, grid, block, smem, stream, LaunchOptions{true, 1}, std::forward<Args>(args)...);
}

// How many clusters of `cluster` CTAs of `kernel` (block threads, smem bytes of dynamic shared
// memory) the GPU holds at once: a persistent grid's size (a GPC with an odd number of SMs left
// over holds one CTA fewer than its SMs).
template <typename... KernelArgs>
int max_active_clusters(void (*kernel)(KernelArgs...), int block, size_t smem, unsigned cluster) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(sm_count()));
  cfg.blockDim = dim3(unsigned(block));
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr = cluster_attribute(cluster);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  LS_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
  LS_CHECK(clusters > 0, "no cluster of ", cluster, " CTAs of this kernel fits the GPU");
  return clusters;
}

}  // namespace lockstep::cuda
