// The attention backward on warpgroup MMA (head_dim 64 and 128): attention_backward_tc.cu's
// two kernels, procedure and blocks, each mma.sync k16 step now a wgmma k16 step. One k16
// step of either rounds alike, in the same order per element (as the forward's two kernels,
// CudaAttention.WgmmaEqualsMmaSync*), so the gradients keep their bits (tested against the
// mma.sync kernels with memcmp).
//
// Why: the mma.sync kernels' four warps each read whole operand tiles through ldmatrix (a warp
// of 16 rows loads all 64 keys of K per k16 step), so shared memory bandwidth bounded them (ncu:
// 32-43% of compute). A warpgroup MMA reads a shared operand once for its 64 rows.
//
// Tiles: 64 rows x D bf16 in the 128-byte swizzle (D / 64 atoms of 64 rows x 128 bytes,
// 1024-byte aligned, as the forward's K/V): one tile serves as the K-major operand (rows are M
// or N, k runs along the row) and as the MN-major one (rows are k).
//   dq kernel: q and dout rows as register A fragments (the mma.sync kernel's), S = q K^T and
//   dP = dout V^T by m64n64k16 (K, V K-major), dq += dS K by m64nDk16 with dS from the
//   accumulators and K MN-major.
//   dkv kernel: S^T = K q^T and dP^T = V dout^T by m64n64k16 with both operands in shared
//   memory, a step's 64 queries at once (the mma.sync kernel took 32 at a time: the same
//   elements), dv += P^T dout and dk += dS^T q with P^T, dS^T from the accumulators and dout,
//   q MN-major.
//   With a dS scratch (the forward's lse given): the dkv kernel runs first and stores each
//   step's bf16 dS^T tile as the dq kernel's A operand would be rounded; the dq kernel then
//   makes dq += dS K from those tiles (dS MN-major, K MN-major), keys ascending as before:
//   one MMA a block instead of recomputing S and dP (two more), the same bits.
#include "kernels/cuda/attention_backward_tc.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/row_ops.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda::attention_backward_detail {

