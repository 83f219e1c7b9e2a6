// The warp-specialized TMA forms of the split outer sums (outer_sum_split_tma.cu) on the bf16
// gradient operand: a 128 x 256 tile (pending tree levels in a workspace slot a block) for
// long chunks, and a 128 x 128 tile (chunks in pairs, the levels on chip) for the experts'.
// Each problem's bits are those of its own outer_sum_split_tc call at any tile.
#pragma once
#include <cstdint>

#include "kernels/cuda/backward.h"

namespace lockstep::cuda {

// Whether the TMA tiles take an outer sum (weight: g's element (s, i) at g_pitch * s + i, else
// at g_pitch * i + s, in fp32 elements): the bf16 operand only, g_pitch and K multiples of 8;
// input gradients only with chunks of whole k16 steps (16 rows) starting at multiples of 8.
bool outer_sum_split_tma_applies(bool weight, int64_t g_pitch, int64_t K, const ChunkBounds& bounds,
                                 GradientOperand operand);

// CTAs a cluster for every later launch of these tiles: 1, or 2 (two row blocks share each m
// tile by TMA multicast; the default since session 23's H100 run, notes/gpu-trainer.md). The
// same bits either way; benchmarks and tests set it.
void set_outer_sum_tma_cluster(int ctas);
int outer_sum_tma_cluster();
// Input gradients' chunk pairs as one run of stages: a pair's k16 steps go to its first chunk's
// sum, then its second's, so a chunk of 96 rows takes no stage of its own for its last 32 (the
// experts' d x: 12 stages a tile, not 16). The same bits. Off: the 8-layer step measured 4.5 ms
// slower with it on the H100 (notes/gpu-trainer.md, session 23).
void set_outer_sum_input_pair_stages(bool on);
bool outer_sum_input_pair_stages();
// The experts' input gradient as one output: the d x of gate's rows and of up's summed in one
// tile (parts 2 of outer_sum_split_tma_grouped), where it was two [T k, H] fp32 outputs that
// add_rows_in_order read and added (1.07 GB of memory traffic a layer at 4 x 2048 tokens). The
// same bits. Off until it has run on the GPU (notes/gpu-trainer.md, session 25).
void set_outer_sum_input_parts_summed(bool on);
bool outer_sum_input_parts_summed();

// One problem (tile_columns 256 needs a workspace of outer_sum_split_workspace_floats()).
void outer_sum_split_tma(const SplitOuterSumGroup& one, bool weight, int64_t g_pitch, int64_t K, float* workspace,
                         cudaStream_t s, int tile_columns = 256);
// Up to kMaxWgmmaGroups groups from host memory in one launch (they travel as the kernel's
// parameters), each taken by outer_sum_split_tma_applies and I <= max_I.
// parts 2 (input gradients on the 128-column tile): the groups are two runs of count / 2, and
// the q-th group of both writes one output, of the same I: the first run's sum, then the second
// run's added to it by the CTA that wrote it: the bits of two outputs added afterwards.
void outer_sum_split_tma_grouped(const SplitOuterSumGroup* host_groups, int count, int64_t max_I, bool weight,
                                 int64_t g_pitch, int64_t K, const SplitSpans& spans, float* workspace, cudaStream_t s,
                                 int tile_columns = 128, int parts = 1);

}  // namespace lockstep::cuda
