// The warp-specialized Hopper GEMM (gemm_tma.cu): TMA loads, mbarriers, persistent CTAs.
// Reached through gemm_wgmma_with_config; the same bits as every other configuration.
#pragma once
#include <cuda_runtime.h>

#include "kernels/cuda/gemm.h"

namespace lockstep::cuda {

constexpr int kGemmTmaConfigs = 3;

// Whether the TMA kernels take these arguments: A neither gathered nor transformed on load,
// 16-byte aligned rows, groups' weights back to back, and (row form) chunks of whole k16
// steps (a TMA tile cannot zero the part of a k16 step past a chunk's end).
bool gemm_tma_applies(const GemmArgs& args);

// CTAs a cluster for every later launch of the TMA kernels: 1, or 2 (a pair shares one operand
// tile by TMA multicast: W for ungrouped problems, A for grouped; the default since session 23's
// H100 run, notes/gpu-trainer.md). The same bits either way.
void set_gemm_tma_cluster(int ctas);
int gemm_tma_cluster();

// Configuration i (0 <= i < kGemmTmaConfigs) of the TMA kernels; gemm_tma_applies(args) must hold.
void gemm_tma_with_config(const GemmArgs& args, int config, cudaStream_t stream);

}  // namespace lockstep::cuda