namespace {

constexpr int kThreads = 128;  // one warpgroup, 16 rows a warp

template <int D>
struct SwizzledTile {
  static constexpr uint32_t kBytes = kTile * D * 2;
  static constexpr uint32_t kAtomBytes = kTile * 128;  // 64 rows x 64 columns
  // Byte offset of the 16-byte piece `piece` (columns 8 piece ..) of row `row`.
  static __device__ __forceinline__ uint32_t offset(int row, int piece) {
    return uint32_t(piece / 8) * kAtomBytes + uint32_t(row) * 128 + (uint32_t((piece % 8) ^ (row % 8)) << 4);
  }
  // Descriptors of k16 step kk: K-major (columns 16 kk ..; + 32 bytes a step inside an atom)
  // and MN-major (rows 16 kk ..: 2048 bytes a step, the next 64 columns one atom on).
  static __device__ __forceinline__ uint64_t k_major(uint32_t tile, int kk) {
    return smem_desc(tile + (kk / 4) * kAtomBytes) + 2 * (kk % 4);
  }
  static __device__ __forceinline__ uint64_t mn_major(uint32_t tile, int kk) {
    return smem_desc_mn(tile + kk * 2048, kAtomBytes);
  }
};

// A thread's share of a 64-row tile: its 16-byte piece of rows row0 + i kRowsPerPass.
template <int D>
struct TileRows {
  static constexpr int kPieces = D / 8, kRowsPerPass = kThreads / kPieces, kPasses = kTile / kRowsPerPass;
  static __device__ __forceinline__ int piece() { return int(threadIdx.x) % kPieces; }
  static __device__ __forceinline__ int row(int i) { return int(threadIdx.x) / kPieces + i * kRowsPerPass; }
};

// The loaders read every row's address first and then issue the copies: a cp.async is ordered
// with the loads around it (its memory clobber), so an address read between two copies stalls
// the thread for the read's whole latency (the kernels' first form lost most of its time there).

// Rows p0 .. p0 + 63 of K and (v_tile != 0) V of KV head g from the cache through the
// sequence's page table into swizzled tiles, zeros past the sequence's len.
template <int D>
__device__ __forceinline__ void load_kv_rows(uint32_t k_tile, uint32_t v_tile, const DeviceKvLayer& kv,
                                             const int32_t* table, int p0, int len, int g) {
  using Rows = TileRows<D>;
  const int page = int(kv.page_size), piece = Rows::piece();
  int slot[Rows::kPasses];
#pragma unroll
  for (int i = 0; i < Rows::kPasses; ++i) {
    const int pos = min(p0 + Rows::row(i), len - 1), pg = pos / page;
    slot[i] = table[pg] * page + (pos - pg * page);
  }
#pragma unroll
  for (int i = 0; i < Rows::kPasses; ++i) {
    const int r = Rows::row(i);
    const bool valid = p0 + r < len;
    const int64_t at = (int64_t(slot[i]) * kv.kv_heads + g) * D + piece * 8;
    const uint32_t to = SwizzledTile<D>::offset(r, piece);
    cp_async16(k_tile + to, kv.k + at, valid);
    if (v_tile != 0) cp_async16(v_tile + to, kv.v + at, valid);
  }
}

// acc (+)= A B for the 64 rows and D columns of one k16 step, A in registers, B MN-major.
template <int D>
__device__ __forceinline__ void rows_times_cols(float (&acc)[D / 2], const uint32_t (&a)[4], uint64_t b) {
  if constexpr (D == 128)
    wgmma_m64n128k16_rs<1>(acc, a, b);
  else
    wgmma_m64n64k16_rs<1>(acc, a, b);
}

// acc (+)= X B over the 64 columns of x (four k16 steps, ascending), x an accumulator tile
// rounded to bf16 A fragments, B MN-major.
template <int D>
__device__ __forceinline__ void accumulators_times_cols(float (&acc)[D / 2], const float (&x)[32], uint32_t b_tile) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t a[4];
    accumulator_fragment(x, j, a);
    rows_times_cols<D>(acc, a, SwizzledTile<D>::mn_major(b_tile, j));
  }
}

