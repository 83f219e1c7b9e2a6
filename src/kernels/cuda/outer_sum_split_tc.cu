// outer_sum_chunked_tc's procedure with g split beforehand (split_hi_lo): the same bits, with
// both operands copied to shared memory by cp.async in a 3- or 4-stage pipeline, 128 x 128,
// 128 x 256 or 256 x 128 outputs a block on mma.sync, or 128 x 256 on wgmma
// (outer_sum_split_wgmma.cu); bench/cuda_outer_sum_bench.cpp times each.
//
// outer_sum_tc.cu loads fp32 g a value at a time, splits it and stores hi and lo in every block
// that reads it (16 of them for the lm_head's weight gradient); there the instructions around
// the MMAs, not the tensor cores, bound the time (notes/gpu-trainer.md). Split once, in place,
// each operand is 16-byte pieces that go to shared memory without passing through registers.
//
// Split layout: each 32 bytes of 8 consecutive fp32 values hold their 8 bf16 hi, then their
// 8 bf16 lo, so a row keeps its place and length in bytes and the split needs no second buffer.
// The bf16 operand (GradientOperand::bf16) is g rounded once instead: pack_bf16_rows puts each
// row's bf16 values at the front of its own bytes, and the kernels load only those, one MMA a
// k16 step.
//
// The procedure per output element is outer_sum_tc.cu's: per chunk, k16 steps from the chunk's
// first row (rows past its end zero in both operands, no step wholly past it), each step
// mma(hi) then mma(lo) into the same accumulator, the partials folded by the pairwise tree. The
// fragments hold the same values in the same registers, so every product and sum is the same.
#include <algorithm>
#include <vector>

#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/outer_sum_split_tma.h"
#include "kernels/cuda/outer_sum_split_wgmma.h"

