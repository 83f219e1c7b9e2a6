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
//
// In clusters of two CTAs (set_gemm_tma_cluster(2)) the pair shares one operand tile by TMA
// multicast, each CTA loading half of it into both: 128-row tiles over short sums feed the
// tensor cores 64 FLOP a byte of L2, so L2 bounds them (notes/gpu-trainer.md, session 21).
// Ungrouped problems pair two row tiles under one W tile (SHARE 1); grouped ones pair two
// column tiles of one row tile (SHARE 2), whose rows are always in one group. Each consumer
// warp hands a stage back to both CTAs, so neither overwrites a stage the other still reads.
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
// SHARE: 0, one CTA a tile; 1, the W tile shared by the row tiles 2u and 2u + 1 of a cluster
// (ungrouped only); 2, the A tile shared by the column tiles 2u and 2u + 1. Units are tiles,
// or with SHARE those pairs (units_n of them a row, or with rows_fastest that many rows a column).
template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS, bool DRAIN, int SHARE>
__global__ void __launch_bounds__(kTmaThreads, 1)
    tma_gemm_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_w, GemmArgs p,
                    int units_n, int units_total, int rows_fastest) {
  constexpr int BM = kTmaBM, BK = kTmaBK, R = BN / 2, CLUSTER = SHARE == 0 ? 1 : 2;
  constexpr uint32_t A_BYTES = BM * BK * 2, W_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + W_BYTES;
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
      mbar_init(empty(s), CLUSTER * kTmaConsumerThreads / 32);  // every consumer warp of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (CLUSTER == 1)
    __syncthreads();
  else
    cluster_sync();        // both CTAs' barriers exist before either loads into the other
  start_after_previous();  // rows and A come from the previous kernels
  const int rank = CLUSTER == 1 ? 0 : int(cluster_rank());
  // Unit u's tile for this CTA: tile_m, tile_n; false past the last row tile (the pair's first,
  // so both CTAs of a cluster stop together). A pair's second row tile may lie past M: its
  // loads are zeros and its stores masked.
  auto unit_tile = [&](int unit, int& group, int& row0, int& row_end, int& tile_n) {
    int tile_m;
    tile_coordinates(unit, units_n, rows_fastest, tile_m, tile_n);
    if constexpr (SHARE == 1) tile_m *= 2;
    if constexpr (SHARE == 2) tile_n = 2 * tile_n + rank;
    if (!locate_row_tile<BM>(p, tile_m, group, row0, row_end)) return false;
    if constexpr (SHARE == 1) row0 += rank * BM;
    return true;
  };

  const int K = int(p.K), N = int(p.N);
  // The loads run over spans of K: the column form's whole K, or the row form's chunk pairs. A
  // pair spans 2 chunk_len of K, so where a chunk is not a whole number of K tiles (down's chunk
  // of 96 at K = 768) no K tile is loaded for a half-empty chunk end: 3 tiles a pair, not 4.
  const int chunk_len = TREE ? (K + 7) / 8 : K, spans = TREE ? 4 : 1, span_len = TREE ? 2 * chunk_len : K;
  const int tiles_per_span = (span_len + BK - 1) / BK;

  // Three 128-column register sets need more than the 168 registers a thread of a 384-thread
  // CTA gets: then the producer warpgroup gives most of its share to the consumers.
  constexpr bool MOVE_REGISTERS = TREE && BN == 128 && SMEM_PARTIALS < 2;
  if (warp >= kTmaConsumerThreads / 32) {
    if constexpr (MOVE_REGISTERS) asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
    if (warp == kTmaConsumerThreads / 32) {  // lane 0 of one warp issues the loads
      uint32_t it = 0;
      for (int unit = int(blockIdx.x) / CLUSTER; unit < units_total; unit += int(gridDim.x) / CLUSTER) {
        int tile_n, group, row0, row_end;
        if (!unit_tile(unit, group, row0, row_end, tile_n)) break;
        const int w_row = group * N + tile_n * BN;
        for (int span = 0; span < spans; ++span)
          for (int j = 0; j < tiles_per_span; ++j, ++it) {
            const uint32_t s = it % STAGES, round = it / STAGES;
            if (lane != 0) continue;
            if (round > 0) mbar_wait(empty(s), (round - 1) & 1);
            const int k = span * span_len + j * BK;
            const uint32_t a_at = base + s * STAGE_BYTES, w_at = a_at + A_BYTES;
            mbar_arrive_expect_tx(full(s), STAGE_BYTES);  // with SHARE, half of one tile comes from the other CTA
            if constexpr (SHARE == 2)
              tma_load_multicast(a_at + rank * (A_BYTES / 2), &map_a, full(s), k, row0 + rank * (BM / 2), 0x3);
            else
              tma_load(a_at, &map_a, full(s), k, row0);
            if constexpr (SHARE == 1)
              tma_load_multicast(w_at + rank * (W_BYTES / 2), &map_w, full(s), k, w_row + rank * (BN / 2), 0x3);
            else
              tma_load(w_at, &map_w, full(s), k, w_row);
          }
      }
    }
    if constexpr (CLUSTER > 1) cluster_sync();  // the other CTA's last arrivals and loads are done
    return;
  }

  // The consumers: warpgroup wg computes rows 64 wg .. 64 wg + 63 of the tile.
  if constexpr (MOVE_REGISTERS) asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
  const int wg = warp >> 2;
  float* sP = reinterpret_cast<float*>(smem + size_t(STAGES) * STAGE_BYTES) + tid;
  constexpr bool S2_SMEM = SMEM_PARTIALS >= 1, S1_SMEM = SMEM_PARTIALS == 2;
  auto release = [&](uint32_t s) {
    __syncwarp();
    if constexpr (CLUSTER == 1) {
      if (lane == 0) mbar_arrive(empty(s));
    } else if (lane < 2) {
      mbar_arrive_in(empty(s), uint32_t(lane));  // lanes 0 and 1: each CTA's barrier
    }
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
  // The K tiles of the next span: its k16 steps below `split` into acc0, the rest up to the
  // span's end into acc1 (a pair's two chunks; chunk_len % 16 == 0, so no k16 step straddles
  // them). With `drain`, every wgmma has finished at the end.
  auto run_span = [&](float(&acc0)[R], float(&acc1)[R], int split, bool drain) {
    for (int j = 0; j < tiles_per_span; ++j, ++it) {
      const uint32_t s = it % STAGES;
      mbar_wait(full(s), (it / STAGES) & 1);
      const uint64_t da = smem_desc(base + s * STAGE_BYTES + wg * 64 * BK * 2);
      const uint64_t db = smem_desc(base + s * STAGE_BYTES + A_BYTES);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {  // + 32 bytes per k16 step
        const int k = j * BK + kk * 16;
        if (k < split)
          wgmma_step<BN>(acc0, da + 2 * kk, db + 2 * kk);
        else if (TREE && k < span_len)
          wgmma_step<BN>(acc1, da + 2 * kk, db + 2 * kk);
      }
      wgmma_commit();
      start_offset();
      if (DRAIN || (drain && j == tiles_per_span - 1)) {
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
  for (int unit = int(blockIdx.x) / CLUSTER; unit < units_total; unit += int(gridDim.x) / CLUSTER) {
    int tile_n, group, row0, row_end;
    if (!unit_tile(unit, group, row0, row_end, tile_n)) break;
    (void)group;
    float x[R], y[R];  // y: the row form's odd chunks (unused by the column form)
    float s1[TREE && !S1_SMEM ? R : 1], s2[TREE && !S2_SMEM ? R : 1];
    auto S1 = [&](int i) -> float& { return S1_SMEM ? sP[(R + i) * kTmaConsumerThreads] : s1[S1_SMEM ? 0 : i]; };
    auto S2 = [&](int i) -> float& { return S2_SMEM ? sP[i * kTmaConsumerThreads] : s2[S2_SMEM ? 0 : i]; };
#pragma unroll
    for (int i = 0; i < R; ++i) x[i] = 0.0f;
    if constexpr (!TREE) {
      run_span(x, x, K, true);
      store_wgmma_tile<BN>(p, x, row0, row_end, tile_n * BN, wg);
    } else {
#pragma unroll
      for (int i = 0; i < R; ++i) y[i] = 0.0f;
      for (int m = 0; m < 4; ++m) {
        run_span(x, y, chunk_len, true);  // chunks 2m (into x) and 2m + 1 (into y)
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
  if constexpr (CLUSTER > 1) cluster_sync();
}

template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS, bool DRAIN, int SHARE>
void launch_tma(const GemmArgs& p, cudaStream_t stream) {
  constexpr size_t smem = tma_smem_bytes<BN, STAGES, TREE, SMEM_PARTIALS>();
  constexpr int CLUSTER = SHARE == 0 ? 1 : 2;
  auto kernel = tma_gemm_kernel<BN, STAGES, TREE, SMEM_PARTIALS, DRAIN, SHARE>;
  static const bool configured = allow_dynamic_smem(kernel, smem);
  (void)configured;
  const int64_t groups = p.group_rows ? p.groups : 1;
  const CUtensorMap map_a = bf16_tensor_map(p.A, p.M, p.K, p.lda, SHARE == 2 ? kTmaBM / 2 : kTmaBM, "gemm");
  const CUtensorMap map_w = bf16_tensor_map(p.W, groups * p.N, p.K, p.ldw, SHARE == 1 ? BN / 2 : BN, "gemm");
  int64_t units_m = row_tiles_bound(p, kTmaBM), units_n = ceil_div(p.N, BN);
  if (SHARE == 1) units_m = ceil_div(units_m, 2);
  if (SHARE == 2) units_n = ceil_div(units_n, 2);
  const int64_t units = units_m * units_n;
  LS_CHECK(units < (int64_t(1) << 31), "gemm: shape too large for one TMA launch: M = ", p.M, ", N = ", p.N);
  const bool rows_fastest = p.group_rows == nullptr && p.N > p.M;
  // Persistent CTAs: one an SM, or as many clusters as the GPU holds at once.
  static const int resident = CLUSTER == 1 ? sm_count() : max_active_clusters(kernel, kTmaThreads, smem, CLUSTER);
  const int grid = CLUSTER * int(std::min<int64_t>(units, resident));
  launch_kernel(kernel, dim3(unsigned(grid)), dim3(kTmaThreads), smem, stream, LaunchOptions{true, unsigned(CLUSTER)},
                map_a, map_w, p, int(units_n), int(units), rows_fastest ? int(units_m) : 0);
}

int g_cluster_ctas = 2;  // set_gemm_tma_cluster

// The configuration's kernel at the cluster setting: ungrouped problems share W, grouped A.
template <int BN, int STAGES, bool TREE, int SMEM_PARTIALS, bool DRAIN>
void launch_tma_clustered(const GemmArgs& p, cudaStream_t stream) {
  if (g_cluster_ctas == 1) return launch_tma<BN, STAGES, TREE, SMEM_PARTIALS, DRAIN, 0>(p, stream);
  if (p.group_rows == nullptr) return launch_tma<BN, STAGES, TREE, SMEM_PARTIALS, DRAIN, 1>(p, stream);
  launch_tma<BN, STAGES, TREE, SMEM_PARTIALS, DRAIN, 2>(p, stream);
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
    if (config == 0) return launch_tma_clustered<128, 3, true, 2, false>(p, stream);
    if (config == 1) return launch_tma_clustered<128, 5, true, 1, false>(p, stream);
    return launch_tma_clustered<64, 8, true, 0, false>(p, stream);
  }
  if (config == 0) return launch_tma_clustered<256, 4, false, 0, false>(p, stream);
  if (config == 1) return launch_tma_clustered<128, 6, false, 0, false>(p, stream);
  return launch_tma_clustered<256, 4, false, 0, true>(p, stream);
}

void set_gemm_tma_cluster(int ctas) {
  LS_CHECK(ctas == 1 || ctas == 2, "gemm: TMA clusters of 1 or 2 CTAs, not ", ctas);
  g_cluster_ctas = ctas;
}

int gemm_tma_cluster() { return g_cluster_ctas; }

}  // namespace lockstep::cuda