// The dS tiles (AttentionDsScratch): the tile of (sequence, head, query tile qt, key tile kt <=
// qt) at index ((seq heads + head) tiles_per_seq (tiles_per_seq + 1) / 2 + qt (qt + 1) / 2 + kt),
// kDsTileElems each, so a query tile's key tiles lie one after another. Each holds dS^T (rows
// the 64 keys, columns the 64 queries) in SwizzledTile<kTile>'s layout: the dq kernel copies it
// as it lies and reads it as an MN-major A operand.
constexpr int64_t kDsTileElems = int64_t(kTile) * kTile;
using DsTile = SwizzledTile<kTile>;
__device__ __forceinline__ int64_t ds_tile_index(int seq, int64_t head, int64_t heads, int tiles_per_seq, int qt,
                                                 int kt) {
  return (int64_t(seq) * heads + head) * (int64_t(tiles_per_seq) * (tiles_per_seq + 1) / 2) +
         int64_t(qt) * (qt + 1) / 2 + kt;
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_dq_wgmma_kernel(const bf16* q, const bf16* dout, DeviceKvLayer kv, DeviceSlots slots,
                              const int32_t* seq_first, const int32_t* seq_tokens, int num_seqs, int tiles_per_seq,
                              int64_t heads, float scale, const float* delta, float* lse, bool lse_given, float* dq) {
  using Tile = SwizzledTile<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // K of block b in buffer b % 2, its V after it.
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  auto k_at = [&](int b) { return base + uint32_t(b % 2) * 2 * Tile::kBytes; };
  const DqBlock block = dq_block(int(blockIdx.x), num_seqs, tiles_per_seq, heads, kv.kv_heads, seq_first, seq_tokens);
  if (block.p0 >= block.len) return;
  const int32_t* toks = block.toks;
  const int len = block.len, p0 = block.p0, pos_a = block.pos_a, pos_b = block.pos_b;
  const int64_t g = block.kv_head, item_a = block.item_a, item_b = block.item_b;
  const bool in_a = block.in_a, in_b = block.in_b;
  const int lane = threadIdx.x % 32, quad = 2 * (lane % 4);
  // The sequence's page table (any of its tokens names the sequence).
  const int32_t* table = slots.page_tables + int64_t(slots.seq_of_token[toks[0]]) * *slots.table_stride;
  const int last_block = p0 / kTile;  // the diagonal block: no key after it is visible
  auto load_block = [&](int b, bool with_v) {
    if (b <= last_block)
      load_kv_rows<D>(k_at(b), with_v ? k_at(b) + Tile::kBytes : 0u, kv, table, b * kTile, len, int(g));
    cp_async_commit();
  };
  if (!lse_given) load_block(0, false);  // pass 1's first block

  uint32_t qa[D / 16][4], da[D / 16][4];
  load_row_fragments<D>(q, dout, item_a, item_b, in_a, in_b, quad, qa, da);
  const float delta_a = in_a ? delta[item_a] : 0.0f, delta_b = in_b ? delta[item_b] : 0.0f;

  // S (s[4 nt + e]: n8 tile nt, e < 2 row a) of block b, issued (the caller commits).
  float s[32];
  auto issue_scores = [&](int b) {
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = 0.0f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16_rs<0>(s, qa[kk], Tile::k_major(k_at(b), kk));
  };
  // Pass 1 where the forward's log-sum-exp is not given: each row's, left for the dkv kernel.
  float lse_a, lse_b;
  if (lse_given) {
    forward_lse(lse, block, lse_a, lse_b);
  } else {
    RowLogSumExp lse_rows;
    for (int b = 0; b <= last_block; ++b) {
      load_block(b + 1, false);  // into the buffer block b - 1 used
      cp_async_wait<1>();        // block b's pieces, this thread's
      fence_proxy_async();       // visible to the tensor cores
      __syncthreads();           // everyone's
      issue_scores(b);
      wgmma_commit();
      wgmma_wait<0>();
      pin_registers(s);
      __syncthreads();  // block b's buffer is free for block b + 2
      mask_block_scores(s, b, quad, pos_a, pos_b, scale);
      lse_rows.add_block(s);
    }
    keep_lse(lse_rows, block, lse, lse_a, lse_b);
  }

  // Pass 2: dq over the blocks, keys ascending.
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.0f;
  cp_async_wait<0>();
  __syncthreads();  // pass 1 is done with both buffers
  load_block(0, true);
  for (int b = 0; b <= last_block; ++b) {
    load_block(b + 1, true);
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    const uint32_t k_s = k_at(b), v_s = k_s + Tile::kBytes;
    float dp[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) dp[i] = 0.0f;
    issue_scores(b);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16_rs<0>(dp, da[kk], Tile::k_major(v_s, kk));
    wgmma_commit();
    wgmma_wait<0>();
    pin_registers(s);
    pin_registers(dp);
    mask_block_scores(s, b, quad, pos_a, pos_b, scale);
    scores_to_ds(s, dp, lse_a, lse_b, delta_a, delta_b, scale);
    // dq += dS K: k16 steps of keys.
    wgmma_fence();
    accumulators_times_cols<D>(acc, s, k_s);
    wgmma_commit();
    wgmma_wait<0>();
    pin_registers(acc);
    __syncthreads();  // block b's buffers are free for block b + 2
  }
  store_row_pairs<D>(dq, item_a, item_b, in_a, in_b, quad, acc);
}

// dq += dS K for k16 steps of keys, dS (from the dkv kernel's tiles) and K MN-major.
template <int D>
__device__ __forceinline__ void ds_times_keys(float (&acc)[D / 2], uint64_t ds, uint64_t k) {
  if constexpr (D == 128)
    wgmma_m64n128k16<1, 1>(acc, ds, k, 1);
  else
    wgmma_m64n64k16<1, 1>(acc, ds, k, 1);
}

// dq from the dS tiles the dkv kernel kept: the dq kernel's blocks, its pass 2 with dS read
// instead of made (K and the block's dS tile double-buffered).
template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_dq_from_ds_kernel(DeviceKvLayer kv, DeviceSlots slots, const int32_t* seq_first,
                                const int32_t* seq_tokens, int num_seqs, int tiles_per_seq, int64_t heads,
                                const bf16* ds, float* dq) {
  using Tile = SwizzledTile<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // K of block b in buffer b % 2, its dS tile after it.
  const uint32_t base = (smem_addr(smem_raw) + 1023) & ~1023u;
  auto k_at = [&](int b) { return base + uint32_t(b % 2) * (Tile::kBytes + DsTile::kBytes); };
  const DqBlock block = dq_block(int(blockIdx.x), num_seqs, tiles_per_seq, heads, kv.kv_heads, seq_first, seq_tokens);
  if (block.p0 >= block.len) return;
  const int quad = 2 * (threadIdx.x % 32 % 4), last_block = block.p0 / kTile;
  const int32_t* table = slots.page_tables + int64_t(slots.seq_of_token[block.toks[0]]) * *slots.table_stride;
  const bf16* tiles = ds + ds_tile_index(block.seq, block.head, heads, tiles_per_seq, last_block, 0) * kDsTileElems;
  auto load_block = [&](int b) {
    if (b <= last_block) {
      load_kv_rows<D>(k_at(b), 0u, kv, table, b * kTile, block.len, int(block.kv_head));
      const bf16* from = tiles + int64_t(b) * kDsTileElems;
      const uint32_t to = k_at(b) + Tile::kBytes;
#pragma unroll
      for (uint32_t i = threadIdx.x; i < DsTile::kBytes / 16; i += kThreads)
        cp_async16(to + 16 * i, from + 8 * i, true);
    }
    cp_async_commit();
  };
  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.0f;
  load_block(0);
  for (int b = 0; b <= last_block; ++b) {
    load_block(b + 1);  // into the buffer block b - 1 used
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    const uint32_t k_s = k_at(b), ds_s = k_s + Tile::kBytes;
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; ++j) ds_times_keys<D>(acc, DsTile::mn_major(ds_s, j), Tile::mn_major(k_s, j));
    wgmma_commit();
    wgmma_wait<0>();
    pin_registers(acc);
    __syncthreads();  // block b's buffers are free for block b + 2
  }
  store_row_pairs<D>(dq, block.item_a, block.item_b, block.in_a, block.in_b, quad, acc);
}

