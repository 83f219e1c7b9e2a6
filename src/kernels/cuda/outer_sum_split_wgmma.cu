// outer_sum_split_tc's procedure on warpgroup MMAs (wgmma): the same bits, the operands read by
// the tensor cores straight from shared memory (no ldmatrix, no per-warp fragments).
//
// Two warpgroups of 64 output rows i x BK columns k. A stage is 64 summed rows s of three tiles
// in wgmma's 128-byte swizzle: g's hi and lo halves and m. m [s][k] is MN-major (k contiguous):
// atoms of 64 k x the stage's 64 rows, 8 KB apart. g is MN-major too for weight gradients
// ([s][i], i contiguous) and K-major for input gradients ([i][s]: a row of 64 s is 128 bytes).
// cp.async copies 16-byte pieces; split_hi_lo's layout puts the hi and the lo of 8 values in
// adjacent pieces, so they go to the two tiles.
//
// Per output element the procedure is the mma.sync kernel's: per chunk a zeroed accumulator,
// k16 steps from the chunk's first row (rows past its end zero in both operands, no step
// wholly past it), each step the hi MMA then the lo MMA, the partials folded by the pairwise
// tree. One wgmma k16 step rounds like one mma.sync m16n8k16 step (gemm_wgmma.cu's probe), so
// the bits are the same.
//
// Two tiles: 128 x 256 for long chunks (the pending tree levels 0 and 1 in the block's
// workspace slot, level 2 in the output), and 128 x 128 for the experts' short chunks (level 0
// in registers beside the accumulators, level 1 in shared memory: no memory traffic a chunk
// but level 2's, which both tiles keep in the output).
//
// The problems come as a __grid_constant__ parameter, not a table in device memory: the number
// of k16 steps of a chunk's last stage then derives from uniform values only. With the chunk
// bounds loaded from memory, ptxas serialises every wgmma behind that branch (C7520).
#include <algorithm>

#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/outer_sum_chunks.cuh"
#include "kernels/cuda/outer_sum_split_wgmma.h"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda {

namespace {

constexpr int kThreads = 256;                  // two warpgroups
constexpr int kBI = 128;                       // output rows a tile
constexpr int kRows = 64;                      // summed rows a stage: four k16 steps
constexpr int kAtom = kRows * 128;             // bytes of 64 MN-major columns over a stage's rows
constexpr int kATile = kBI * kRows * 2;        // hi or lo: 16 KB
constexpr int kMaxProblems = kMaxWgmmaGroups;  // the experts' largest launch: gate and up of 128

// One problem: SplitOuterSumGroup in 32-bit counts, so that 256 fit the parameter space.
struct Problem {
  const bf16_t* g;
  const bf16_t* m;
  float* out;
  int32_t I, chunk_count;
  int32_t rows[kTMax + 1];
};
struct Problems {
  int32_t count;
  Problem p[kMaxProblems];
};

// kLo: the stage holds g's lo tile too. The ring takes as many stages as shared memory holds
// (the bf16 operand's stages are a third smaller, so its loads run further ahead).
template <int kBK, bool kLo>
struct WgTile {
  static constexpr int Acc = kBK / 2, Fragments = Acc / 4;  // a thread's
  static constexpr bool PendingInRegisters = kBK == 128;    // level 0 (registers), 1 (shared); else the workspace
  static constexpr int BTile = kBK * kRows * 2, StageBytes = (kLo ? 2 : 1) * kATile + BTile;
  static constexpr int PendingSmemBytes = PendingInRegisters ? Fragments * kThreads * 16 : 0;
  static constexpr int Stages = std::min(6, (227 * 1024 - 1024 - PendingSmemBytes) / StageBytes);
  static constexpr int SmemBytes = 1024 + Stages * StageBytes + PendingSmemBytes;  // 1 KB to align
};
static_assert(2 * WgTile<256, true>::Acc * kThreads == kSplitPendingFloats, "the workspace slot holds levels 0 and 1");
static_assert(WgTile<256, true>::Stages == 3 && WgTile<128, true>::Stages == 3, "the exact operand's ring");
static_assert(WgTile<256, false>::Stages == 4 && WgTile<128, false>::Stages == 5, "the bf16 operand's ring");

// Tiles t = blockIdx.x, blockIdx.x + gridDim.x, ... (one block an SM): column block t % tiles_k,
// row block (t / tiles_k) % tiles_i of problem t / (tiles_k tiles_i). kLo: g split, the lo
// halves' MMAs too (GradientOperand::exact_hi_lo); else g packed by pack_bf16_rows
// (GradientOperand::bf16), loaded into the hi tile.
template <bool kWeight, int kBK, bool kLo>
__global__ void __launch_bounds__(kThreads, 1)
    outer_sum_split_wgmma_kernel(const __grid_constant__ Problems problems, int64_t g_pitch, int64_t K, int64_t tiles_k,
                                 int64_t tiles_i, int64_t tiles, float* workspace) {
  using Tile = WgTile<kBK, kLo>;
  constexpr int kStages = Tile::Stages;
  // Stages loaded ahead: all but two slots, one stage's MMAs staying in flight while the next
  // stage's are issued. The 128-wide tile (the experts' short chunks, ~1 stage each) takes the
  // chunks in pairs, 2m into x and 2m + 1 into y, so the MMAs drain once a pair, not once a
  // chunk; x is then the pending level 0 that y's fold reads.
  constexpr bool kPairs = Tile::PendingInRegisters;
  constexpr int kAhead = kStages - 2;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  float4* pending = Tile::PendingInRegisters
                        ? reinterpret_cast<float4*>(smem_raw + (base - raw) + kStages * Tile::StageBytes)
                        : reinterpret_cast<float4*>(workspace + int64_t(blockIdx.x) * kSplitPendingFloats);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const Problem& problem = problems.p[tile / (tiles_k * tiles_i)];
    const int64_t k0 = (tile % tiles_k) * kBK, i0 = (tile / tiles_k % tiles_i) * kBI, I = problem.I;
    if (i0 >= I) continue;  // the tiles cover the largest problem
    const bf16* __restrict__ g = problem.g;
    const bf16* __restrict__ m = problem.m;
    float* __restrict__ out = problem.out;
    const int32_t* chunk_rows = problem.rows;
    const int chunk_count = problem.chunk_count;
    __syncthreads();  // the previous tile is done with the stages

    // One stage (chunk rows [s0, end)) into ring slot `slot`: 2048 pieces of g (hi and lo of
    // 1024 groups of 8, adjacent threads a group's two halves) and BK * 8 of m.
    auto load = [&](int slot, int64_t s0, int64_t end) {
      const uint32_t a_hi = base + slot * Tile::StageBytes, a_lo = a_hi + kATile, b = a_hi + (kLo ? 2 : 1) * kATile;
      if constexpr (!kLo) {
#pragma unroll
        for (int j = 0; j < kBI * kRows / 8 / kThreads; ++j) {
          const int idx = tid + j * kThreads;
          int64_t i, s;
          uint32_t at;
          if constexpr (kWeight) {
            const int piece = idx % (kBI / 8), row = idx / (kBI / 8);
            i = i0 + 8 * piece, s = s0 + row;
            at = (piece / 8) * kAtom + row * 128 + (((piece % 8) ^ (row % 8)) << 4);
          } else {
            const int piece = idx % (kRows / 8), row = idx / (kRows / 8);
            i = i0 + row, s = s0 + 8 * piece;
            at = row * 128 + ((piece ^ (row % 8)) << 4);
          }
          const bool valid = i < I && s < end;
          const int64_t f = kWeight ? 2 * s * g_pitch + i : 2 * i * g_pitch + s;
          cp_async16(a_hi + at, valid ? g + f : g, valid);
        }
      }
#pragma unroll
      for (int j = 0; j < (kLo ? 2 * kBI * kRows / 8 / kThreads : 0); ++j) {
        const int idx = tid + j * kThreads, half = idx & 1;
        int64_t i, s;
        uint32_t at;
        if constexpr (kWeight) {  // [s][i]: 16 groups along i a row, the row is s
          const int piece = (idx >> 1) % (kBI / 8), row = idx / (kBI / 4);
          i = i0 + 8 * piece, s = s0 + row;
          at = (piece / 8) * kAtom + row * 128 + (((piece % 8) ^ (row % 8)) << 4);
        } else {  // [i][s]: 8 groups along s a row, the row is i
          const int piece = (idx >> 1) % (kRows / 8), row = idx / (kRows / 4);
          i = i0 + row, s = s0 + 8 * piece;
          at = row * 128 + ((piece ^ (row % 8)) << 4);
        }
        const bool valid = i < I && s < end;
        const int64_t f = kWeight ? s * g_pitch + i : i * g_pitch + s;  // a multiple of 8
        cp_async16((half ? a_lo : a_hi) + at, valid ? g + 2 * f + 8 * half : g, valid);
      }
#pragma unroll
      for (int j = 0; j < kBK * kRows / 8 / kThreads; ++j) {
        const int idx = tid + j * kThreads, piece = idx % (kBK / 8), row = idx / (kBK / 8);
        const int64_t k = k0 + 8 * piece, s = s0 + row;
        const bool valid = k < K && s < end;
        cp_async16(b + (piece / 8) * kAtom + row * 128 + (((piece % 8) ^ (row % 8)) << 4), valid ? m + s * K + k : m,
                   valid);
      }
    };
    StageLoader<kRows, kStages, int32_t> loader(chunk_rows, chunk_count);  // kAhead stages ahead
    auto load_next = [&]() { loader.next(load); };
#pragma unroll
    for (int p = 0; p < kAhead; ++p) load_next();

    int slot = 0;
    // Chunk c's stages into acc; one stage's MMAs may still be running on return.
    const auto run_chunk = [&](float(&acc)[Tile::Acc], int c) {
#pragma unroll
      for (int e = 0; e < Tile::Acc; ++e) acc[e] = 0.0f;
      const int64_t first = chunk_rows[c], end = chunk_rows[c + 1];
      for (int64_t s0 = first; s0 < end; s0 += kRows) {
        cp_async_wait<kAhead - 1>();  // this thread's pieces of the stage have landed
        fence_proxy_async();          // ... and are visible to the tensor cores
        __syncthreads();              // everyone's; the slot loaded next is no longer read
        load_next();
        const uint32_t a_hi = base + slot * Tile::StageBytes, a_lo = a_hi + kATile, b = a_hi + (kLo ? 2 : 1) * kATile;
        slot = (slot + 1) % kStages;
        const int64_t live = end - s0;
        // k16 steps up to the chunk's end: a whole stage, else 1-3 (one branch each).
        const int steps = live >= kRows ? kRows / 16 : int((live + 15) / 16);
        const auto step = [&](int kk) {
          // A k16 step: 16 rows of an MN-major tile are 2048 bytes on; 32 bytes of a K-major row.
          const uint64_t d_hi =
              kWeight ? smem_desc_mn(a_hi + wg * kAtom + kk * 2048, kAtom) : smem_desc(a_hi + wg * 64 * 128) + 2 * kk;
          const uint64_t d_lo =
              kWeight ? smem_desc_mn(a_lo + wg * kAtom + kk * 2048, kAtom) : smem_desc(a_lo + wg * 64 * 128) + 2 * kk;
          const uint64_t d_b = smem_desc_mn(b + kk * 2048, kAtom);
          wgmma_step<kBK, kWeight ? 1 : 0, 1>(acc, d_hi, d_b);
          if constexpr (kLo) wgmma_step<kBK, kWeight ? 1 : 0, 1>(acc, d_lo, d_b);
        };
        wgmma_fence();
        issue_steps(steps, step);
        wgmma_commit();
        wgmma_wait<1>();  // the previous stage's MMAs are done: its slot may be loaded
      }
    };
    const int64_t i = i0 + wg * 64 + (warp % 4) * 16 + lane / 4;  // the thread's first row
    run_chunks<Tile::Acc, kPairs>(
        chunk_count, run_chunk, [] { wgmma_wait<0>(); },
        [&](const float(&acc)[Tile::Acc], int c, auto&& level0) {
          fold_chunk_partial<Tile::Acc, Tile::PendingInRegisters>(acc, c, chunk_count, out, i, k0, lane, I, K, pending,
                                                                  kThreads, tid, level0);
        });
    cp_async_wait<0>();  // no copy outlives the tile
  }
}