namespace lockstep::cuda {

namespace {

constexpr int kThreads = 256;        // 8 warps
constexpr int kWarpK = 64;           // output columns a warp: 8 n8 fragments
constexpr int kStage = 32;           // summed rows a stage (two k16 steps)
constexpr int kNarrow = kStage + 8;  // bf16 per [i][s] staged row: 80 bytes

// A tile configuration: (kWarpsI x kWarpsK) warps of (16 kMI) x 64 outputs; kStages stages in
// flight; the chunk tree's pending levels 0 and 1 in shared memory or in a workspace slot of
// the block (kGlobalPending, one block an SM looping over the tiles).
template <int kMI, int kWarpsI, int kWarpsK, int kStages_, bool kGlobalPending_>
struct Tile {
  static constexpr int MI = kMI, WarpsK = kWarpsK, Stages = kStages_;
  static constexpr bool GlobalPending = kGlobalPending_;
  static constexpr int BI = kWarpsI * 16 * kMI, BK = kWarpsK * kWarpK;
  static constexpr int WideA = BI + 8, WideB = BK + 8;  // bf16 per [s][i] / [s][k] staged row
  static constexpr int Acc = kMI * 8 * 4;               // accumulators a thread
  static constexpr int PendingFloats = 2 * Acc * kThreads;
  static constexpr int APieces = kStage * BI / 4;  // 16-byte pieces of A a stage (hi and lo)
  static_assert(kWarpsI * kWarpsK * 32 == kThreads, "8 warps");
  // Shared memory of one stage, in bf16: a_hi, a_lo, then b [s][k]. Weight gradients (g's rows
  // are the summed s) stage A as [s][i]; input gradients (g's rows the outputs i) as [i][s].
  template <bool kWeight>
  __host__ __device__ static constexpr int a_elems() {
    return kWeight ? kStage * WideA : BI * kNarrow;
  }
  template <bool kWeight>
  __host__ __device__ static constexpr int stage_elems() {
    return 2 * a_elems<kWeight>() + kStage * WideB;
  }
  template <bool kWeight>
  __host__ __device__ static constexpr int smem_bytes() {
    return Stages * stage_elems<kWeight>() * 2 + (GlobalPending ? 0 : PendingFloats * 4);
  }
};
using SmallTile = Tile<2, 4, 2, 3, false>;  // 128 x 128, warps 32 x 64
using LargeTile = Tile<4, 2, 4, 4, true>;   // 128 x 256, warps 64 x 64
using TallTile = Tile<4, 4, 2, 4, true>;    // 256 x 128, warps 64 x 64
static_assert(TallTile::PendingFloats == LargeTile::PendingFloats, "one workspace size");
static_assert(LargeTile::PendingFloats == kSplitPendingFloats, "the wgmma tile's slot is the same size");

__global__ void split_hi_lo_kernel(float* x, int64_t groups) {
  for (int64_t gi = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; gi < groups;
       gi += int64_t(gridDim.x) * blockDim.x) {
    float4* p = reinterpret_cast<float4*>(x) + 2 * gi;
    const float4 a = p[0], b = p[1];
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    uint32_t hi[4], lo[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const bf16 h0 = to_bf16(v[2 * j]), h1 = to_bf16(v[2 * j + 1]);
      hi[j] = pack_bf16(h0, h1);
      lo[j] = pack_bf16(to_bf16(v[2 * j] - to_f32(h0)), to_bf16(v[2 * j + 1] - to_f32(h1)));
    }
    uint4* q = reinterpret_cast<uint4*>(p);
    q[0] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
    q[1] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
  }
}

// One block a row (grid-stride): 8 values a thread, a segment of the row at a time, read before
// any thread writes the segment's bf16 to the front of it (the writes of a segment land on
// bytes its reads or earlier ones took).
__global__ void pack_bf16_rows_kernel(float* x, int64_t rows, int64_t cols) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float* row = x + r * cols;
    bf16* packed = reinterpret_cast<bf16*>(row);
    for (int64_t c0 = 0; c0 < cols; c0 += 8 * int64_t(blockDim.x)) {
      const int64_t c = c0 + 8 * int64_t(threadIdx.x);
      float4 a = make_float4(0, 0, 0, 0), b = a;
      if (c < cols) a = reinterpret_cast<const float4*>(row + c)[0], b = reinterpret_cast<const float4*>(row + c)[1];
      __syncthreads();
      if (c < cols)
        *reinterpret_cast<uint4*>(packed + c) =
            make_uint4(pack_bf16(to_bf16(a.x), to_bf16(a.y)), pack_bf16(to_bf16(a.z), to_bf16(a.w)),
                       pack_bf16(to_bf16(b.x), to_bf16(b.y)), pack_bf16(to_bf16(b.z), to_bf16(b.w)));
    }
  }
}

