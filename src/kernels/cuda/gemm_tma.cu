// The warp-specialized Hopper GEMM. One producer thread streams the A and W tiles of every K
// tile into a ring of shared-memory stages with TMA (the 128-byte swizzle of wgmma.cuh), and
// two consumer warpgroups (64 rows each) run wgmma on them. mbarriers pass the stages back
// and forth (full: the TMA bytes landed; empty: both warpgroups are done with the stage), so
// there is no CTA barrier per K tile and the loads run STAGES tiles ahead of the tensor
// cores. CTAs are persistent: one per SM walks the tiles, and the producer starts the next
// tile's loads while the consumers fold a chunk or store a tile.
//
// Per element the sequence is the one of every other configuration (gemm.h): a zeroed sum,
// then the k16 steps of its K (or of each chunk) in ascending k; k16 steps wholly past a
// chunk's end are skipped; the row form adds the chunk sums as fold_chunk does. So the bits
// are the same (the GEMM tests compare every configuration).
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/gemm_common.cuh"
#include "kernels/cuda/gemm_tma.h"
#include "kernels/cuda/mbarrier.cuh"
#include "kernels/cuda/tensor_map.h"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda {
namespace {

constexpr int kTmaBM = 128, kTmaBK = 64, kTmaConsumerThreads = 256, kTmaThreads = kTmaConsumerThreads + 128;

// Tile t's row and column tiles: columns fastest, or with rows_fastest (the number of row
// tiles; ungrouped problems whose W outweighs A, as the logits' 622 MB lm_head against 33 MB of
// rows) rows fastest, so a wave's CTAs share W tiles and re-read the rows from L2. Columns
// fastest read the whole lm_head from HBM once per row tile: the logits GEMM ran at 341
// TFLOP/s in every configuration.
__device__ __forceinline__ void tile_coordinates(int tile, int tiles_n, int rows_fastest, int& tile_m, int& tile_n) {
  if (rows_fastest > 0) {
    tile_n = tile / rows_fastest;
    tile_m = tile - tile_n * rows_fastest;
  } else {
    tile_m = tile / tiles_n;
    tile_n = tile - tile_m * tiles_n;
  }
}

template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS>
constexpr size_t tma_smem_bytes() {
  return 1008 + size_t(STAGES) * (kTmaBM + BN) * kTmaBK * 2 +
         (TREE ? size_t(SMEM_PARTIALS) * (BN / 2) * kTmaConsumerThreads * sizeof(float) : 0) + 16 * STAGES;
}

// Row form: chunks 2m and 2m + 1 accumulate into two register sets x and y, so chunk 2m + 1's
// wgmma start while chunk 2m's finish, and every second chunk end folds the pair with
// fold_chunk (x in the place of its s0, which the even chunk's case would have copied).
// SMEM_PARTIALS of s2, s1 (in that order) live in shared memory (each thread its own words).
// DRAIN: each K tile's wgmma finish before the stage is handed back; otherwise one tile's
// wgmma stay in flight while the next tile's are issued.
template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS, bool DRAIN>
__global__ void __launch_bounds__(kTmaThreads, 1)
    tma_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w, GemmArgs p,
                    int tiles_n, int tiles_total, int rows_fastest) {
  constexpr int BM = kTmaBM, BK = kTmaBK, R = BN / 2;
  constexpr uint32_t A_BYTES = BM * BK * 2, STAGE_BYTES = (BM + BN) * BK * 2;
  constexpr size_t PARTIAL_BYTES = TREE ? size_t(SMEM_PARTIALS) * R * kTmaConsumerThreads * sizeof(float) : 0;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  // Stage s: A (128 rows) then W (BN rows), each 1024-byte aligned; then the partials, then
  // the barriers: full[s] at bars + 8 s, empty[s] at bars + 8 (STAGES + s).
  const uint32_t bars = base + STAGES * STAGE_BYTES + uint32_t(PARTIAL_BYTES);
  auto full = [&](uint32_t s) { return bars + 8 * s; };
  auto empty = [&](uint32_t s) { return bars + 8 * (STAGES + s); };
  const int tid = threadIdx.x, lane = tid & 31, warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  if (tid == 0) {
    for (uint32_t s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kTmaConsumerThreads / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  start_after_previous();  // rows and A come from the previous kernels

  const int K = int(p.K), N = int(p.N);
  const int chunk_len = TREE ? (K + 7) / 8 : K;
  const int tiles_per_chunk = (chunk_len + BK - 1) / BK;

  // Three 128-column register sets need more than the 168 registers a thread of a 384-thread
  // CTA gets: then the producer warpgroup gives most of its share to the consumers.
  constexpr bool MOVE_REGISTERS = TREE && BN == 128 && SMEM_PARTIALS < 2;
  if (warp >= kTmaConsumerThreads / 32) {
    if constexpr (MOVE_REGISTERS) asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    if (warp != kTmaConsumerThreads / 32) return;  // lane 0 of one warp issues the loads
    uint32_t it = 0;
    for (int tile = int(blockIdx.x); tile < tiles_total; tile += int(gridDim.x)) {
      int tile_m, tile_n, group, row0, row_end;
      tile_coordinates(tile, tiles_n, rows_fastest, tile_m, tile_n);
      if (!locate_row_tile<BM>(p, tile_m, group, row0, row_end)) break;
      const int w_row = group * N + tile_n * BN;
      for (int c = 0; c < (TREE ? 8 : 1); ++c)
        for (int j = 0; j < tiles_per_chunk; ++j, ++it) {
          const uint32_t s = it % STAGES, round = it / STAGES;
          if (lane != 0) continue;
          if (round > 0) mbar_wait(empty(s), (round - 1) & 1);
          const int k = c * chunk_len + j * BK;
          mbar_arrive_expect_tx(full(s), STAGE_BYTES);
          tma_load(base + s * STAGE_BYTES, &map_a, full(s), k, row0);
          tma_load(base + s * STAGE_BYTES + A_BYTES, &map_w, full(s), k, w_row);
        }
    }
    return;
  }

  // The consumers: warpgroup wg computes rows 64 wg .. 64 wg + 63 of the tile.
  if constexpr (MOVE_REGISTERS) asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
  const int wg = warp >> 2;
  float* sP = reinterpret_cast<float*>(smem + size_t(STAGES) * STAGE_BYTES) + tid;
  constexpr bool S2_SMEM = SMEM_PARTIALS >= 1, S1_SMEM = SMEM_PARTIALS == 2;
  auto release = [&](uint32_t s) {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(s));
  };
  uint32_t it = 0;
  int pending = -1;  // the stage whose wgmma may still be running
  // Row form: warpgroup 1 starts one K tile after warpgroup 0 (a named barrier, once), so
  // the two fold their chunk pairs at different times and the tensor cores keep working for
  // the other; the stage ring absorbs the offset.
  bool offset_pending = TREE;
  auto start_offset = [&] {
    if (offset_pending && wg == 0) asm volatile("bar.arrive 1, 256;\n" ::: "memory");
    offset_pending = false;
  };
  if (TREE && wg == 1) asm volatile("bar.sync 1, 256;\n" ::: "memory");
  // The K tiles of the next chunk into acc; with `drain`, every wgmma has finished at the end.
  auto run_chunk = [&](float(&acc)[R], bool drain) {
    for (int j = 0; j < tiles_per_chunk; ++j, ++it) {
      const uint32_t s = it % STAGES;
      mbar_wait(full(s), (it / STAGES) & 1);
      const uint64_t da = smem_desc(base + s * STAGE_BYTES + wg * 64 * BK * 2);
      const uint64_t db = smem_desc(base + s * STAGE_BYTES + A_BYTES);
      const int k_live = min(BK, chunk_len - j * BK);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
        if (kk * 16 < k_live) wgmma_step<BN>(acc, da + 2 * kk, db + 2 * kk);  // + 32 bytes per k16 step
      wgmma_commit();
      start_offset();
      if (DRAIN || (drain && j == tiles_per_chunk - 1)) {
        wgmma_wait<0>();
        if (pending >= 0) release(uint32_t(pending));
        release(s);
        pending = -1;
      } else {
        wgmma_wait<1>();
        if (pending >= 0) release(uint32_t(pending));
        pending = int(s);
      }
    }
  };
  for (int tile = int(blockIdx.x); tile < tiles_total; tile += int(gridDim.x)) {
    int tile_m, tile_n, group, row0, row_end;
    tile_coordinates(tile, tiles_n, rows_fastest, tile_m, tile_n);
    if (!locate_row_tile<BM>(p, tile_m, group, row0, row_end)) break;
    (void)group;
    float x[R], y[TREE ? R : 1];
    float s1[TREE && !S1_SMEM ? R : 1], s2[TREE && !S2_SMEM ? R : 1];
    auto S1 = [&](int i) -> float& { return S1_SMEM ? sP[(R + i) * kTmaConsumerThreads] : s1[S1_SMEM ? 0 : i]; };
    auto S2 = [&](int i) -> float& { return S2_SMEM ? sP[i * kTmaConsumerThreads] : s2[S2_SMEM ? 0 : i]; };
#pragma unroll
    for (int i = 0; i < R; ++i) x[i] = 0.0f;
    if constexpr (!TREE) {
      run_chunk(x, true);
      store_wgmma_tile<BN>(p, x, row0, row_end, tile_n * BN, wg);
    } else {
#pragma unroll
      for (int i = 0; i < R; ++i) y[i] = 0.0f;
      for (int m = 0; m < 4; ++m) {
        run_chunk(x, false);  // chunk 2m
        run_chunk(y, true);   // chunk 2m + 1
        pin_registers(x);
        pin_registers(y);
        // Chunk 2m is the tree's s0, chunk 2m + 1 the sum being folded: fold_chunk's odd case
        // adds the pair (and zeroes y); after chunk 7, y holds the total.
        fold_chunk<R>(
            2 * m + 1, [&](int i) -> float& { return y[i]; }, [&](int i) -> float& { return x[i]; }, S1, S2);
        if (m < 3) {
#pragma unroll
          for (int i = 0; i < R; ++i) x[i] = 0.0f;
        }
        pin_registers(y);
      }
      store_wgmma_tile<BN>(p, y, row0, row_end, tile_n * BN, wg);
    }
  }
  start_offset();  // a CTA without tiles still lets warpgroup 1 go
}

template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS, bool DRAIN>
void launch_tma(const GemmArgs& p, cudaStream_t stream) {
  constexpr size_t smem = tma_smem_bytes<BN, STAGES, TREE, SMEM_PARTIALS>();
  auto kernel = tma_gemm_kernel<BN, STAGES, TREE, SMEM_PARTIALS, DRAIN>;
  static const bool configured = allow_dynamic_smem(kernel, smem);
  (void)configured;
  const int64_t groups = p.group_rows ? p.groups : 1;
  const CUtensorMap map_a = bf16_tensor_map(p.A, p.M, p.K, p.lda, kTmaBM, "gemm");
  const CUtensorMap map_w = bf16_tensor_map(p.W, groups * p.N, p.K, p.ldw, BN, "gemm");
  const int64_t tiles_m = row_tiles_bound(p, kTmaBM), tiles_n = ceil_div(p.N, BN), tiles = tiles_m * tiles_n;
  LS_CHECK(tiles < (int64_t(1) << 31), "gemm: shape too large for one TMA launch: M = ", p.M, ", N = ", p.N);
  const int grid = int(std::min<int64_t>(tiles, sm_count()));
  const bool rows_fastest = p.group_rows == nullptr && p.N > p.M;
  launch_after_previous(kernel, dim3(unsigned(grid)), dim3(kTmaThreads), smem, stream, map_a, map_w, p, int(tiles_n),
                        int(tiles), rows_fastest ? int(tiles_m) : 0);
}

}  // namespace

