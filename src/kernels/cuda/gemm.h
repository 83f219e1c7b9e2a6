// Batch-invariant bf16 GEMM on tensor cores: out[r, n] = sum_k A[r, k] * W[n, k] (fp32
// accumulation), docs/numerics.md, rules 1 and 2 on the GPU.
//
// Every output element is accumulated by the same sequence of mma.sync m16n8k16 steps in
// ascending k (K tiles of 64; k16 steps wholly inside a chunk's zero padding are skipped),
// whatever the tile shape, the number of rows or the group the row belongs to: a row's
// result never depends on the batch. There is no split-K. The row form (chunks = 8) cuts K
// into 8 canonical chunks of ceil(K / 8), sums each chunk separately and combines the
// partials by the tree ((c0+c1)+(c2+c3))+((c4+c5)+(c6+c7)) (in the kernel, or in a second
// kernel from per-chunk CTAs: the same operations), so it is the same function as a
// TP-split row-parallel linear.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lockstep::cuda {

enum class GemmOut {
  f32,            // out_f32[o, n] = acc
  bf16,           // out_bf16[o, n] = bf16(acc)
  bf16_residual,  // out_bf16[o, n] = bf16(resid[o, n] + bf16(acc)); resid may alias out
  // W's rows are [gate | up] (N = 2I): out_bf16[o, c] = bf16(SwiGLU(bf16(acc[c]),
  // bf16(acc[I + c]))) for c < I, the swiglu kernel's operations on the bf16 [gate | up] row.
  // Only the wgmma column form at 128 x 256 computes it (gemm_takes_swiglu says when gemm()
  // does).
  bf16_swiglu
};

struct GemmArgs {
  // A: logical rows r = 0..M-1, each K bf16 values at A + row(r) * lda, where row(r) =
  // a_gather ? a_gather[r] : r.
  const __nv_bfloat16* A = nullptr;
  int64_t lda = 0;
  const int32_t* a_gather = nullptr;
  // > 0: element k of an A row is bf16(SwiGLU(row[k], row[k + a_swiglu_up])) (the MoE down
  // projection at small steps reads the [gate | up] rows: no separate SwiGLU kernel). Only the
  // small-step configurations take it (gemm_small_step() says whether gemm() picks one).
  int64_t a_swiglu_up = 0;
  // W: per group [N, K] row-major with row stride ldw; group g at W + g * w_group_stride.
  const __nv_bfloat16* W = nullptr;
  int64_t ldw = 0;
  int64_t w_group_stride = 0;
  int64_t M = 0, N = 0, K = 0;
  int chunks = 1;  // 1: column form; 8: canonical row form
  // Groups (MoE experts): rows [group_rows[g], group_rows[g + 1]) use W group g; device
  // memory, groups + 1 entries, group_rows[groups] == M. nullptr: one group of M rows.
  const int32_t* group_rows = nullptr;
  int groups = 1;
  // group_rows was written by a kernel before the previous one in the stream (which waited for
  // it), so a small-step kernel may read it, and start its weight loads, before it waits.
  bool group_rows_settled = false;
  // Output row of logical row r: out_scatter ? out_scatter[r] : r; row stride ldo.
  GemmOut out_kind = GemmOut::bf16;
  float* out_f32 = nullptr;
  __nv_bfloat16* out_bf16 = nullptr;
  const __nv_bfloat16* resid = nullptr;
  int64_t ldo = 0;
  const int32_t* out_scatter = nullptr;
  // Host-side hint of the typical rows per group (picks the tile shape only; never the numbers).
  int64_t rows_hint = -1;
  // Row form only: scratch of split_workspace_floats floats (device). gemm() may then compute
  // the 8 chunk sums in separate CTAs (fp32 partials here) and combine them by the same tree
  // in a second kernel: the same bits, 8x the CTAs for latency-bound small steps. With
  // gemm_with_config, a non-null workspace forces that path (it must hold 8 * M * N).
  float* split_workspace = nullptr;
  int64_t split_workspace_floats = 0;
};

void gemm(const GemmArgs& args, cudaStream_t stream);
// Whether gemm() takes these arguments with out_kind = bf16_swiglu (the MoE gate_up at large
// steps: the SwiGLU in the epilogue, no [gate | up] round trip through memory).
bool gemm_takes_swiglu(const GemmArgs& args);
// Whether gemm() runs these arguments in a small-step configuration (which takes a_swiglu_up).
bool gemm_small_step(const GemmArgs& args);

// Which tile configurations exist (tests run each on the same problem and compare bits):
// 0-6 the tiled kernel (16x32 ... 128x256), 7-10 the small-step kernel (row tiles of 8, one
// weight stream per warp), 11-12 the tiled kernel's row form for large steps with the tree's
// short-lived partials in shared memory (64x128 at 2 CTAs per SM, 128x128 of 16 warps);
// from kGemmMmaConfigs on, the wgmma kernels of gemm_wgmma.cu (Hopper warpgroup MMA, config
// kGemmMmaConfigs + i is their configuration i; 4-6 the warp-specialized TMA kernels).
constexpr int kGemmMmaConfigs = 13;
constexpr int kGemmWgmmaConfigs = 7;
constexpr int kGemmConfigs = kGemmMmaConfigs + kGemmWgmmaConfigs;
void gemm_with_config(const GemmArgs& args, int config, cudaStream_t stream);
// Configuration i of the wgmma kernels (0 <= i < kGemmWgmmaConfigs).
void gemm_wgmma_with_config(const GemmArgs& args, int config, cudaStream_t stream);

}  // namespace lockstep::cuda