template <bool kWeight, int kBK, bool kLo>
void launch(const Problems& problems, int64_t max_I, int64_t g_pitch, int64_t K, float* workspace, cudaStream_t s) {
  const int64_t tiles_k = ceil_div(K, int64_t(kBK)), tiles_i = ceil_div(max_I, int64_t(kBI));
  const int64_t tiles = tiles_k * tiles_i * problems.count;
  const int64_t blocks = std::min<int64_t>(tiles, sm_count());  // one workspace slot a block
  const auto kernel = outer_sum_split_wgmma_kernel<kWeight, kBK, kLo>;
  constexpr int bytes = WgTile<kBK, kLo>::SmemBytes;
  LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<unsigned(blocks), kThreads, bytes, s>>>(problems, g_pitch, K, tiles_k, tiles_i, tiles, workspace);
  LS_CUDA_LAUNCHED();
}

Problem compact(const SplitOuterSumGroup& group) {
  constexpr int64_t kLimit = int64_t(1) << 31;
  LS_CHECK(group.I < kLimit && group.bounds.rows[group.bounds.count] < kLimit,
           "outer sums of a split g on wgmma: ", group.I, " outputs and ", group.bounds.rows[group.bounds.count],
           " summed rows must each be below 2^31");
  Problem p{group.g, group.m, group.out, int32_t(group.I), group.bounds.count, {}};
  for (int c = 0; c <= group.bounds.count; ++c) p.rows[c] = int32_t(group.bounds.rows[c]);
  return p;
}

}  // namespace

