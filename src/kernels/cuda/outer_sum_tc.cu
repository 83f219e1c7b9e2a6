// The chunked outer sums of backward.h on tensor cores (mma.sync m16n8k16, bf16 operands,
// fp32 accumulation): the weight and input gradients of every bf16 linear in the trainer.
//
// g (fp32 gradients) cannot be an MMA operand as it is, so each value is split exactly into
// bf16 hi = bf16(g) and lo = bf16(g - hi); the pair carries 16 of fp32's 24 significand bits
// and each product with a bf16 m is exact in the accumulator. An output element's procedure
// is fixed (docs/numerics.md, rules 2 and 9): per chunk, accumulators start at 0 and take the
// chunk's rows in k16 steps from the chunk's first row (rows past its end are zero in both
// operands; no step lies wholly past the end), each step as mma(hi) then mma(lo); the chunk
// partials fold by the pairwise tree. Which warp or tile computes an element never changes
// how, so every tile gives the same bits; a chunk's partial depends only on its own rows.
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"

namespace lockstep::cuda {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kStage = 32;                            // summed rows staged at a time (two k16 steps)
constexpr int kPitch = kStage + 8;                    // bf16 per staged row: 80 bytes, conflict-free fragment loads
constexpr int kWarpI = 32, kWarpK = 32;               // outputs per warp: 2 m16 x 4 n8 fragments
constexpr int kPendingBytes = 2 * 32 * kThreads * 4;  // two levels of 32 accumulators a thread

// Block of (WI x WK) warps: outputs [i0, i0 + 32 WI) x [k0, k0 + 32 WK). Two blocks an SM: the
// next stage's operands are loaded into registers while the tensor cores run the present one,
// and the chunk tree's pending subtrees wait outside the registers (levels 0 and 1 in shared
// memory, level 2 in `out`, each value read back only by the thread that wrote it).
// Grouped (`groups` not null): group blockIdx.z of the device array; else `one`, and with
// `chunk_partials` only chunk blockIdx.z, its partial stored there ([chunk][I][K]) for
// fold_chunk_partials: the chunks in parallel, for sums of few outputs over many rows.
template <int WI, int WK, bool kGRowsContiguous>
__global__ void __launch_bounds__(kThreads, 2)
    outer_sum_tc_kernel(const OuterSumGroup* groups, OuterSumGroup one, int64_t g_row, int64_t g_col, int64_t K,
                        float* chunk_partials) {
  static_assert(WI * WK == kWarps, "one warp per 32 x 32 outputs");
  constexpr int BI = kWarpI * WI, BK = kWarpK * WK;
  constexpr int kAPairs = BI * kStage / 2 / kThreads, kBPairs = BK * kStage / 2 / kThreads;
  // Staged operands, the summed row innermost: a_hi/a_lo[i][s] (A row-major), b[k][s] (B
  // column-major), as the m16n8k16 fragments read them.
  __shared__ __align__(16) bf16 a_hi[BI][kPitch], a_lo[BI][kPitch], b_t[BK][kPitch];
  extern __shared__ float pending[];  // [level 0, 1][accumulator][thread]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, pair = (lane % 4) * 2;
  const int wi = (warp / WK) * kWarpI, wk = (warp % WK) * kWarpK;
  const int64_t i0 = int64_t(blockIdx.y) * BI, k0 = int64_t(blockIdx.x) * BK;
  const OuterSumGroup group_args = groups ? groups[blockIdx.z] : one;
  const int chunk_first = chunk_partials ? int(blockIdx.z) : 0;
  if (i0 >= group_args.I) return;  // the grid covers the largest group
  const float* __restrict__ g = group_args.g;
  const bf16* __restrict__ m = group_args.m;
  float* __restrict__ out = group_args.out;
  const int64_t I = group_args.I;
  const ChunkBounds& bounds = group_args.bounds;

  // One stage in registers: pairs of summed rows (s, s + 1) of g (per i) and of m (per k),
  // zero past the chunk's end and the tile's edges.
  float2 ga[kAPairs];
  uint32_t mb[kBPairs];
  // This thread's j-th pair of g: tile row ii, staged rows (sp, sp + 1); consecutive threads
  // take consecutive i where g's rows are contiguous (g_row == 1: weight grads), else
  // consecutive s.
  auto a_slot = [](int j, int& ii, int& sp) {
    const int idx = threadIdx.x + j * kThreads;
    ii = kGRowsContiguous ? idx % BI : idx / (kStage / 2);
    sp = 2 * (kGRowsContiguous ? idx / BI : idx % (kStage / 2));
  };
  auto load = [&](int64_t s0, int64_t end) {
#pragma unroll
    for (int j = 0; j < kAPairs; ++j) {
      int ii, sp;
      a_slot(j, ii, sp);
      const int64_t i = i0 + ii, s = s0 + sp;
      ga[j].x = i < I && s < end ? g[i * g_row + s * g_col] : 0.0f;
      ga[j].y = i < I && s + 1 < end ? g[i * g_row + (s + 1) * g_col] : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kBPairs; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      const int64_t k = k0 + idx % BK, s = s0 + 2 * (idx / BK);
      const bf16 zero = to_bf16(0.0f);
      mb[j] = pack_bf16(k < K && s < end ? m[s * K + k] : zero, k < K && s + 1 < end ? m[(s + 1) * K + k] : zero);
    }
  };
  auto store = [&]() {
#pragma unroll
    for (int j = 0; j < kAPairs; ++j) {
      int ii, sp;
      a_slot(j, ii, sp);
      const bf16 h0 = to_bf16(ga[j].x), h1 = to_bf16(ga[j].y);
      *reinterpret_cast<uint32_t*>(&a_hi[ii][sp]) = pack_bf16(h0, h1);
      *reinterpret_cast<uint32_t*>(&a_lo[ii][sp]) =
          pack_bf16(to_bf16(ga[j].x - to_f32(h0)), to_bf16(ga[j].y - to_f32(h1)));
    }
#pragma unroll
    for (int j = 0; j < kBPairs; ++j) {
      const int idx = threadIdx.x + j * kThreads;
      *reinterpret_cast<uint32_t*>(&b_t[idx % BK][2 * (idx / BK)]) = mb[j];
    }
  };

  for (int c = chunk_first; c < (chunk_partials ? chunk_first + 1 : bounds.count); ++c) {
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.0f;
    const int64_t first = bounds.rows[c], end = bounds.rows[c + 1];
    if (first < end) load(first, end);
    for (int64_t s0 = first; s0 < end; s0 += kStage) {
      __syncthreads();  // the previous stage's fragments are read
      store();
      __syncthreads();
      if (s0 + kStage < end) load(s0 + kStage, end);
      const int steps = end - s0 > 16 ? 2 : 1;
      for (int step = 0; step < steps; ++step) {
        // ldmatrix: A's four 8 x 8 matrices from rows i (lanes 0-15) at k 0 and 8 (lanes 16-31);
        // two n8 tiles of B at once, each its k 0 and k 8 halves.
        uint32_t hi[2][4], lo[2][4], bm[4][2];
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const int row = wi + a * 16 + lane % 16, k = step * 16 + (lane / 16) * 8;
          ldmatrix_x4(hi[a], smem_addr(&a_hi[row][k]));
          ldmatrix_x4(lo[a], smem_addr(&a_lo[row][k]));
        }
#pragma unroll
        for (int bb = 0; bb < 2; ++bb) {
          uint32_t r[4];
          ldmatrix_x4(r, smem_addr(&b_t[wk + bb * 16 + (lane / 16) * 8 + lane % 8][step * 16 + (lane / 8) % 2 * 8]));
          bm[2 * bb][0] = r[0], bm[2 * bb][1] = r[1], bm[2 * bb + 1][0] = r[2], bm[2 * bb + 1][1] = r[3];
        }
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            mma_bf16(acc[a][b], hi[a], bm[b][0], bm[b][1]);
            mma_bf16(acc[a][b], lo[a], bm[b][0], bm[b][1]);
          }
      }
    }
    // TreeFold's merge, its pending subtrees outside the registers: chunk c merges with the
    // saved left subtrees while c's low bits are ones; the last push completes the root. (With
    // chunk_partials: the chunk's partial alone, stored.)
    const bool last = c == bounds.count - 1;
    const int level = tree_level(c);
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // Accumulator e of fragment (a, b): row group (+8 for e >= 2), columns pair + (e & 1).
          const int64_t i = i0 + wi + a * 16 + group + (e >= 2 ? 8 : 0), k = k0 + wk + b * 8 + pair + (e & 1);
          const bool inside = i < I && k < K;
          if (chunk_partials) {
            if (inside) chunk_partials[(c * I + i) * K + k] = acc[a][b][e];
            continue;
          }
          float* level0 = &pending[((a * 4 + b) * 4 + e) * kThreads + threadIdx.x];
          float* level1 = level0 + kWarps * 32 * 32;
          fold_partial(acc[a][b][e], level, last, level0, level1, &out[i * K + k], inside);
        }
  }
}

