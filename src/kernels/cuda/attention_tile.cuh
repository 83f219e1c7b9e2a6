// The attention of one query tile (attention.cu's kernel, and the one-launch decode kernel):
// the procedure and its arithmetic are described in attention.cu.
#pragma once
#include <climits>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/row_ops.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda {
namespace attention_detail {

constexpr int kKvBlock = kAttentionKvBlock;
constexpr int kWarps = kTileRows / 16;
constexpr int kThreads = kWarps * 32;

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
// The two bf16 halves of a packed pair as floats (exact).
__device__ __forceinline__ float low_f32(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float high_f32(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }

// One KV block's online-softmax update for a lane's two rows a and b (mma accumulator rows
// lane / 4 and lane / 4 + 8 of its warp) from their unscaled scores s (the accumulator
// layout of NT_S n8 tiles: s[4 nt + e], e = 0, 1 row a, e = 2, 3 row b): the mask (keys after
// the row's position to -inf, diagonal blocks only), the block row max (exact in any order;
// scale > 0 keeps the arg max), P = bf16(2^(s c - m c)) as packed pairs (the A fragments of
// P V), the row sums of the rounded values in a fixed order (per lane ascending key, then the
// quad butterfly, xor 1 then xor 2) and the corrections of the old sums and outputs.
template <int NT_S>
__device__ __forceinline__ void softmax_block(float (&s)[NT_S * 4], int b, int lane, int pos_a, int pos_b, int min_pos,
                                              float c, float& m_a, float& m_b, float& l_a, float& l_b,
                                              uint32_t (&pa)[NT_S], uint32_t (&pb)[NT_S], float& corr_a,
                                              float& corr_b) {
  const int kbase = b * kKvBlock + 2 * (lane & 3);
  float mx_a = -INFINITY, mx_b = -INFINITY;
  if (b * kKvBlock + kKvBlock - 1 > min_pos) {
#pragma unroll
    for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int kp = kbase + nt * 8 + e;
        if (kp > pos_a) s[4 * nt + e] = -INFINITY;
        if (kp > pos_b) s[4 * nt + 2 + e] = -INFINITY;
      }
  }
#pragma unroll
  for (int nt = 0; nt < NT_S; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      mx_a = fmaxf(mx_a, s[4 * nt + e]);
      mx_b = fmaxf(mx_b, s[4 * nt + 2 + e]);
    }
  mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
  mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
  mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
  mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
  const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
  // A row with no key yet keeps max -inf (its scores are all -inf: mc 0 gives p = 0).
  const float mc_a = mn_a == -INFINITY ? 0.0f : mn_a * c, mc_b = mn_b == -INFINITY ? 0.0f : mn_b * c;
  // m c - mn c is exactly 0 when the max did not move (a block after the row's position
  // leaves its state unchanged), so the correction is exactly 1 there.
  corr_a = mn_a == -INFINITY ? 1.0f : exp2_sfu(m_a * c - mc_a);
  corr_b = mn_b == -INFINITY ? 1.0f : exp2_sfu(m_b * c - mc_b);
  // A masked score gives 2^-inf = 0.
  float sum_a = 0.0f, sum_b = 0.0f;
#pragma unroll
  for (int nt = 0; nt < NT_S; ++nt) {
    pa[nt] = pack_bf16(exp2_sfu(__fmaf_rn(s[4 * nt], c, -mc_a)), exp2_sfu(__fmaf_rn(s[4 * nt + 1], c, -mc_a)));
    pb[nt] = pack_bf16(exp2_sfu(__fmaf_rn(s[4 * nt + 2], c, -mc_b)), exp2_sfu(__fmaf_rn(s[4 * nt + 3], c, -mc_b)));
    sum_a += low_f32(pa[nt]);
    sum_a += high_f32(pa[nt]);
    sum_b += low_f32(pb[nt]);
    sum_b += high_f32(pb[nt]);
  }
  sum_a += __shfl_xor_sync(0xffffffffu, sum_a, 1);
  sum_a += __shfl_xor_sync(0xffffffffu, sum_a, 2);
  sum_b += __shfl_xor_sync(0xffffffffu, sum_b, 1);
  sum_b += __shfl_xor_sync(0xffffffffu, sum_b, 2);
  l_a = l_a * corr_a + sum_a;
  l_b = l_b * corr_b + sum_b;
  m_a = mn_a;
  m_b = mn_b;
}

// The final O / l of a lane's two rows, stored as bf16 pairs (o in the accumulator layout).
template <int NT_O>
__device__ __forceinline__ void store_rows(const float (&o)[NT_O * 4], bf16* oa, bf16* ob, float l_a, float l_b,
                                           int lane) {
  const int col = 2 * (lane & 3);
  if (oa)
#pragma unroll
    for (int i = 0; i < NT_O; ++i)
      *reinterpret_cast<__nv_bfloat162*>(oa + i * 8 + col) = __floats2bfloat162_rn(o[4 * i] / l_a, o[4 * i + 1] / l_a);
  if (ob)
#pragma unroll
    for (int i = 0; i < NT_O; ++i)
      *reinterpret_cast<__nv_bfloat162*>(ob + i * 8 + col) =
          __floats2bfloat162_rn(o[4 * i + 2] / l_b, o[4 * i + 3] / l_b);
}

template <int D, bool WGMMA>
constexpr size_t attention_smem_bytes() {
  return WGMMA ? size_t(4) * kKvBlock * D * sizeof(bf16) + 1024  // + the alignment
               : size_t(4) * kKvBlock * (D + 8) * sizeof(bf16);
}

// What a query tile's KV reads need from the step's slots (the same for every layer): its
// tokens, its sequence's page table, its last position, and (first_blocks > 0) the first slot
// of KV blocks 0 .. first_blocks - 1 (pages of a multiple of 64 positions), so that a kernel
// running many layers reads the slots and the page table once.
constexpr int kGeometryBlocks = 64;
struct KvTileGeometry {
  const int32_t* table;
  const int32_t* first_slot;  // kGeometryBlocks entries (shared memory), or null
  int t0, ntok, max_pos, first_blocks;
};
// The tile's geometry without the first slots (thread-local).
__device__ __forceinline__ KvTileGeometry tile_geometry(const DeviceSlots& slots, int tile) {
  KvTileGeometry g;
  g.t0 = slots.tiles[2 * tile];
  g.ntok = slots.tiles[2 * tile + 1];
  g.table = slots.page_tables + int64_t(slots.seq_of_token[g.t0]) * *slots.table_stride;
  g.max_pos = 0;
  for (int i = 0; i < g.ntok; ++i) g.max_pos = max(g.max_pos, slots.positions[g.t0 + i]);
  g.first_blocks = 0;
  g.first_slot = nullptr;
  return g;
}
// The first slots of geometry g (in shared memory) into `first` (kGeometryBlocks ints of shared
// memory), by `threads` threads of the block (then their barrier): pages of a multiple of 64
// positions only.
__device__ __forceinline__ void fill_first_slots(KvTileGeometry& g, int32_t* first, int page, int threads) {
  const int n = page % kKvBlock == 0 ? min(kGeometryBlocks, g.max_pos / kKvBlock + 1) : 0;
  for (int b = int(threadIdx.x); b < n; b += threads) {
    const int b0 = b * kKvBlock, pg = b0 / page;
    first[b] = g.table[pg] * page + (b0 - pg * page);
  }
  if (threadIdx.x == 0) g.first_blocks = n, g.first_slot = first;
}

// A thread's share of the K/V block loads of a query tile into the two shared stages.
// A thread loads piece `piece` of rows row0 + i kRowsPerPass of each KV block. The address
// arithmetic is 32-bit per row (slots < 2^31), shifts where the page size is a power of two,
// and branch-free: a row past max_pos takes max_pos's address and reads nothing (ncu: the
// per-row divisions and 64-bit products were the kernel's largest instruction class).
template <int D, bool WGMMA>
struct KvBlockLoader {
  static constexpr int LD = D + 8;  // padded shared row: 8 consecutive rows hit 8 different bank groups
  static constexpr int PIECES = D / 8;
  static constexpr uint32_t BLOCK_BYTES = WGMMA ? kKvBlock * D * 2 : kKvBlock * LD * 2;  // one K or V block
  static_assert(kThreads % PIECES == 0, "a thread's piece must be the same in every row");
  static constexpr int kRowsPerPass = kThreads / PIECES;
  // This thread's piece of row j: padded rows, or the swizzle (piece ^ (j % 8) in its atom;
  // j % 8 is row0 % 8 in every pass).
  static_assert(kRowsPerPass % 8 == 0, "a thread's swizzle must be the same in every row");