void outer_sum_split_wgmma(const SplitOuterSumGroup& one, bool weight, int64_t g_pitch, int64_t K, float* workspace,
                           cudaStream_t s, GradientOperand operand) {
  LS_CHECK(workspace, "outer sums of a split g: the wgmma 128 x 256 tile needs a workspace");
  Problems problems;
  problems.count = 1;
  problems.p[0] = compact(one);
  const bool lo = operand == GradientOperand::exact_hi_lo;
  if (weight && lo) return launch<true, 256, true>(problems, one.I, g_pitch, K, workspace, s);
  if (weight) return launch<true, 256, false>(problems, one.I, g_pitch, K, workspace, s);
  if (lo) return launch<false, 256, true>(problems, one.I, g_pitch, K, workspace, s);
  launch<false, 256, false>(problems, one.I, g_pitch, K, workspace, s);
}

void outer_sum_split_wgmma_grouped(const SplitOuterSumGroup* host_groups, int count, int64_t max_I, bool weight,
                                   int64_t g_pitch, int64_t K, cudaStream_t s, GradientOperand operand) {
  LS_CHECK(count <= kMaxProblems, "outer sums of a split g on wgmma: ", count, " groups exceed the ", kMaxProblems,
           " a launch takes");
  if (count == 0) return;
  Problems problems;
  problems.count = count;
  for (int p = 0; p < count; ++p) problems.p[p] = compact(host_groups[p]);
  const bool lo = operand == GradientOperand::exact_hi_lo;
  if (weight && lo) return launch<true, 128, true>(problems, max_I, g_pitch, K, nullptr, s);
  if (weight) return launch<true, 128, false>(problems, max_I, g_pitch, K, nullptr, s);
  if (lo) return launch<false, 128, true>(problems, max_I, g_pitch, K, nullptr, s);
  launch<false, 128, false>(problems, max_I, g_pitch, K, nullptr, s);
}

}  // namespace lockstep::cuda