// Shared memory of the dkv kernel: K, V, then q and dout of two steps (swizzled tiles), then
// lse and delta of two steps.
template <int D>
constexpr size_t dkv_smem_bytes() {
  return 1024 + 6 * size_t(SwizzledTile<D>::kBytes) + 4 * kTile * sizeof(float);
}

template <int D, bool kKeepDs, bool kOverlap>
__global__ void __launch_bounds__(kThreads)
    attention_dkv_wgmma_kernel(const bf16* q, const bf16* dout, DeviceKvLayer kv, DeviceSlots slots,
                               const int32_t* seq_first, const int32_t* seq_tokens, int num_seqs, int tiles_per_seq,
                               int64_t heads, float scale, const float* lse, const float* delta, float* dk, float* dv,
                               bf16* ds) {
  using Tile = SwizzledTile<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t pad = ((smem_addr(smem_raw) + 1023) & ~1023u) - smem_addr(smem_raw);
  const uint32_t k_s = smem_addr(smem_raw) + pad, v_s = k_s + Tile::kBytes;
  auto q_at = [&](int buf) { return k_s + uint32_t(2 + buf) * Tile::kBytes; };
  auto dout_at = [&](int buf) { return k_s + uint32_t(4 + buf) * Tile::kBytes; };
  float* lse_sh = reinterpret_cast<float*>(smem_raw + pad + 6 * Tile::kBytes);  // [2][kTile]
  float* delta_sh = lse_sh + 2 * kTile;                                         // [2][kTile]

  const int64_t nkv = kv.kv_heads, group = heads / nkv;
  const DkvBlock block = dkv_block(int(blockIdx.x), num_seqs, tiles_per_seq, nkv, seq_first);
  if (block.tile < 0) return;
  const int seq = block.seq, g = block.kv_head, k0 = block.tile * kTile;
  const int32_t* toks = seq_tokens + seq_first[seq];
  const int len = seq_first[seq + 1] - seq_first[seq];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = 2 * (lane % 4);
  const int kpos_a = k0 + 16 * warp + lane / 4, kpos_b = kpos_a + 8;
  const int32_t* table = slots.page_tables + int64_t(slots.seq_of_token[toks[0]]) * *slots.table_stride;
  load_kv_rows<D>(k_s, v_s, kv, table, k0, len, g);
  // Step n of the walk: query tile p0 = k0 + (n / group) 64, head g group + n % group: its q and
  // dout rows, and (threads 0 .. 63, a row each) lse and delta, in one cp.async group (an empty
  // one past the end); the rows' tokens read first.
  const int steps = (len - k0 + kTile - 1) / kTile * int(group);
  using Rows = TileRows<D>;
  static_assert(kTile <= kThreads, "a thread a row of lse and delta");
  auto load_step = [&](int n) {
    if (n < steps) {
      const int p0 = k0 + (n / int(group)) * kTile, buf = n % 2, piece = Rows::piece(), r = int(threadIdx.x);
      const int64_t h = g * group + n % group;
      int tok[Rows::kPasses];
#pragma unroll
      for (int i = 0; i < Rows::kPasses; ++i) tok[i] = toks[min(p0 + Rows::row(i), len - 1)];
      const int tok_r = toks[min(p0 + r % kTile, len - 1)];
#pragma unroll
      for (int i = 0; i < Rows::kPasses; ++i) {
        const bool valid = p0 + Rows::row(i) < len;
        const int64_t at = (int64_t(tok[i]) * heads + h) * D + piece * 8;
        const uint32_t to = SwizzledTile<D>::offset(Rows::row(i), piece);
        cp_async16(q_at(buf) + to, q + at, valid);
        cp_async16(dout_at(buf) + to, dout + at, valid);
      }
      if (r < kTile) {
        const bool in = p0 + r < len;
        const int64_t item = int64_t(tok_r) * heads + h;
        cp_async4(smem_addr(lse_sh + buf * kTile + r), lse + item, in);
        cp_async4(smem_addr(delta_sh + buf * kTile + r), delta + item, in);
      }
    }
    cp_async_commit();
  };
  load_step(0);  // with K and V: the first group

  float acc_k[D / 2], acc_v[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_k[i] = acc_v[i] = 0.0f;

  // Query tiles ascending, the group's heads ascending within each.
  for (int n = 0; n < steps; ++n) {
    load_step(n + 1);  // into the buffers step n - 1 used
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();
    const int p0 = k0 + (n / int(group)) * kTile, buf = n % 2;
    const uint32_t q_s = q_at(buf), dout_s = dout_at(buf);
    const float *lse_t = lse_sh + buf * kTile, *delta_t = delta_sh + buf * kTile;
    // S^T = K q^T and dP^T = V dout^T: rows keys, columns the step's 64 queries.
    float s[32], dp[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) s[i] = dp[i] = 0.0f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16(s, Tile::k_major(k_s, kk), Tile::k_major(q_s, kk), 1);
    if constexpr (kOverlap) wgmma_commit();  // S in a group of its own
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_m64n64k16(dp, Tile::k_major(v_s, kk), Tile::k_major(dout_s, kk), 1);
    wgmma_commit();
    // The step's dS^T tile for the dq kernel (kKeepDs), stored as its fragments are made: rows
    // a and b (keys kpos_a, kpos_b), columns of n8 tiles 2j (pairs 0, 1) and 2j + 1 (2, 3).
    char* ds_tile = nullptr;
    if constexpr (kKeepDs)
      ds_tile = reinterpret_cast<char*>(
          ds + ds_tile_index(seq, g * group + n % group, heads, tiles_per_seq, p0 / kTile, block.tile) * kDsTileElems);
    const auto keep_ds = [&](int j, const uint32_t(&dsa)[4]) {
      if constexpr (kKeepDs) {
        const int ra = kpos_a - k0, rb = ra + 8;
        *reinterpret_cast<uint32_t*>(ds_tile + DsTile::offset(ra, 2 * j) + 2 * quad) = dsa[0];
        *reinterpret_cast<uint32_t*>(ds_tile + DsTile::offset(rb, 2 * j) + 2 * quad) = dsa[1];
        *reinterpret_cast<uint32_t*>(ds_tile + DsTile::offset(ra, 2 * j + 1) + 2 * quad) = dsa[2];
        *reinterpret_cast<uint32_t*>(ds_tile + DsTile::offset(rb, 2 * j + 1) + 2 * quad) = dsa[3];
      }
    };
    if constexpr (kOverlap) {
      // P while dP's MMAs run, dv += P^T dout while dS is made, then dk += dS^T q: each
      // accumulator takes its k16 steps in the same order as below.
      wgmma_wait<1>();
      pin_registers(s);
      transposed_p<8>(s, 0, quad, p0, len, kpos_a, kpos_b, lse_t, scale);
      wgmma_fence();
      accumulators_times_cols<D>(acc_v, s, dout_s);
      wgmma_commit();
      wgmma_wait<1>();
      pin_registers(dp);
      transposed_ds<8>(s, dp, 0, quad, delta_t, scale);
      // The dS tile stored while dv's MMAs run, before dk's read its fragments (a store from
      // registers an MMA in flight reads made ptxas wait for the MMAs).
      uint32_t dsa[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        accumulator_fragment(dp, j, dsa[j]);
        keep_ds(j, dsa[j]);
      }
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) rows_times_cols<D>(acc_k, dsa[j], Tile::mn_major(q_s, j));
      wgmma_commit();
    } else {
      wgmma_wait<0>();
      pin_registers(s);
      pin_registers(dp);
      transposed_p_ds<8>(s, dp, 0, quad, p0, len, kpos_a, kpos_b, lse_t, delta_t, scale);
      // dv += P^T dout, dk += dS^T q: k16 steps of queries.
      wgmma_fence();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t pa[4], dsa[4];
        accumulator_fragment(s, j, pa);
        accumulator_fragment(dp, j, dsa);
        rows_times_cols<D>(acc_v, pa, Tile::mn_major(dout_s, j));
        rows_times_cols<D>(acc_k, dsa, Tile::mn_major(q_s, j));
        keep_ds(j, dsa);
      }
      wgmma_commit();
    }
    wgmma_wait<0>();
    pin_registers(acc_v);
    pin_registers(acc_k);
    __syncthreads();  // step n's buffers are free for step n + 2
  }
  const bool in_a = kpos_a < len, in_b = kpos_b < len;
  const int64_t item_a = in_a ? int64_t(toks[kpos_a]) * nkv + g : 0,
                item_b = in_b ? int64_t(toks[kpos_b]) * nkv + g : 0;
  store_row_pairs<D>(dk, item_a, item_b, in_a, in_b, quad, acc_k);
  store_row_pairs<D>(dv, item_a, item_b, in_a, in_b, quad, acc_v);
}

