// The warpgroup-MMA (wgmma, sm_90a) form of outer_sum_split_tc's 128 x 256 tile, launched by
// outer_sum_split_tc.cu for SplitTile::wgmma128x256.
#pragma once
#include <cstdint>

#include "kernels/cuda/backward.h"

namespace lockstep::cuda {

// Floats of one block's pending tree levels 0 and 1 (128 x 256 outputs each): the same slot
// size as the mma.sync 128 x 256 tile's, so one workspace serves both.
constexpr int64_t kSplitPendingFloats = 2 * 128 * 256;

// weight: g's element (s, i) at g_pitch * s + i (weight gradients), else at g_pitch * i + s.
// One problem a launch (no group table: see the .cu file's header).
void outer_sum_split_wgmma(const SplitOuterSumGroup& one, bool weight, int64_t g_pitch, int64_t K, float* workspace,
                           cudaStream_t s);

}  // namespace lockstep::cuda
