// The cost of one k16 step in a chain of dependent steps, the unit of every decode GEMM at one
// token (the contract keeps one accumulator per output element in ascending k): mma.sync
// m16n8k16 (the one-launch decode's form) with 1, 2 and 4 independent chains per warp, and
// warpgroup MMA m64n8k16 (operands in shared memory) with 1, 2 and 4 chains per warpgroup.
// Prints cycles per step (clock64 around 128 steps, one CTA).
//
//   mma_chain_latency
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace {

using namespace lockstep::cuda;

constexpr int kSteps = 128;  // K = 2048: a hidden-size column chain

template <int CHAINS>
__global__ void mma_sync_chains(float* out, long long* cycles) {
  const uint32_t a[4] = {threadIdx.x, threadIdx.x * 3u, 7u, 9u};
  float c[CHAINS][4] = {};
  const long long t0 = clock64();
  for (int s = 0; s < kSteps; ++s)
#pragma unroll
    for (int ch = 0; ch < CHAINS; ++ch) mma_bf16(c[ch], a, uint32_t(s + ch), uint32_t(s) * 5u);
  const long long t1 = clock64();
  float v = 0;
  for (int ch = 0; ch < CHAINS; ++ch) v += c[ch][0] + c[ch][1] + c[ch][2] + c[ch][3];
  out[threadIdx.x] = v;
  if (threadIdx.x == 0) *cycles = t1 - t0;
}

__device__ __forceinline__ void wgmma_m64n8k16(float (&d)[4], uint64_t da, uint64_t db, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, %4, %5, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "l"(da), "l"(db), "r"(scale_d));
}

template <int CHAINS>
__global__ void wgmma_chains(float* out, long long* cycles) {
  __shared__ __align__(1024) unsigned char operands[(64 + 8) * 128];  // A: 64 rows, B: 8 rows of 64 k
  for (int i = int(threadIdx.x); i < int(sizeof(operands)) / 4; i += int(blockDim.x))
    reinterpret_cast<uint32_t*>(operands)[i] = 0x3f803f80u ^ uint32_t(i);
  fence_proxy_async();
  __syncthreads();
  float d[CHAINS][4];
  const uint32_t a = smem_addr(operands), b = a + 64 * 128;
  const long long t0 = clock64();
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < kSteps; ++s)
#pragma unroll
    for (int ch = 0; ch < CHAINS; ++ch)
      wgmma_m64n8k16(d[ch], smem_desc(a) + 2 * (s & 3), smem_desc(b) + 2 * (s & 3), s > 0);
  wgmma_commit();
  wgmma_wait<0>();
  const long long t1 = clock64();
  float v = 0;
  for (int ch = 0; ch < CHAINS; ++ch) v += d[ch][0] + d[ch][1] + d[ch][2] + d[ch][3];
  out[threadIdx.x] = v;
  if (threadIdx.x == 0) *cycles = t1 - t0;
}

template <typename Kernel>
void report(const char* name, Kernel kernel, int threads, int chains, float* out, long long* cycles) {
  for (int rep = 0; rep < 2; ++rep) kernel<<<1, threads>>>(out, cycles);  // the first: warm-up
  long long host = 0;
  const cudaError_t e = cudaMemcpy(&host, cycles, sizeof host, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    std::printf("%s: %s\n", name, cudaGetErrorString(e));
    return;
  }
  std::printf("{\"kernel\":\"%s\",\"chains\":%d,\"steps\":%d,\"cycles\":%lld,\"cycles_per_step\":%.1f}\n", name, chains,
              kSteps, host, double(host) / kSteps);
}

}  // namespace

int main() {
  float* out = nullptr;
  long long* cycles = nullptr;
  if (cudaMalloc(&out, 128 * sizeof(float)) != cudaSuccess || cudaMalloc(&cycles, sizeof(long long)) != cudaSuccess) {
    std::printf("mma_chain_latency: no CUDA device\n");
    return 0;
  }
  report("mma.sync m16n8k16", mma_sync_chains<1>, 32, 1, out, cycles);
  report("mma.sync m16n8k16", mma_sync_chains<2>, 32, 2, out, cycles);
  report("mma.sync m16n8k16", mma_sync_chains<4>, 32, 4, out, cycles);
  report("wgmma m64n8k16", wgmma_chains<1>, 128, 1, out, cycles);
  report("wgmma m64n8k16", wgmma_chains<2>, 128, 2, out, cycles);
  report("wgmma m64n8k16", wgmma_chains<4>, 128, 4, out, cycles);
  return 0;
}
