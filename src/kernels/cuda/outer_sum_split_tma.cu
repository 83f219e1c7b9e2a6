// outer_sum_split_wgmma's procedure, warp-specialized: one producer thread streams the stages
// with TMA into an mbarrier ring and two consumer warpgroups run the wgmma on them (the
// structure of gemm_tma.cu). The same bits as every other tile of the split outer sums.
//
// The cp.async tile issues its loads from the threads that issue the MMAs and passes a CTA
// barrier every stage; lm_head's weight gradient ran there at ~240 TFLOP/s (notes/gpu-trainer.md).
// Here the loads run a ring ahead with no CTA barrier, and the consumer warpgroups start one
// stage apart, so one folds a chunk while the other's MMAs run.
//
// Shared memory is the cp.async tile's layout, which the TMA 128-byte swizzle writes as well:
// g's tile [s][i] in two 64-column atoms (weight gradients) or [i][s] rows of 64 s (input
// gradients), m's [s][k] in 64-column atoms. A chunk's stages start at its first row, so a
// stage may run past the chunk's end: rows past it inside the last k16 step must be zero in
// both operands. For weight gradients a masking warp zeroes those rows after the TMA lands
// (whole 128-byte rows of each atom) and passes the stage on; input gradients come here only
// with chunks of whole k16 steps (outer_sum_split_tma_applies).
//
// Problems travel as a __grid_constant__ parameter with up to two tensor maps per operand (the
// experts' gate and up gradients are two buffers); a problem is a row offset into its maps.
//
// Clusters of two CTAs (kCluster 2): the tiles of short sums feed the tensor cores 64 FLOP a
// byte of L2 at 128 x 128, so L2 bounds them (notes/gpu-trainer.md, session 21). The two CTAs
// of a cluster take the two output row blocks of one (row pair, column block) unit and share
// its m tile: each loads half of m's atoms into both CTAs' shared memory (TMA multicast), and
// each consumer warp hands a stage back to both CTAs, so neither overwrites a stage the other
// still reads. A CTA whose row block is past I runs the stages all the same (its loads are
// zeros, its stores masked) so its half of m reaches the other.
#include <algorithm>

#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mbarrier.cuh"
#include "kernels/cuda/outer_sum_chunks.cuh"
#include "kernels/cuda/outer_sum_split_tma.h"
#include "kernels/cuda/outer_sum_split_wgmma.h"
#include "kernels/cuda/tensor_map.h"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda {

namespace {

constexpr int kConsumers = 256;             // two warpgroups of 64 output rows
constexpr int kThreads = kConsumers + 128;  // and the producer warpgroup
constexpr int kBI = 128;                    // output rows a tile
constexpr int kRows = 64;                   // summed rows a stage: four k16 steps
constexpr int kAtom = kRows * 128;          // bytes of 64 MN-major columns over a stage's rows
constexpr int kGTile = kBI * kRows * 2;     // 16 KB
constexpr int kMaxProblems = kMaxWgmmaGroups;

struct Problem {
  float* out;
  int32_t I, chunk_count;
  int32_t rows[kTMax + 1];  // chunk bounds in the problem's summed rows
  int32_t g_map, g_offset;  // its g map and first row there (weight: the summed s; input: i)
  int32_t m_map, m_offset;  // its m map and first summed row there
};
struct Problems {
  int32_t count;
  Problem p[kMaxProblems];
};
struct Maps {
  CUtensorMap g[2], m[2];
};

// kBK 256: the pending tree levels 0 and 1 in the block's workspace slot (a fold reads and
// writes 128 KB of it: for long chunks only), level 2 in the output; kBK 128: the chunks in
// pairs, levels 0 (x) and 1 in registers, level 2 in shared memory: no memory traffic a fold,
// and the last fold waits on no global load (the experts' tiles are 8 stages long).
template <int kBK>
struct TmaTile {
  static constexpr int Acc = kBK / 2, Fragments = Acc / 4;  // a consumer thread's
  static constexpr bool Pairs = kBK == 128;
  static constexpr int StageBytes = kGTile + kBK * kRows * 2;
  static constexpr int PendingSmemBytes = Pairs ? Fragments * kConsumers * 16 : 0;
  static constexpr int BarrierBytes = 256;
  static constexpr int Stages = std::min(8, (227 * 1024 - 1024 - BarrierBytes - PendingSmemBytes) / StageBytes);
  static constexpr int SmemBytes = 1024 + Stages * StageBytes + PendingSmemBytes + BarrierBytes;
};
static_assert(TmaTile<256>::Stages == 4 && TmaTile<128>::Stages == 5, "the rings");
static_assert(3 * 8 * TmaTile<128>::Stages <= TmaTile<128>::BarrierBytes, "full, empty and ready barriers");
static_assert(2 * TmaTile<256>::Acc * kConsumers == kSplitPendingFloats, "the workspace slot holds levels 0 and 1");

// Units u = cluster, cluster + clusters, ... (a CTA's cluster: blockIdx.x / kCluster): column
// block u % tiles_k, row blocks kCluster (u / tiles_k) % units_i + rank, the CTA's rank of
// them, of problem q = u / (tiles_k units_i) and of q + count / kParts ... for each later part;
// visit(problem, i0, column block, accumulate) for units with outputs, accumulate for every part
// after the first. The producer, the masking warp and the consumers walk the same sequence.
// (kParts is a template parameter: a run-time loop over parts cost the one-part kernels spills.)
template <int kCluster, int kParts, typename Visit>
__device__ __forceinline__ void for_each_tile(const Problems& problems, int64_t tiles_k, int64_t units_i, int64_t units,
                                              Visit visit) {
  const int rank = kCluster == 1 ? 0 : int(cluster_rank());
  const int per_part = problems.count / kParts;
  for (int64_t unit = blockIdx.x / kCluster; unit < units; unit += gridDim.x / kCluster) {
    const int first = int(unit / (tiles_k * units_i));
    const int k_block = int(unit % tiles_k), unit_i0 = int(unit / tiles_k % units_i) * kCluster * kBI;
    if (unit_i0 >= problems.p[first].I) continue;  // every part has the first's I
#pragma unroll
    for (int part = 0; part < kParts; ++part)
      visit(problems.p[first + part * per_part], unit_i0 + rank * kBI, k_block, part > 0);
  }
}

// mask: weight gradients with a chunk whose length is not a multiple of 16. kInputPairStages:
// set_outer_sum_input_pair_stages (input gradients only).
template <bool kWeight, bool kInputPairStages, int kBK, int kCluster, int kParts>
__global__ void __launch_bounds__(kThreads, 1)
    outer_sum_split_tma_kernel(const __grid_constant__ Maps maps, const __grid_constant__ Problems problems, int64_t K,
                               int64_t tiles_k, int64_t units_i, int64_t units, int mask, float* workspace) {
  using Tile = TmaTile<kBK>;
  constexpr int kStages = Tile::Stages;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw), base = (raw + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw);
  const uint32_t bars = base + kStages * Tile::StageBytes + Tile::PendingSmemBytes;
  // full: the TMA bytes landed; ready: the masking warp zeroed the rows past the chunk's end;
  // empty: the eight consumer warps are done with the stage.
  const auto full = [&](int s) { return bars + 8 * s; };
  const auto empty = [&](int s) { return bars + 8 * (kStages + s); };
  const auto ready = [&](int s) { return bars + 8 * (2 * kStages + s); };
  const int tid = threadIdx.x, lane = tid % 32, warp = __shfl_sync(0xffffffffu, tid / 32, 0);
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kCluster * kConsumers / 32);  // every consumer warp of the cluster
      mbar_init(ready(s), 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if constexpr (kCluster == 1)
    __syncthreads();
  else
    cluster_sync();  // both CTAs' barriers exist before either loads into the other
  const bool masked = kWeight && mask != 0;
  // Input gradients' chunks are whole k16 steps: a pair's stages run on across its middle (its
  // k16 steps go to x, then y), so a chunk of 96 rows does not take a stage of its own for its
  // last 32 (the experts' d x: 12 stages a tile, not 16).
  constexpr bool kPairStages = kInputPairStages && !kWeight && Tile::Pairs;
  const uint32_t rank = kCluster == 1 ? 0 : cluster_rank();

  if (warp >= kConsumers / 32) {
    // The producer warpgroup gives its registers to the consumers (a 128 x 256 tile's
    // accumulators are 128 a thread).
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    const int role = warp - kConsumers / 32;
    if (role == 0 && lane == 0) {  // the loads
      uint32_t it = 0;
      const auto load = [&](const Problem& p, int i0, int k_block, bool) {
        const void* g_map = &maps.g[p.g_map];
        const void* m_map = &maps.m[p.m_map];
        constexpr int kChunksPerRun = kPairStages ? 2 : 1;
        for (int c = 0; c < p.chunk_count; c += kChunksPerRun)
          for (int s0 = p.rows[c], end = p.rows[min(c + kChunksPerRun, p.chunk_count)]; s0 < end; s0 += kRows, ++it) {
            const int slot = int(it % kStages);
            if (it >= uint32_t(kStages)) mbar_wait(empty(slot), (it / kStages - 1) & 1);
            const uint32_t g_at = base + slot * Tile::StageBytes, m_at = g_at + kGTile;
            mbar_arrive_expect_tx(full(slot), Tile::StageBytes);
            if constexpr (kWeight) {
              tma_load(g_at, g_map, full(slot), i0, p.g_offset + s0);
              tma_load(g_at + kAtom, g_map, full(slot), i0 + 64, p.g_offset + s0);
            } else {
              tma_load(g_at, g_map, full(slot), s0, p.g_offset + i0);
            }
            // m's atoms: all of them, or this CTA's half into both CTAs.
            constexpr int kAtoms = kBK / 64 / kCluster;
#pragma unroll
            for (int q = 0; q < kAtoms; ++q) {
              const int a = int(rank) * kAtoms + q;
              if constexpr (kCluster == 1)
                tma_load(m_at + a * kAtom, m_map, full(slot), k_block * kBK + 64 * a, p.m_offset + s0);
              else
                tma_load_multicast(m_at + a * kAtom, m_map, full(slot), k_block * kBK + 64 * a, p.m_offset + s0,
                                   uint16_t(0x3));
            }
          }
      };
      for_each_tile<kCluster, kParts>(problems, tiles_k, units_i, units, load);
    } else if (role == 1 && masked) {  // rows past a chunk's end inside its last k16 step
      uint32_t it = 0;
      for_each_tile<kCluster, kParts>(problems, tiles_k, units_i, units, [&](const Problem& p, int, int, bool) {
        for (int c = 0; c < p.chunk_count; ++c)
          for (int s0 = p.rows[c]; s0 < p.rows[c + 1]; s0 += kRows, ++it) {
            const int slot = int(it % kStages);
            mbar_wait(full(slot), (it / kStages) & 1);
            const int live = min(kRows, p.rows[c + 1] - s0), top = (live + 15) / 16 * 16;
            constexpr int kAtoms = 2 + kBK / 64;  // g's two, then m's
            const int pieces = (top - live) * kAtoms * 8;
            unsigned char* stage = smem + slot * Tile::StageBytes;
            for (int q = lane; q < pieces; q += 32) {
              const int row = live + q / (kAtoms * 8), atom = q / 8 % kAtoms, piece = q % 8;
              *reinterpret_cast<uint4*>(stage + atom * kAtom + row * 128 + piece * 16) = make_uint4(0, 0, 0, 0);
            }
            fence_proxy_async();  // the zeros are visible to the tensor cores
            __syncwarp();
            if (lane == 0) mbar_arrive(ready(slot));
          }
      });
    }
    if constexpr (kCluster > 1) cluster_sync();  // the other CTA's last arrivals and loads are done
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int wg = warp / 4;
  uint32_t it = 0;
  int in_flight = -1;  // the stage whose MMAs may still be running
  const auto release = [&](int slot) {
    __syncwarp();
    if constexpr (kCluster == 1) {
      if (lane == 0) mbar_arrive(empty(slot));
    } else if (lane < 2) {
      mbar_arrive_in(empty(slot), uint32_t(lane));  // lanes 0 and 1: each CTA's barrier
    }
  };
  // Warpgroup 1 starts one stage after warpgroup 0 (a named barrier, once), so their chunk
  // folds fall at different times; the ring absorbs the offset.
  bool offset_pending = true;
  const auto start_offset = [&] {
    if (offset_pending && wg == 0) asm volatile("bar.arrive 1, 256;\n" ::: "memory");
    offset_pending = false;
  };
  if (wg == 1) asm volatile("bar.sync 1, 256;\n" ::: "memory");
  float4* pending = Tile::Pairs ? reinterpret_cast<float4*>(smem + kStages * Tile::StageBytes)
                                : reinterpret_cast<float4*>(workspace + int64_t(blockIdx.x) * kSplitPendingFloats);

  const auto tile = [&](const Problem& p, int i0, int k_block, bool accumulate) {
    const int k0 = k_block * kBK, I = p.I;
    float* __restrict__ out = p.out;
    // The stages of rows first .. end: k16 steps of rows below mid into acc0, the rest into acc1
    // (with kPairStages; else mid == end, acc0 is acc1). One stage's MMAs may still run on return.
    const auto run_span = [&](float(&acc0)[Tile::Acc], float(&acc1)[Tile::Acc], int first, int mid, int end) {
      for (int s0 = first; s0 < end; s0 += kRows, ++it) {
        const int slot = int(it % kStages);
        mbar_wait(masked ? ready(slot) : full(slot), (it / kStages) & 1);
        const uint32_t g_at = base + slot * Tile::StageBytes, m_at = g_at + kGTile;
        const int live = end - s0;
        const int steps = live >= kRows ? kRows / 16 : (live + 15) / 16;
        const auto step = [&](int kk) {
          // A k16 step: 16 rows of an MN-major tile are 2048 bytes on; 32 bytes of a K-major row.
          const uint64_t d_g =
              kWeight ? smem_desc_mn(g_at + wg * kAtom + kk * 2048, kAtom) : smem_desc(g_at + wg * 64 * 128) + 2 * kk;
          const uint64_t d_m = smem_desc_mn(m_at + kk * 2048, kAtom);
          if (!kPairStages || s0 + 16 * kk < mid)
            wgmma_step<kBK, kWeight ? 1 : 0, 1>(acc0, d_g, d_m);
          else
            wgmma_step<kBK, kWeight ? 1 : 0, 1>(acc1, d_g, d_m);
        };
        wgmma_fence();
        issue_steps(steps, step);
        wgmma_commit();
        start_offset();
        wgmma_wait<1>();  // the previous stage's MMAs are done: hand its slot back
        if (in_flight >= 0) release(in_flight);
        in_flight = slot;
      }
    };
    const auto zero = [](float(&acc)[Tile::Acc]) {
#pragma unroll
      for (int e = 0; e < Tile::Acc; ++e) acc[e] = 0.0f;
    };
    // Chunk c's stages into acc (zeroed first).
    const auto run_chunk = [&](float(&acc)[Tile::Acc], int c) {
      zero(acc);
      run_span(acc, acc, p.rows[c], p.rows[c + 1], p.rows[c + 1]);
    };
    const auto drain = [&] {
      wgmma_wait<0>();
      if (in_flight >= 0) release(in_flight);
      in_flight = -1;
    };
    const int64_t i = i0 + wg * 64 + (warp % 4) * 16 + lane / 4;  // the thread's first row
    if constexpr (Tile::Pairs) {
      float4 level1[Tile::Fragments];  // written before it is read (the tree's level-1 subtree)
      const auto fold = [&](const float(&acc)[Tile::Acc], int c, auto&& level0) {
        fold_chunk_partial_on_chip<Tile::Acc>(acc, c, p.chunk_count, out, i, k0, lane, I, K, level1, pending,
                                              kConsumers, tid, level0, accumulate);
      };
      if constexpr (kPairStages) {
        const auto run_pair = [&](float(&x)[Tile::Acc], float(&y)[Tile::Acc], int c) {
          zero(x), zero(y);
          const int mid = p.rows[c + 1], end = p.rows[min(c + 2, p.chunk_count)];
          run_span(x, y, p.rows[c], mid, end);
        };
        run_chunk_pairs<Tile::Acc>(p.chunk_count, run_pair, drain, fold);
      } else {
        run_chunks<Tile::Acc, true>(p.chunk_count, run_chunk, drain, fold);
      }
    } else {
      run_chunks<Tile::Acc, false>(p.chunk_count, run_chunk, drain,
                                   [&](const float(&acc)[Tile::Acc], int c, auto&& level0) {
                                     fold_chunk_partial<Tile::Acc, false>(acc, c, p.chunk_count, out, i, k0, lane, I, K,
                                                                          pending, kConsumers, tid, level0);
                                   });
    }
  };
  for_each_tile<kCluster, kParts>(problems, tiles_k, units_i, units, tile);
  start_offset();  // a block whose tiles had no stages still lets warpgroup 1 go
  if constexpr (kCluster > 1) cluster_sync();
}

template <bool kWeight, int kBK, int kCluster, bool kInputPairStages = false, int kParts = 1>
void launch(const Maps& maps, const Problems& problems, int64_t max_I, int64_t K, bool mask, float* workspace,
            cudaStream_t s) {
  const int64_t tiles_k = ceil_div(K, int64_t(kBK)), units_i = ceil_div(ceil_div(max_I, int64_t(kBI)), kCluster);
  const int64_t units = tiles_k * units_i * (problems.count / kParts);
  const auto kernel = outer_sum_split_tma_kernel<kWeight, kInputPairStages, kBK, kCluster, kParts>;
  constexpr int bytes = TmaTile<kBK>::SmemBytes;
  LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  // One workspace slot a block: never more blocks than SMs (nor clusters than the GPU holds).
  static const int resident = kCluster == 1 ? sm_count() : max_active_clusters(kernel, kThreads, bytes, kCluster);
  const int64_t grid = kCluster * std::min<int64_t>(units, resident);
  launch_kernel(kernel, dim3(unsigned(grid)), dim3(kThreads), bytes, s, LaunchOptions{false, unsigned(kCluster)}, maps,
                problems, K, tiles_k, units_i, units, mask ? 1 : 0, workspace);
}

// The span among `spans` holding `p` at a whole row (row_bytes apart) and its row there, or -1.
int find_span(const bf16_t* const (&spans)[2], const int64_t (&rows)[2], const bf16_t* p, int64_t row_elems,
              int64_t& row) {
  for (int m = 0; m < 2; ++m) {
    if (spans[m] == nullptr || p < spans[m]) continue;
    const int64_t elems = p - spans[m];
    if (elems % row_elems == 0 && elems / row_elems < std::max<int64_t>(rows[m], 1)) {
      row = elems / row_elems;
      return m;
    }
  }
  return -1;
}

int g_cluster_ctas = 2;  // set_outer_sum_tma_cluster
bool g_input_pair_stages = false;
bool g_input_parts_summed = false;

}  // namespace