  const bf16 *k, *v;
  const int32_t *table, *first_slot;
  int first_blocks;
  uint32_t kv_smem, piece_at;
  int page, page_shift, slot_stride, head_offset, row0, max_pos;
  bool page_pow2, block_in_page;

  // The tile of `geometry` of kv head kvh; K/V stages in smem_raw (attention_smem_bytes<D, WGMMA>()).
  __device__ __forceinline__ KvBlockLoader(const DeviceKvLayer& kv, const KvTileGeometry& geometry, int kvh,
                                           unsigned char* smem_raw) {
    // Stage st: K at kv_smem + 2 st BLOCK_BYTES, V after it (1024-byte aligned for the swizzle).
    kv_smem = WGMMA ? (smem_addr(smem_raw) + 1023) & ~1023u : smem_addr(smem_raw);
    table = geometry.table;
    max_pos = geometry.max_pos;
    first_slot = geometry.first_slot;
    first_blocks = geometry.first_blocks;
    k = kv.k;
    v = kv.v;
    page = int(kv.page_size);
    const int tid = int(threadIdx.x), piece = tid % PIECES;
    row0 = tid / PIECES;
    page_pow2 = (page & (page - 1)) == 0;
    page_shift = __ffs(page) - 1;
    slot_stride = int(kv.kv_heads) * D;
    head_offset = kvh * D + piece * 8;
    piece_at = WGMMA ? (piece / 8) * (kKvBlock * 128) + (((piece % 8) ^ (row0 % 8)) << 4) : uint32_t(piece) * 16;
    // Pages of a multiple of 64 positions hold each KV block whole: one page-table read per
    // block, the rows' slots consecutive.
    block_in_page = page % kKvBlock == 0;
  }