using DkvKernel = void (*)(const bf16*, const bf16*, DeviceKvLayer, DeviceSlots, const int32_t*, const int32_t*, int,
                           int, int64_t, float, const float*, const float*, float*, float*, bf16*);

bool g_dkv_overlap = false;  // set_attention_dkv_overlap

// The dkv kernel of a setting, its shared memory configured on first use.
template <int D, bool kKeepDs, bool kOverlap>
DkvKernel dkv_kernel() {
  static const bool configured = [] {
    LS_CUDA_CHECK(cudaFuncSetAttribute(attention_dkv_wgmma_kernel<D, kKeepDs, kOverlap>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, int(dkv_smem_bytes<D>())));
    return true;
  }();
  (void)configured;
  return attention_dkv_wgmma_kernel<D, kKeepDs, kOverlap>;
}
template <int D, bool kKeepDs>
DkvKernel dkv_kernel() {
  return g_dkv_overlap ? dkv_kernel<D, kKeepDs, true>() : dkv_kernel<D, kKeepDs, false>();
}

template <int D>
void launch(const bf16* q, const bf16* dout_bf16, const DeviceKvLayer& kv, const DeviceSlots& slots,
            const int32_t* seq_first, const int32_t* seq_tokens, int num_seqs, int tiles_per_seq, int64_t heads,
            float scale, const float* delta, float* lse, bool lse_given, float* dq, float* dk, float* dv,
            AttentionDsScratch ds, cudaStream_t s) {
  constexpr size_t dq_smem = 1024 + 4 * size_t(SwizzledTile<D>::kBytes), dkv_smem = dkv_smem_bytes<D>();
  constexpr size_t from_ds_smem = 1024 + 2 * (size_t(SwizzledTile<D>::kBytes) + DsTile::kBytes);
  static const bool configured = [] {
    LS_CUDA_CHECK(
        cudaFuncSetAttribute(attention_dq_wgmma_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dq_smem)));
    LS_CUDA_CHECK(cudaFuncSetAttribute(attention_dq_from_ds_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(from_ds_smem)));
    return true;
  }();
  (void)configured;
  const unsigned dq_grid = unsigned(num_seqs * tiles_per_seq * heads),
                 dkv_grid = unsigned(num_seqs * tiles_per_seq * kv.kv_heads);
  const bool keep_ds = lse_given && ds.tiles != nullptr &&
                       ds.elems >= attention_ds_elems(num_seqs, int64_t(tiles_per_seq) * kTile, heads);
  if (keep_ds) {
    const DkvKernel dkv = dkv_kernel<D, true>();
    dkv<<<dkv_grid, kThreads, dkv_smem, s>>>(q, dout_bf16, kv, slots, seq_first, seq_tokens, num_seqs, tiles_per_seq,
                                             heads, scale, lse, delta, dk, dv, reinterpret_cast<bf16*>(ds.tiles));
    LS_CUDA_LAUNCHED();
    attention_dq_from_ds_kernel<D><<<dq_grid, kThreads, from_ds_smem, s>>>(
        kv, slots, seq_first, seq_tokens, num_seqs, tiles_per_seq, heads, reinterpret_cast<const bf16*>(ds.tiles), dq);
    LS_CUDA_LAUNCHED();
    return;
  }
  attention_dq_wgmma_kernel<D><<<dq_grid, kThreads, dq_smem, s>>>(
      q, dout_bf16, kv, slots, seq_first, seq_tokens, num_seqs, tiles_per_seq, heads, scale, delta, lse, lse_given, dq);
  LS_CUDA_LAUNCHED();
  const DkvKernel dkv = dkv_kernel<D, false>();
  dkv<<<dkv_grid, kThreads, dkv_smem, s>>>(q, dout_bf16, kv, slots, seq_first, seq_tokens, num_seqs, tiles_per_seq,
                                           heads, scale, lse, delta, dk, dv, nullptr);
  LS_CUDA_LAUNCHED();
}

}  // namespace

void attention_backward_wgmma(const bf16* q, const bf16* dout_bf16, const DeviceKvLayer& kv, const DeviceSlots& slots,
                              const int32_t* seq_first, const int32_t* seq_tokens, int num_seqs, int tiles_per_seq,
                              int64_t heads, float scale, const float* delta, float* lse, bool lse_given, float* dq,
                              float* dk, float* dv, AttentionDsScratch ds, cudaStream_t s) {
  LS_CHECK(kv.head_dim == 64 || kv.head_dim == 128, "attention backward on wgmma: head_dim ", kv.head_dim,
           " is not 64 or 128");
  (kv.head_dim == 64 ? launch<64> : launch<128>)(q, dout_bf16, kv, slots, seq_first, seq_tokens, num_seqs,
                                                 tiles_per_seq, heads, scale, delta, lse, lse_given, dq, dk, dv, ds, s);
}

}  // namespace lockstep::cuda::attention_backward_detail

namespace lockstep::cuda {

void set_attention_dkv_overlap(bool on) { attention_backward_detail::g_dkv_overlap = on; }
bool attention_dkv_overlap() { return attention_backward_detail::g_dkv_overlap; }

}  // namespace lockstep::cuda