// Tiles t = blockIdx.x, blockIdx.x + gridDim.x, ...: column block t % tiles_k, row block
// (t / tiles_k) % tiles_i of group t / (tiles_k tiles_i) (of `groups` when not null, else
// `one`). kWeight: g's element (s, i) at g_pitch * s + i (the weight gradients); else at
// g_pitch * i + s (the input gradients), split (kLo: GradientOperand::exact_hi_lo, each step the
// hi then the lo MMA) or packed by pack_bf16_rows (GradientOperand::bf16: the element at row r,
// column c of g's memory rows at bf16 index 2 g_pitch r + c; one MMA a step).
template <bool kWeight, typename Cfg, bool kLo>
__global__ void __launch_bounds__(kThreads, 1)
    outer_sum_split_tc_kernel(const SplitOuterSumGroup* groups, const __grid_constant__ SplitOuterSumGroup one,
                              int64_t g_pitch, int64_t K, int64_t tiles_k, int64_t tiles_i, int64_t tiles,
                              float* workspace) {
  constexpr int BI = Cfg::BI, BK = Cfg::BK, MI = Cfg::MI, WideA = Cfg::WideA, WideB = Cfg::WideB;
  constexpr int Stages = Cfg::Stages, A = Cfg::template a_elems<kWeight>();
  constexpr int StageElems = Cfg::template stage_elems<kWeight>();
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* stages = reinterpret_cast<bf16*>(smem);
  float* pending = Cfg::GlobalPending ? workspace + int64_t(blockIdx.x) * Cfg::PendingFloats
                                      : reinterpret_cast<float*>(smem + Stages * StageElems * 2);
  // The chunk bounds in shared memory: indexed by the running chunk, a copy in registers would
  // live in local memory, whose loads stalled every stage (ncu, notes/gpu-trainer.md).
  __shared__ int64_t chunk_rows[kTMax + 1];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, pair = (lane % 4) * 2;
  const int wi = (warp / Cfg::WarpsK) * 16 * MI, wk = (warp % Cfg::WarpsK) * kWarpK;

  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t k0 = (tile % tiles_k) * BK, i0 = (tile / tiles_k % tiles_i) * BI;
    const SplitOuterSumGroup* args = groups ? groups + tile / (tiles_k * tiles_i) : &one;
    const int64_t I = args->I;
    if (i0 >= I) continue;  // the tiles cover the largest group
    const bf16* __restrict__ g = args->g;
    const bf16* __restrict__ m = args->m;
    float* __restrict__ out = args->out;
    __syncthreads();  // the previous tile is done with the stages and the bounds
    if (threadIdx.x <= kTMax) chunk_rows[threadIdx.x] = args->bounds.rows[threadIdx.x];
    const int chunk_count = args->bounds.count;
    __syncthreads();

    // The pieces of one stage (chunk rows [s0, end)). The hi and lo halves of a group of 8
    // are adjacent in g, so adjacent threads take them: a warp reads 512 contiguous bytes.
    auto load = [&](int slot, int64_t s0, int64_t end) {
      bf16* a_hi = stages + slot * StageElems;
      bf16* a_lo = a_hi + A;
      bf16* b = a_lo + A;
      if constexpr (!kLo) {
#pragma unroll
        for (int j = 0; j < Cfg::APieces / 2 / kThreads; ++j) {
          const int idx = threadIdx.x + j * kThreads;
          int64_t i, s;
          bf16* dst;
          if constexpr (kWeight) {
            const int piece = idx % (BI / 8), row = idx / (BI / 8);
            i = i0 + 8 * piece, s = s0 + row;
            dst = a_hi + row * WideA + 8 * piece;
          } else {
            const int piece = idx % (kStage / 8), row = idx / (kStage / 8);
            i = i0 + row, s = s0 + 8 * piece;
            dst = a_hi + row * kNarrow + 8 * piece;
          }
          const bool valid = i < I && s < end;
          const int64_t f = kWeight ? 2 * s * g_pitch + i : 2 * i * g_pitch + s;
          cp_async16(smem_addr(dst), valid ? g + f : g, valid);
        }
      }
#pragma unroll
      for (int j = 0; j < (kLo ? Cfg::APieces / kThreads : 0); ++j) {
        const int idx = threadIdx.x + j * kThreads, half = idx & 1;
        int64_t i, s;
        bf16* dst;
        if constexpr (kWeight) {
          const int piece = (idx >> 1) % (BI / 8), row = idx / (BI / 4);
          i = i0 + 8 * piece, s = s0 + row;
          dst = (half ? a_lo : a_hi) + row * WideA + 8 * piece;
        } else {
          const int piece = (idx >> 1) % (kStage / 8), row = idx / (kStage / 4);
          i = i0 + row, s = s0 + 8 * piece;
          dst = (half ? a_lo : a_hi) + row * kNarrow + 8 * piece;
        }
        const bool valid = i < I && s < end;
        const int64_t f = kWeight ? s * g_pitch + i : i * g_pitch + s;  // a multiple of 8
        cp_async16(smem_addr(dst), valid ? g + 2 * f + 8 * half : g, valid);
      }
#pragma unroll
      for (int j = 0; j < kStage * BK / 8 / kThreads; ++j) {
        const int idx = threadIdx.x + j * kThreads, piece = idx % (BK / 8), row = idx / (BK / 8);
        const int64_t k = k0 + 8 * piece, s = s0 + row;
        const bool valid = k < K && s < end;
        cp_async16(smem_addr(b + row * WideB + 8 * piece), valid ? m + s * K + k : m, valid);
      }
    };

    // The loads run Stages - 1 stages ahead of the MMAs, across chunk ends.
    StageLoader<kStage, Stages> loader(chunk_rows, chunk_count);
    auto load_next = [&]() { loader.next(load); };
    for (int p = 0; p < Stages - 1; ++p) load_next();

    int slot = 0;
    for (int c = 0; c < chunk_count; ++c) {
      float acc[MI][8][4];
#pragma unroll
      for (int a = 0; a < MI; ++a)
#pragma unroll
        for (int b = 0; b < 8; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.0f;
      const int64_t first = chunk_rows[c], end = chunk_rows[c + 1];
      for (int64_t s0 = first; s0 < end; s0 += kStage) {
        cp_async_wait<Stages - 2>();  // this thread's pieces of the stage have landed
        __syncthreads();              // everyone's have, and the slot loaded next is read
        load_next();
        const bf16* a_hi = stages + slot * StageElems;
        const bf16* a_lo = a_hi + A;
        const bf16* b = a_lo + A;
        slot = (slot + 1) % Stages;
        const int steps = end - s0 > 16 ? 2 : 1;
        for (int step = 0; step < steps; ++step) {
          uint32_t hi[MI][4], lo[MI][4], bm[8][2];
          const int q = lane / 8, r = lane % 8;
#pragma unroll
          for (int a = 0; a < MI; ++a) {
            if constexpr (kWeight) {
              // [s][i] transposed: matrices (s 0-7, i 0-7), (s 0-7, i 8-15), (s 8-15, i 0-7), (s 8-15, i 8-15).
              const int offset = (step * 16 + (q / 2) * 8 + r) * WideA + wi + a * 16 + (q % 2) * 8;
              ldmatrix_x4_trans(hi[a], smem_addr(a_hi + offset));
              if constexpr (kLo) ldmatrix_x4_trans(lo[a], smem_addr(a_lo + offset));
            } else {
              const int offset = (wi + a * 16 + lane % 16) * kNarrow + step * 16 + (lane / 16) * 8;
              ldmatrix_x4(hi[a], smem_addr(a_hi + offset));
              if constexpr (kLo) ldmatrix_x4(lo[a], smem_addr(a_lo + offset));
            }
          }
#pragma unroll
          for (int bb = 0; bb < 4; ++bb) {
            // [s][k] transposed: two n8 tiles, each its k16 step's s 0-7 and s 8-15.
            uint32_t v[4];
            ldmatrix_x4_trans(v, smem_addr(b + (step * 16 + (q % 2) * 8 + r) * WideB + wk + bb * 16 + (q / 2) * 8));
            bm[2 * bb][0] = v[0], bm[2 * bb][1] = v[1], bm[2 * bb + 1][0] = v[2], bm[2 * bb + 1][1] = v[3];
          }
#pragma unroll
          for (int a = 0; a < MI; ++a)
#pragma unroll
            for (int bn = 0; bn < 8; ++bn) {
              mma_bf16(acc[a][bn], hi[a], bm[bn][0], bm[bn][1]);
              if constexpr (kLo) mma_bf16(acc[a][bn], lo[a], bm[bn][0], bm[bn][1]);
            }
        }
      }
      // TreeFold's merge as in outer_sum_tc.cu: levels 0 and 1 pending, 2 in `out`.
      const bool last = c == chunk_count - 1;
      const int level = tree_level(c);
#pragma unroll
      for (int a = 0; a < MI; ++a)
#pragma unroll
        for (int bn = 0; bn < 8; ++bn) {
          // Accumulators 0, 1: row i, columns k, k + 1; 2, 3: row i + 8 (k even, K a multiple of 8).
          const int64_t i = i0 + wi + a * 16 + group, k = k0 + wk + bn * 8 + pair;
          float4* level0 = reinterpret_cast<float4*>(pending) + (a * 8 + bn) * kThreads + threadIdx.x;
          float4* level1 = level0 + MI * 8 * kThreads;
          fold_fragment(acc[a][bn], level, last, *level0, *level1, out + i * K + k, out + (i + 8) * K + k,
                        k < K && i < I, k < K && i + 8 < I);
        }
    }
    cp_async_wait<0>();  // no copy outlives the tile
  }
}