void launch(const OuterSumGroup* groups, const OuterSumGroup& one, int count, int64_t max_I, int64_t g_row,
            int64_t g_col, int64_t K, cudaStream_t s, TcTile tile, float* chunk_partials = nullptr) {
  const bool wide = tile == TcTile::k64x128;
  const int BI = wide ? 64 : 128, BK = wide ? 128 : 64;
  const dim3 grid(unsigned(ceil_div(K, BK)), unsigned(ceil_div(max_I, BI)), unsigned(count));
  LS_CHECK(grid.y <= 65535 && grid.z <= 65535, "outer sums on tensor cores: ", max_I, " output rows and ", count,
           " groups exceed the grid");
  const bool rows_contiguous = g_row == 1;
  const auto kernel = wide ? (rows_contiguous ? outer_sum_tc_kernel<2, 4, true> : outer_sum_tc_kernel<2, 4, false>)
                           : (rows_contiguous ? outer_sum_tc_kernel<4, 2, true> : outer_sum_tc_kernel<4, 2, false>);
  LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kPendingBytes));
  kernel<<<grid, kThreads, kPendingBytes, s>>>(groups, one, g_row, g_col, K, chunk_partials);
  LS_CUDA_LAUNCHED();
}

}  // namespace

void outer_sum_chunked_tc(const float* g, int64_t g_row, int64_t g_col, const bf16_t* m, int64_t K,
                          const ChunkBounds& bounds, float* out, int64_t I, cudaStream_t s, TcTile tile) {
  check_chunk_bounds(bounds, "outer_sum_chunked_tc");
  if (I == 0 || K == 0) return;
  launch(nullptr, OuterSumGroup{g, m, out, I, bounds}, 1, I, g_row, g_col, K, s, tile);
}

