// The warpgroup-MMA (wgmma, sm_90a) forms of outer_sum_split_tc: a 128 x 256 tile launched by
// outer_sum_split_tc.cu for SplitTile::wgmma128x256, and a grouped 128 x 128 tile for the experts.
#pragma once
#include <cstdint>

#include "kernels/cuda/backward.h"

namespace lockstep::cuda {

// Floats of one block's pending tree levels 0 and 1 (128 x 256 outputs each): the same slot
// size as the mma.sync 128 x 256 tile's, so one workspace serves both.
constexpr int64_t kSplitPendingFloats = 2 * 128 * 256;

// weight: g's element (s, i) at g_pitch * s + i (weight gradients), else at g_pitch * i + s.
// The 128 x 256 tile, one problem a launch (pending levels in the workspace).
void outer_sum_split_wgmma(const SplitOuterSumGroup& one, bool weight, int64_t g_pitch, int64_t K, float* workspace,
                           cudaStream_t s, GradientOperand operand);
// The 128 x 128 tile over up to 256 groups given in host memory (they travel as the kernel's
// parameters; see the .cu file's header), each group's bits those of its own call.
void outer_sum_split_wgmma_grouped(const SplitOuterSumGroup* host_groups, int count, int64_t max_I, bool weight,
                                   int64_t g_pitch, int64_t K, cudaStream_t s, GradientOperand operand);

}  // namespace lockstep::cuda