void set_outer_sum_input_pair_stages(bool on) { g_input_pair_stages = on; }

bool outer_sum_input_pair_stages() { return g_input_pair_stages; }

void set_outer_sum_input_parts_summed(bool on) { g_input_parts_summed = on; }

bool outer_sum_input_parts_summed() { return g_input_parts_summed; }

void set_outer_sum_tma_cluster(int ctas) {
  LS_CHECK(ctas == 1 || ctas == 2, "outer sums on the TMA tile: clusters of 1 or 2 CTAs, not ", ctas);
  g_cluster_ctas = ctas;
}

int outer_sum_tma_cluster() { return g_cluster_ctas; }

bool outer_sum_split_tma_applies(bool weight, int64_t g_pitch, int64_t K, const ChunkBounds& bounds,
                                 GradientOperand operand) {
  if (operand != GradientOperand::bf16 || K % 8 != 0 || g_pitch % 8 != 0) return false;
  if (bounds.rows[bounds.count] >= (int64_t(1) << 31)) return false;
  if (weight) return true;  // rows past a chunk's end are zeroed in shared memory
  for (int c = 0; c < bounds.count; ++c)
    if ((bounds.rows[c + 1] - bounds.rows[c]) % 16 != 0 || bounds.rows[c] % 8 != 0) return false;
  return true;
}