void outer_sum_chunk_parallel_tc(const float* g, int64_t g_row, int64_t g_col, const bf16_t* m, int64_t K,
                                 const ChunkBounds& bounds, float* out, int64_t I, float* workspace,
                                 int64_t workspace_floats, cudaStream_t s) {
  check_chunk_bounds(bounds, "outer_sum_chunk_parallel_tc");
  LS_CHECK(workspace_floats >= bounds.count * I * K, "outer_sum_chunk_parallel_tc: ", bounds.count,
           " chunk partials of ", I, " x ", K, " need ", bounds.count * I * K, " floats of workspace, got ",
           workspace_floats);
  if (I == 0 || K == 0) return;
  launch(nullptr, OuterSumGroup{g, m, out, I, bounds}, bounds.count, I, g_row, g_col, K, s, TcTile::k64x128, workspace);
  fold_chunk_partials(workspace, out, I * K, bounds.count, s);
}

void outer_sum_grouped_tc(const OuterSumGroup* groups, int count, int64_t max_I, int64_t g_row, int64_t g_col,
                          int64_t K, cudaStream_t s, TcTile tile) {
  if (count == 0 || max_I == 0 || K == 0) return;
  launch(groups, OuterSumGroup{}, count, max_I, g_row, g_col, K, s, tile);
}

}  // namespace lockstep::cuda