template <bool kWeight, typename Cfg, bool kLo>
void launch_tile(const SplitOuterSumGroup* groups, const SplitOuterSumGroup& one, int count, int64_t max_I,
                 int64_t g_pitch, int64_t K, float* workspace, cudaStream_t s) {
  const int64_t tiles_k = ceil_div(K, int64_t(Cfg::BK)), tiles_i = ceil_div(max_I, int64_t(Cfg::BI));
  const int64_t tiles = tiles_k * tiles_i * count;
  // With the pending levels in the workspace, one block an SM, each with its own slot.
  const int64_t blocks = Cfg::GlobalPending ? std::min<int64_t>(tiles, sm_count()) : tiles;
  LS_CHECK(blocks < (int64_t(1) << 31), "outer sums of a split g: ", tiles, " tiles exceed the grid");
  constexpr int bytes = Cfg::template smem_bytes<kWeight>();
  const auto kernel = outer_sum_split_tc_kernel<kWeight, Cfg, kLo>;
  LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<unsigned(blocks), kThreads, bytes, s>>>(groups, one, g_pitch, K, tiles_k, tiles_i, tiles, workspace);
  LS_CUDA_LAUNCHED();
}

// The tile automatic takes (only the speed depends on it). Without TMA: the large tile where
// chunks are long enough that the pending levels' traffic (two tiles of fp32 a chunk) is small
// beside the operands' (chunk rows x 1.5 KB).
SplitTile choose(SplitTile tile, const float* workspace, const ChunkBounds& bounds, bool weight, int64_t pitch,
                 int64_t K, GradientOperand operand) {
  if (tile != SplitTile::automatic) return tile;
  const int64_t mean_rows = (bounds.rows[bounds.count] - bounds.rows[0]) / bounds.count;
  // The TMA tiles (H100, cuda_outer_sum_bench; notes/gpu-trainer.md, v23): 128 x 128 with the
  // tree on chip for weight gradients (lm_head dW 10.3 ms against 14.6 at 128 x 256, whose folds
  // go through the workspace) and input gradients over short chunks (q_proj dx 0.31 against
  // 0.60); 128 x 256 where chunks are long enough that its folds are rare (lm_head dx, chunks of
  // 18,992 rows: 8.0 ms against 15.1).
  // Input gradients over short chunks take the TMA 128 x 128 tile as well (k_proj and v_proj
  // dx, chunks of 64 rows: notes/gpu-trainer.md, session 19); short chunks of weight gradients
  // keep the mma.sync tile.
  if (!workspace) return SplitTile::k128x128;
  if (outer_sum_split_tma_applies(weight, pitch, K, bounds, operand) && mean_rows >= (weight ? 256 : 16))
    return !weight && mean_rows >= 4096 ? SplitTile::tma128x256 : SplitTile::tma128x128;
  return mean_rows < 256 ? SplitTile::k128x128 : SplitTile::wgmma128x256;
}