  // The block of positions b0 .. b0 + 63 into stage `stage` (cp.async; the caller commits).
  __device__ __forceinline__ void load(int stage, int b0) const {
    constexpr uint32_t row_bytes = WGMMA ? 128 : LD * 2;
    const uint32_t k_s = kv_smem + 2 * stage * BLOCK_BYTES + piece_at, v_s = k_s + BLOCK_BYTES;
    int first = 0;
    if (block_in_page) {
      const int pg = page_pow2 ? b0 >> page_shift : b0 / page, b = b0 / kKvBlock;
      first = b < first_blocks ? first_slot[b] : table[pg] * page + (b0 - pg * page);
    }
#pragma unroll
    for (int i = 0; i < kKvBlock / kRowsPerPass; ++i) {
      const int j = row0 + i * kRowsPerPass, p = b0 + j;
      const bool valid = p <= max_pos;  // later positions are zero-filled and masked
      const int at = valid ? p : max_pos;
      int slot;
      if (block_in_page) {
        slot = first + (at - b0);
      } else {
        const int pg = page_pow2 ? at >> page_shift : at / page;
        slot = table[pg] * page + (at - pg * page);
      }
      const int64_t off = int64_t(slot) * slot_stride + head_offset;
      cp_async16(k_s + j * row_bytes, k + off, valid);
      cp_async16(v_s + j * row_bytes, v + off, valid);
    }
  }
};

// Issues the loads of KV blocks 0 .. n - 1 (n <= 2, one cp.async group each) of a query tile
// ahead of attention_tile(..., prefetched = n), by the same threads: blocks wholly before the
// tile's new KV rows (those are written after this), so their reads can start earlier.
template <int D, bool WGMMA>
__device__ __forceinline__ void attention_prefetch(const DeviceKvLayer& kv, const KvTileGeometry& geometry, int kvh,
                                                   unsigned char* smem_raw, int n) {
  const KvBlockLoader<D, WGMMA> loader(kv, geometry, kvh, smem_raw);
  for (int b = 0; b < n; ++b) {
    loader.load(b, b * kKvBlock);
    cp_async_commit();
  }
}

// WGMMA: S = q K^T and O += P V as warpgroup MMAs (q and P from registers, K and V from
// shared memory in the 128-byte swizzle: D / 64 atoms of 64 rows x 128 bytes per block),
// head_dim 64 or 128; every warp runs every step (a warp without rows computes and discards).
// Otherwise mma.sync from padded shared rows. One k16 step of either rounds alike, in the same
// order per element, so the two give the same bits (tests: CudaAttention.WgmmaEqualsMmaSync*).
// Query tile `tile` of kv head `kvh` by threads 0 .. kThreads - 1 of the calling block (sync:
// their barrier), K/V staged in smem_raw (attention_smem_bytes<D, WGMMA>() bytes).
// SPLIT_D (mma.sync, tiles of at most 16 rows): every warp takes the tile's rows, computes the
// same scores and softmax, and a quarter of the output columns (an output element's steps are
// unchanged); a quarter of the accumulators per thread, for kernels short of registers.
// `geometry`: the tile's (tile_geometry); `prefetched`: blocks attention_prefetch issued already.
// `lse` (or null): each row's log-sum-exp of its scaled scores, m scale + ln(l) of the online
// softmax (l the sum of its bf16-rounded P), at [token, head] (the backward's normaliser).
template <int D, bool WGMMA, typename Sync, bool SPLIT_D = false>
__device__ __forceinline__ void attention_tile(const bf16* q, bf16* out, const DeviceKvLayer& kv,
                                               const DeviceSlots& slots, const KvTileGeometry& geometry, int nq, int G,
                                               float scale, int kvh, unsigned char* smem_raw, Sync sync,
                                               int prefetched = 0, float* lse = nullptr) {
  using Loader = KvBlockLoader<D, WGMMA>;
  constexpr int LD = Loader::LD;
  constexpr int KSTEPS = D / 16, NT_S = kKvBlock / 8;
  static_assert(!SPLIT_D || (!WGMMA && D % 64 == 0), "the split output takes mma.sync and head_dim 64 or 128");
  constexpr int NT_O = SPLIT_D ? D / 32 : D / 8;  // this warp's output n8 tiles
  constexpr uint32_t BLOCK_BYTES = Loader::BLOCK_BYTES;
  static_assert(!WGMMA || D == 64 || D == 128, "the wgmma attention takes head_dim 64 or 128");
  const Loader loader(kv, geometry, kvh, smem_raw);
  const uint32_t kv_smem = loader.kv_smem;
  const int t0 = geometry.t0, ntok = geometry.ntok, max_pos = geometry.max_pos;
  const int rows = ntok * G;

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int row_warp = SPLIT_D ? 0 : warp, d0 = SPLIT_D ? warp * (D / 4) : 0;  // rows, first column
  const bool active = WGMMA || row_warp * 16 < rows;
  // This lane's two rows (mma accumulator rows lane / 4 and lane / 4 + 8 of the warp's 16).
  const int ra = row_warp * 16 + (lane >> 2), rb = ra + 8;
  const int pos_a = ra < rows ? slots.positions[t0 + ra / G] : -1;
  const int pos_b = rb < rows ? slots.positions[t0 + rb / G] : -1;
  // Blocks that end at or before every present row's position of this warp need no mask (the
  // mask would change nothing there); a warp-uniform test.
  int min_pos = min(pos_a >= 0 ? pos_a : INT_MAX, pos_b >= 0 ? pos_b : INT_MAX);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) min_pos = min(min_pos, __shfl_xor_sync(0xffffffffu, min_pos, o));
  // Scores stay unscaled; exp(scale (s - m)) = 2^(s c - m c) with c = scale log2(e).
  const float c = scale * 1.44269504088896341f;
  const bf16* qa = q + (int64_t(t0 + ra / G) * nq + kvh * G + ra % G) * D;
  const bf16* qb = q + (int64_t(t0 + rb / G) * nq + kvh * G + rb % G) * D;