void outer_sum_split_tma_grouped(const SplitOuterSumGroup* host_groups, int count, int64_t max_I, bool weight,
                                 int64_t g_pitch, int64_t K, const SplitSpans& spans, float* workspace, cudaStream_t s,
                                 int tile_columns, int parts) {
  LS_CHECK(count >= 0 && count <= kMaxProblems, "outer sums on the TMA tile: ", count, " groups (at most ",
           kMaxProblems, ")");
  LS_CHECK(tile_columns == 128 || tile_columns == 256, "outer sums on the TMA tile: tiles are 128 or 256 columns, not ",
           tile_columns);
  LS_CHECK(tile_columns == 128 || workspace, "outer sums on the TMA tile: the 128 x 256 tile needs a workspace");
  // The 128 x 256 tile keeps its tree's level 2 in the output, which a later part would overwrite.
  LS_CHECK(parts == 1 || (parts == 2 && !weight && tile_columns == 128 && count % parts == 0),
           "outer sums on the TMA tile: outputs summed over parts are input gradients in 2 parts on the 128-column "
           "tile, in whole runs (got ",
           parts, " parts, ", count, " groups, ", weight ? "weight" : "input", " gradients, ", tile_columns,
           " columns)");
  for (int q = 0; q < count; ++q) {
    const SplitOuterSumGroup& first = host_groups[q % (count / parts)];
    LS_CHECK(host_groups[q].out == first.out && host_groups[q].I == first.I, "outer sums on the TMA tile: group ", q,
             " (part ", q / (count / parts), ") must write the output of group ", q % (count / parts), " with its I ",
             first.I, " (I ", host_groups[q].I, ")");
  }
  if (count == 0 || max_I == 0 || K == 0) return;
  Problems problems;
  problems.count = count;
  bool mask = false;
  int64_t summed = 0;                       // the largest summed extent (the input gradients' g columns)
  const int64_t g_row_elems = 2 * g_pitch;  // a packed row keeps its fp32 row's bytes
  for (int q = 0; q < count; ++q) {
    const SplitOuterSumGroup& group = host_groups[q];
    check_chunk_bounds(group.bounds, "outer_sum_split_tma_grouped");
    LS_CHECK(group.I <= max_I && outer_sum_split_tma_applies(weight, g_pitch, K, group.bounds, GradientOperand::bf16),
             "outer_sum_split_tma_grouped: group ", q, " (I ", group.I, ", max_I ", max_I,
             ") is not taken: see outer_sum_split_tma_applies");
    Problem& p = problems.p[q];
    int64_t g_row = 0, m_row = 0;
    p.g_map = find_span(spans.g, spans.g_rows, group.g, g_row_elems, g_row);
    p.m_map = find_span(spans.m, spans.m_rows, group.m, K, m_row);
    LS_CHECK(p.g_map >= 0 && p.m_map >= 0, "outer_sum_split_tma_grouped: group ", q,
             "'s operands are not whole rows of the spans given");
    LS_CHECK(g_row < (int64_t(1) << 30) && m_row < (int64_t(1) << 30), "outer_sum_split_tma_grouped: group ", q,
             " starts past 2^30 rows");
    p.out = group.out;
    p.I = int32_t(group.I);
    p.chunk_count = group.bounds.count;
    for (int c = 0; c <= group.bounds.count; ++c) p.rows[c] = int32_t(group.bounds.rows[c]);
    p.g_offset = int32_t(g_row), p.m_offset = int32_t(m_row);
    summed = std::max(summed, group.bounds.rows[group.bounds.count]);
    for (int c = 0; c < group.bounds.count; ++c) mask |= (group.bounds.rows[c + 1] - group.bounds.rows[c]) % 16 != 0;
  }
  Maps maps{};
  for (int m = 0; m < 2; ++m) {
    if (spans.g[m]) {
      LS_CHECK(aligned16(spans.g[m]), "outer_sum_split_tma_grouped: g span ", m, " is not 16-byte aligned");
      // Weight gradients: rows s of max_I columns; input gradients: rows i of the summed columns.
      // (At least one row and column: a map of empty sums is never read.)
      const int64_t rows = std::max<int64_t>(spans.g_rows[m], 1), cols = std::max<int64_t>(weight ? max_I : summed, 1);
      maps.g[m] = bf16_tensor_map(spans.g[m], rows, cols, g_row_elems, weight ? 64 : 128, "outer sums (g)");
    }
    if (spans.m[m]) {
      LS_CHECK(aligned16(spans.m[m]), "outer_sum_split_tma_grouped: m span ", m, " is not 16-byte aligned");
      maps.m[m] = bf16_tensor_map(spans.m[m], std::max<int64_t>(spans.m_rows[m], 1), K, K, 64, "outer sums (m)");
    }
  }
  const auto run = [&]<int kCluster>() {
    if (weight && tile_columns == 256) return launch<true, 256, kCluster>(maps, problems, max_I, K, mask, workspace, s);
    if (weight) return launch<true, 128, kCluster>(maps, problems, max_I, K, mask, workspace, s);
    if (parts == 2) {  // the experts' d x in gate's and up's parts (weight gradients never come here)
      if (g_input_pair_stages)
        return launch<false, 128, kCluster, true, 2>(maps, problems, max_I, K, false, workspace, s);
      return launch<false, 128, kCluster, false, 2>(maps, problems, max_I, K, false, workspace, s);
    }
    if (g_input_pair_stages && tile_columns == 256)
      return launch<false, 256, kCluster, true>(maps, problems, max_I, K, false, workspace, s);
    if (g_input_pair_stages) return launch<false, 128, kCluster, true>(maps, problems, max_I, K, false, workspace, s);
    if (tile_columns == 256) return launch<false, 256, kCluster>(maps, problems, max_I, K, false, workspace, s);
    launch<false, 128, kCluster>(maps, problems, max_I, K, false, workspace, s);
  };
  if (g_cluster_ctas == 2) return run.template operator()<2>();
  run.template operator()<1>();
}

void outer_sum_split_tma(const SplitOuterSumGroup& one, bool weight, int64_t g_pitch, int64_t K, float* workspace,
                         cudaStream_t s, int tile_columns) {
  const int64_t summed = one.bounds.rows[one.bounds.count];
  SplitSpans spans{};
  spans.g[0] = one.g, spans.g_rows[0] = weight ? summed : one.I;
  spans.m[0] = one.m, spans.m_rows[0] = summed;
  outer_sum_split_tma_grouped(&one, 1, one.I, weight, g_pitch, K, spans, workspace, s, tile_columns);
}

}  // namespace lockstep::cuda