void launch(const SplitOuterSumGroup* groups, const SplitOuterSumGroup& one, int count, int64_t max_I, int64_t g_row,
            int64_t g_col, int64_t K, SplitTile tile, float* workspace, cudaStream_t s, GradientOperand operand) {
  LS_CHECK(tile == SplitTile::k128x128 || tile == SplitTile::wgmma128x128 || tile == SplitTile::tma128x128 || workspace,
           "outer sums of a split g: the large tiles need a workspace");
  const int64_t pitch = g_row == 1 ? g_col : g_row;
  const bool lo = operand == GradientOperand::exact_hi_lo;
  const auto run = [&]<typename Cfg>() {
    if (g_row == 1 && lo) launch_tile<true, Cfg, true>(groups, one, count, max_I, pitch, K, workspace, s);
    if (g_row == 1 && !lo) launch_tile<true, Cfg, false>(groups, one, count, max_I, pitch, K, workspace, s);
    if (g_row != 1 && lo) launch_tile<false, Cfg, true>(groups, one, count, max_I, pitch, K, workspace, s);
    if (g_row != 1 && !lo) launch_tile<false, Cfg, false>(groups, one, count, max_I, pitch, K, workspace, s);
  };
  if (tile == SplitTile::tma128x256 || tile == SplitTile::tma128x128) {
    LS_CHECK(!groups, "outer sums of a split g: the TMA tiles take one problem a launch here, not groups");
    const bool wide = tile == SplitTile::tma128x256;
    if (outer_sum_split_tma_applies(g_row == 1, pitch, K, one.bounds, operand))
      return outer_sum_split_tma(one, g_row == 1, pitch, K, workspace, s, wide ? 256 : 128);
    tile = wide ? SplitTile::wgmma128x256 : SplitTile::wgmma128x128;  // the same bits
  }
  if (tile == SplitTile::wgmma128x256 || tile == SplitTile::wgmma128x128) {
    LS_CHECK(!groups, "outer sums of a split g: the wgmma tiles take one problem a launch here, not groups");
    if (tile == SplitTile::wgmma128x128)
      return outer_sum_split_wgmma_grouped(&one, 1, one.I, g_row == 1, pitch, K, s, operand);
    return outer_sum_split_wgmma(one, g_row == 1, pitch, K, workspace, s, operand);
  }
  if (tile == SplitTile::k128x256) run.template operator()<LargeTile>();
  if (tile == SplitTile::k256x128) run.template operator()<TallTile>();
  if (tile == SplitTile::k128x128) run.template operator()<SmallTile>();
}

}  // namespace