  uint32_t qf[KSTEPS][4];
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    const int c = ks * 16 + 2 * (lane & 3);
    qf[ks][0] = pos_a >= 0 ? load_bf16_pair(qa + c) : 0u;
    qf[ks][1] = pos_b >= 0 ? load_bf16_pair(qb + c) : 0u;
    qf[ks][2] = pos_a >= 0 ? load_bf16_pair(qa + c + 8) : 0u;
    qf[ks][3] = pos_b >= 0 ? load_bf16_pair(qb + c + 8) : 0u;
  }

  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
  float o[NT_O * 4];
#pragma unroll
  for (int i = 0; i < NT_O * 4; ++i) o[i] = 0.0f;

  const int nblocks = max_pos / kKvBlock + 1;
  if (prefetched == 0) {
    loader.load(0, 0);
    cp_async_commit();
  }
  for (int b = 0; b < nblocks; ++b) {
    if (b + 1 < nblocks && b + 1 >= prefetched) loader.load((b + 1) & 1, (b + 1) * kKvBlock);
    cp_async_commit();
    cp_async_wait<1>();
    if constexpr (WGMMA) fence_proxy_async();  // this thread's copies, visible to the tensor cores
    sync();
    if (active) {
      const uint32_t k_s = kv_smem + 2 * (b & 1) * BLOCK_BYTES, v_s = k_s + BLOCK_BYTES;
      float s[NT_S * 4];
#pragma unroll
      for (int i = 0; i < NT_S * 4; ++i) s[i] = 0.0f;
      if constexpr (WGMMA) {
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)  // + 32 bytes per k16 step inside an atom's rows
          wgmma_m64n64k16_rs<0>(s, qf[ks], smem_desc(k_s + (ks / 4) * (kKvBlock * 128)) + 2 * (ks % 4));
        wgmma_commit();
        wgmma_wait<0>();
        pin_registers(s);
      } else {
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
          for (int nj = 0; nj < NT_S / 2; ++nj) {
            uint32_t r[4];
            const int key = nj * 16 + (lane & 7) + ((lane >> 4) << 3);
            ldmatrix_x4(r, k_s + (key * LD + ks * 16 + ((lane >> 3) & 1) * 8) * 2);
            mma_bf16(*reinterpret_cast<float(*)[4]>(s + 8 * nj), qf[ks], r[0], r[1]);
            mma_bf16(*reinterpret_cast<float(*)[4]>(s + 8 * nj + 4), qf[ks], r[2], r[3]);
          }
      }
      uint32_t pa[NT_S], pb[NT_S];
      float corr_a, corr_b;
      softmax_block<NT_S>(s, b, lane, pos_a, pos_b, min_pos, c, m_a, m_b, l_a, l_b, pa, pb, corr_a, corr_b);
#pragma unroll
      for (int i = 0; i < NT_O; ++i) {
        o[4 * i] *= corr_a;
        o[4 * i + 1] *= corr_a;
        o[4 * i + 2] *= corr_b;
        o[4 * i + 3] *= corr_b;
      }
      // O += P V: P from the score accumulators (the C layout of two n-tiles is the A
      // layout of one k16 step); V as stored ([key][d]): MN-major for wgmma (16 keys = 2048
      // bytes per k16 step, the next 64 d one atom on), transposing loads for mma.sync.
      if constexpr (WGMMA) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKvBlock / 16; ++kk) {
          const uint32_t a[4] = {pa[2 * kk], pb[2 * kk], pa[2 * kk + 1], pb[2 * kk + 1]};
          const uint64_t dv = smem_desc_mn(v_s + kk * 2048, kKvBlock * 128);
          if constexpr (D == 128)
            wgmma_m64n128k16_rs<1>(o, a, dv);
          else
            wgmma_m64n64k16_rs<1>(o, a, dv);
        }
        wgmma_commit();
        wgmma_wait<0>();
        pin_registers(o);
      } else {
#pragma unroll
        for (int kk = 0; kk < kKvBlock / 16; ++kk) {
          const uint32_t a[4] = {pa[2 * kk], pb[2 * kk], pa[2 * kk + 1], pb[2 * kk + 1]};
#pragma unroll
          for (int dn = 0; dn < NT_O / 2; ++dn) {
            uint32_t r[4];
            const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            ldmatrix_x4_trans(r, v_s + (key * LD + d0 + dn * 16 + (lane >> 4) * 8) * 2);
            mma_bf16(*reinterpret_cast<float(*)[4]>(o + 8 * dn), a, r[0], r[1]);
            mma_bf16(*reinterpret_cast<float(*)[4]>(o + 8 * dn + 4), a, r[2], r[3]);
          }
        }
      }
    }
    sync();  // this stage is refilled two iterations on
  }
  cp_async_wait<0>();

  if (!active) return;
  if (lse != nullptr && d0 == 0 && (lane & 3) == 0) {
    if (pos_a >= 0) lse[int64_t(t0 + ra / G) * nq + kvh * G + ra % G] = m_a * scale + logf(l_a);
    if (pos_b >= 0) lse[int64_t(t0 + rb / G) * nq + kvh * G + rb % G] = m_b * scale + logf(l_b);
  }
  store_rows<NT_O>(o, pos_a >= 0 ? out + (int64_t(t0 + ra / G) * nq + kvh * G + ra % G) * D + d0 : nullptr,
                   pos_b >= 0 ? out + (int64_t(t0 + rb / G) * nq + kvh * G + rb % G) * D + d0 : nullptr, l_a, l_b,
                   lane);
}

}  // namespace attention_detail
}  // namespace lockstep::cuda
