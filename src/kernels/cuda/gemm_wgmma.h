// Entry points of the Hopper wgmma GEMM (gemm_wgmma.cu) beside gemm_with_config
// (configurations from kGemmMmaConfigs on, gemm.h): which configuration takes the SwiGLU
// output, and the test-only probe.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lockstep::cuda {

struct GemmArgs;
// Whether wgmma configuration i runs these arguments with out_kind = bf16_swiglu (the column
// form at 128 x 256; the TMA configurations hand a gathered A to it).
bool gemm_wgmma_takes_swiglu(const GemmArgs& args, int config);

// How the probe starts each accumulation (the whole K, or each chunk of the row form).
enum class WgmmaStart {
  zeroed_registers,  // accumulators set to 0.0f, every wgmma k16 step with scale-d = 1
  scale_d_zero       // accumulators hold NaN, the first k16 step with scale-d = 0
};

// The probe of whether one wgmma m64nNk16 step rounds exactly like one mma.sync m16n8k16
// step: out[64, N] (f32, row stride N) = A[64, K] * W[N, K]^T, each element accumulated in
// registers over the k16 steps in ascending k by wgmma m64n128k16 (one warpgroup per 128
// columns; N a multiple of 128; K a multiple of 8). chunks = 8: the canonical row form (8
// chunks of ceil(K / 8), k16 steps wholly in a chunk's zero padding skipped, the partials
// combined by gemm.cu's tree), chunks = 1: one accumulation over K. Synchronous.
void wgmma_probe(const __nv_bfloat16* A, const __nv_bfloat16* W, int N, int K, int chunks, WgmmaStart start,
                 float* out);

}  // namespace lockstep::cuda