void split_hi_lo(float* x, int64_t n, cudaStream_t s) {
  LS_CHECK(n % 8 == 0 && aligned16(x), "split_hi_lo: ", n, " values at ", static_cast<const void*>(x),
           " (needs a multiple of 8 values, 16-byte aligned)");
  if (n == 0) return;
  const int64_t groups = n / 8;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(groups, threads), 1 << 20);
  split_hi_lo_kernel<<<unsigned(blocks), threads, 0, s>>>(x, groups);
  LS_CUDA_LAUNCHED();
}

void pack_bf16_rows(float* x, int64_t rows, int64_t cols, cudaStream_t s) {
  LS_CHECK(cols % 8 == 0 && aligned16(x), "pack_bf16_rows: rows of ", cols, " values at ", static_cast<const void*>(x),
           " (needs a multiple of 8 values, 16-byte aligned)");
  if (rows == 0 || cols == 0) return;
  pack_bf16_rows_kernel<<<unsigned(std::min<int64_t>(rows, 1 << 20)), 256, 0, s>>>(x, rows, cols);
  LS_CUDA_LAUNCHED();
}

void to_gradient_operand(float* g, int64_t rows, int64_t cols, GradientOperand operand, cudaStream_t s) {
  if (operand == GradientOperand::bf16)
    pack_bf16_rows(g, rows, cols, s);
  else
    split_hi_lo(g, rows * cols, s);
}

bool outer_sum_split_tc_supported(int64_t g_row, int64_t g_col, int64_t K, const ChunkBounds& bounds, int64_t I) {
  if (K % 8 != 0) return false;
  if (g_row == 1) return g_col % 8 == 0 && I % 8 == 0;  // pieces along i
  if (g_col != 1 || g_row % 8 != 0) return false;       // pieces along s: every chunk starts at one
  for (int c = 0; c <= bounds.count; ++c)
    if (bounds.rows[c] % 8 != 0) return false;
  return true;
}

int64_t outer_sum_split_workspace_floats() { return int64_t(sm_count()) * LargeTile::PendingFloats; }