bool gemm_tma_applies(const GemmArgs& p) {
  auto aligned = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15) == 0; };
  const int64_t chunk_len = p.chunks == 8 ? (p.K + 7) / 8 : p.K;
  const int64_t groups = p.group_rows ? p.groups : 1;
  return p.a_gather == nullptr && p.a_swiglu_up == 0 && p.out_kind != GemmOut::bf16_swiglu && aligned(p.A) &&
         aligned(p.W) && p.lda % 8 == 0 && p.ldw % 8 == 0 && p.lda >= p.K && p.ldw >= p.K &&
         (p.chunks == 1 || chunk_len % 16 == 0) && (groups == 1 || p.w_group_stride == p.N * p.ldw) &&
         groups * p.N < (int64_t(1) << 31);
}

// Configurations (each gives the same bits as every other configuration):
// 0: column form 128 x 256, 4 stages (193 KB); row form 128 x 128, s1 and s2 in shared
//    memory, 3 stages (225 KB).
// 1: column form 128 x 128, 6 stages (193 KB); row form 128 x 128, s2 in shared memory,
//    x, y and s1 in registers (the producer warpgroup's registers moved to the consumers),
//    5 stages (225 KB).
// 2: column form: configuration 0 with each K tile drained before its stage is handed back;
//    row form 128 x 64, every partial in registers, 8 stages (193 KB).
// H200, 16384 tokens (cuda_bench --gemm, ms): qkv 0.64 / 0.89 / 0.64, o_proj 0.71 / 0.50 /
// 1.01, down 1.81 / 1.47 / 2.38 (the cp.async wgmma kernels: qkv 0.74, o_proj 0.73, down 2.17).
void gemm_tma_with_config(const GemmArgs& p, int config, cudaStream_t stream) {
  LS_CHECK(config >= 0 && config < kGemmTmaConfigs, "gemm: no TMA configuration ", config);
  LS_CHECK(gemm_tma_applies(p), "gemm: the TMA kernels do not take these arguments");
  if (p.M == 0) return;
  if (p.chunks == 8) {
    if (config == 0) return launch_tma<128, 3, true, 2, false>(p, stream);
    if (config == 1) return launch_tma<128, 5, true, 1, false>(p, stream);
    return launch_tma<64, 8, true, 0, false>(p, stream);
  }
  if (config == 0) return launch_tma<256, 4, false, 0, false>(p, stream);
  if (config == 1) return launch_tma<128, 6, false, 0, false>(p, stream);
  return launch_tma<256, 4, false, 0, true>(p, stream);
}

}  // namespace lockstep::cuda