void outer_sum_split_tc(const bf16_t* g_split, int64_t g_row, int64_t g_col, const bf16_t* m, int64_t K,
                        const ChunkBounds& bounds, float* out, int64_t I, cudaStream_t s, float* workspace,
                        SplitTile tile, GradientOperand operand) {
  check_chunk_bounds(bounds, "outer_sum_split_tc");
  LS_CHECK(outer_sum_split_tc_supported(g_row, g_col, K, bounds, I), "outer_sum_split_tc: unsupported shape (g_row ",
           g_row, ", g_col ", g_col, ", K ", K, ", I ", I, "): see outer_sum_split_tc_supported");
  LS_CHECK(aligned16(g_split) && aligned16(m), "outer_sum_split_tc: operands must be 16-byte aligned");
  if (I == 0 || K == 0) return;
  const SplitOuterSumGroup one{g_split, m, out, I, bounds};
  const SplitTile chosen = choose(tile, workspace, bounds, g_row == 1, g_row == 1 ? g_col : g_row, K, operand);
  launch(nullptr, one, 1, I, g_row, g_col, K, chosen, workspace, s, operand);
}

void outer_sum_split_grouped_tc(const SplitOuterSumGroup* groups, int count, int64_t max_I, int64_t g_row,
                                int64_t g_col, int64_t K, cudaStream_t s, float* workspace, SplitTile tile,
                                GradientOperand operand) {
  if (count == 0 || max_I == 0 || K == 0) return;
  const SplitTile chosen = tile == SplitTile::automatic ? SplitTile::k128x128 : tile;
  launch(groups, SplitOuterSumGroup{}, count, max_I, g_row, g_col, K, chosen, workspace, s, operand);
}

void outer_sum_split_grouped_wgmma(const SplitOuterSumGroup* host_groups, int count, int64_t max_I, int64_t g_row,
                                   int64_t g_col, int64_t K, cudaStream_t s, GradientOperand operand,
                                   const SplitSpans* spans, int parts) {
  LS_CHECK(g_row == 1 || g_col == 1, "outer_sum_split_grouped_wgmma: g_row or g_col must be 1, got ", g_row, ", ",
           g_col);
  LS_CHECK(parts >= 1 && count % parts == 0, "outer_sum_split_grouped_wgmma: ", count,
           " groups are not whole runs of parts ", parts);
  const bool weight = g_row == 1;
  const int64_t pitch = weight ? g_col : g_row;
  if (count > kMaxWgmmaGroups) {  // launches of kMaxWgmmaGroups: a group's bits are its own
    const int per_part = count / parts, per_launch = kMaxWgmmaGroups / parts;
    std::vector<SplitOuterSumGroup> slice;
    for (int p = 0; p < per_part; p += per_launch) {  // the same slice of every run, runs kept in order
      const int n = std::min(per_part - p, per_launch);
      slice.clear();
      for (int part = 0; part < parts; ++part)
        slice.insert(slice.end(), host_groups + part * per_part + p, host_groups + part * per_part + p + n);
      outer_sum_split_grouped_wgmma(slice.data(), int(slice.size()), max_I, g_row, g_col, K, s, operand, spans, parts);
    }
    return;
  }
  bool tma = spans != nullptr;
  for (int p = 0; p < count; ++p) {
    const SplitOuterSumGroup& group = host_groups[p];
    check_chunk_bounds(group.bounds, "outer_sum_split_grouped_wgmma");
    LS_CHECK(group.I <= max_I && outer_sum_split_tc_supported(g_row, g_col, K, group.bounds, group.I) &&
                 aligned16(group.g) && aligned16(group.m),
             "outer_sum_split_grouped_wgmma: group ", p, " (I ", group.I,
             ") is not supported: see outer_sum_split_tc_supported; operands 16-byte aligned, I <= max_I ", max_I);
    tma = tma && outer_sum_split_tma_applies(weight, pitch, K, group.bounds, operand);
  }
  LS_CHECK(parts == 1 || tma, "outer_sum_split_grouped_wgmma: outputs summed over ", parts,
           " parts need the TMA tile (spans given, every group taken by outer_sum_split_tma_applies)");
  if (count == 0 || max_I == 0 || K == 0) return;
  if (tma)
    return outer_sum_split_tma_grouped(host_groups, count, max_I, weight, pitch, K, *spans, nullptr, s, 128, parts);
  outer_sum_split_wgmma_grouped(host_groups, count, max_I, weight, pitch, K, s, operand);
}

}  // namespace lockstep::cuda
