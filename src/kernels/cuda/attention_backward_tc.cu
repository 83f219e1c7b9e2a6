// Attention backward on tensor cores (backward.h, paged_attention_backward_tc): the
// flash-attention-2 recomputation in two kernels and no atomics, mma.sync m16n8k16 with bf16
// operands and fp32 accumulators.
//
//   dq kernel, per (64-query tile of a sequence, head): the log-sum-exp of each query over the
//   KV blocks (the contract's absolute 64-position blocks, ascending) unless the forward's is
//   given (training: flash_attention's), then per block S = q K^T, P = exp(scale S - lse),
//   dP = dout V^T, dS = P (dP - delta) scale, dq += dS K.
//   dkv kernel, per (64-key tile of a sequence, kv head): over the query tiles at or after it
//   (ascending), the group's heads (ascending), 32 queries at a time: S^T = K q^T, dP^T =
//   V dout^T, dv += P^T dout, dk += dS^T q.
//
// Each output element is one fixed procedure of its own sequence's values: k16 steps over
// keys (dq) or queries (dk, dv) in that fixed order, positions aligned to absolute tiles, so a
// sequence's gradients do not depend on the other sequences, their places or the pages. A
// masked or absent key or query contributes exact zeros. P, dS and dout enter the tensor cores
// rounded to bf16 (as in FlashAttention-2); q, K, V are the forward's bf16 values. The
// CUDA-core kernels of attention_backward.cu (fp32 products) are the reference.
//
// Tiles reach shared memory by cp.async, the next one while the current is computed (dout is
// rounded to bf16 once beforehand, the value the kernels used to round on load); fragments
// come by ldmatrix (.trans for the column operands). The fragments hold the same values as
// the per-element loads they replaced, so the bits did not change.
#include <type_traits>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/attention_backward_tc.cuh"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/row_ops.cuh"

namespace lockstep::cuda {

namespace {

using namespace attention_backward_detail;

constexpr int kWarps = 4;  // 16 rows each

// Accumulators of n8 tiles [nt][e] as the flat [4 nt + e] of the shared steps (the same memory).
template <int NT>
__device__ __forceinline__ float (&flat(float (&x)[NT][4]))[NT * 4] {
  return *reinterpret_cast<float(*)[NT * 4]>(&x);
}
constexpr int kThreads = 32 * kWarps;

// A shared tile of 64 rows of D bf16 (padded rows: conflict-free fragment loads).
template <int D>
struct Tile {
  static constexpr int kPitch = D + 8;
  bf16 v[kTile][kPitch];
  __device__ __forceinline__ uint32_t at(int row, int col) const { return smem_addr(&v[row][col]); }
  // B fragments of two n8 x k16 steps from rows n (pairs along the row): B[k][n] = v[n0 + n][k0 + k]
  // for n < 16; b[0], b[1] the first n8 tile's, b[2], b[3] the second's.
  __device__ __forceinline__ void b_rows2(int n0, int k0, int lane, uint32_t (&b)[4]) const {
    ldmatrix_x4(b, at(n0 + lane % 8 + (lane / 16) * 8, k0 + ((lane / 8) % 2) * 8));
  }
  // The same from columns: B[k][n] = v[k0 + k][n0 + n].
  __device__ __forceinline__ void b_cols2(int n0, int k0, int lane, uint32_t (&b)[4]) const {
    ldmatrix_x4_trans(b, at(k0 + lane % 8 + ((lane / 8) % 2) * 8, n0 + (lane / 16) * 8));
  }
  // A fragment of the 16 x 16 block at (row0, k0) (row-major).
  __device__ __forceinline__ void a_rows(int row0, int k0, int lane, uint32_t (&a)[4]) const {
    ldmatrix_x4(a, at(row0 + lane % 16, k0 + (lane / 16) * 8));
  }
};

// acc[nt] = A B^T over head_dim for the warp's 16 rows and the tile's 64 rows (8 n8 tiles):
// A in fragments (the rows' values), B the tile's rows.
template <int D>
__device__ __forceinline__ void rows_times_tile(float (&acc)[8][4], const uint32_t (&a)[D / 16][4], const Tile<D>& t,
                                                int lane) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int nt = 0; nt < 8; nt += 2) {
      uint32_t b[4];
      t.b_rows2(nt * 8, kk * 16, lane, b);
      mma_bf16(acc[nt], a[kk], b[0], b[1]);
      mma_bf16(acc[nt + 1], a[kk], b[2], b[3]);
    }
}

// Rows of a KV block from the cache (zeros past the sequence): cp.async, 16 bytes a piece.
template <int D>
__device__ __forceinline__ void load_kv_block(Tile<D>& dst, const bf16* base, const DeviceKvLayer& kv,
                                              const DeviceSlots& slots, int64_t seq_token, int p0, int len, int g) {
  constexpr int kPieces = D / 8;
  for (int idx = threadIdx.x; idx < kTile * kPieces; idx += kThreads) {
    const int r = idx / kPieces, piece = idx % kPieces, pos = p0 + r;
    const bool valid = pos < len;
    const bf16* src =
        valid ? base + (slot_of(slots, seq_token, pos, kv.page_size) * kv.kv_heads + g) * D + piece * 8 : base;
    cp_async16(dst.at(r, piece * 8), src, valid);
  }
}

// Rows of per-(token, head) bf16 values [T, heads, D] for the tile's 64 positions (zeros past
// the sequence): cp.async, 16 bytes a piece.
template <int D>
__device__ __forceinline__ void load_head_rows(Tile<D>& dst, const bf16* src, const int32_t* toks, int p0, int len,
                                               int64_t heads, int64_t h) {
  constexpr int kPieces = D / 8;
  for (int idx = threadIdx.x; idx < kTile * kPieces; idx += kThreads) {
    const int r = idx / kPieces, piece = idx % kPieces, pos = p0 + r;
    const bool valid = pos < len;
    cp_async16(dst.at(r, piece * 8), valid ? src + (int64_t(toks[pos]) * heads + h) * D + piece * 8 : src, valid);
  }
}

__global__ void round_bf16_kernel(const float* x, bf16* y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] = to_bf16(x[i]);
}

// delta[t, h] = dout . out over head_dim (the CPU's dot procedure).
__global__ void attention_delta_kernel(const float* dout, const bf16* out, float* delta, int64_t items, int D) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < items) delta[i] = dot_lanes(dout + i * D, out + i * D, D);
}

// The same, a warp an item (D >= 32): lane l loads elements l + 32 s (whole lines, where a
// thread an item read 512-byte strided rows), summed by dot_lanes_of_warp. It also writes dout rounded
// to bf16 (round_bf16_kernel's values) while it has the row.
template <int D>
__global__ void __launch_bounds__(256)
    attention_delta_warp_kernel(const float* dout, const bf16* out, float* delta, bf16* dout_bf16, int64_t items) {
  constexpr int kPer = D / 32;
  const int64_t i = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (i >= items) return;
  const int lane = threadIdx.x % 32;
  float prod[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const float d = dout[i * D + lane + 32 * j];
    dout_bf16[i * D + lane + 32 * j] = to_bf16(d);
    prod[j] = d * to_f32(out[i * D + lane + 32 * j]);
  }
  const float sum = dot_lanes_of_warp(prod);
  if (lane == 0) delta[i] = sum;
}

template <int D>
struct DqShared {
  Tile<D> k[2], v[2];  // the block being computed and the next
};

template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_dq_tc_kernel(const bf16* q, const bf16* dout, DeviceKvLayer kv, DeviceSlots slots,
                           const int32_t* seq_first, const int32_t* seq_tokens, int num_seqs, int tiles_per_seq,
                           int64_t heads, float scale, const float* delta, float* lse, bool lse_given, float* dq) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DqShared<D>& sh = *reinterpret_cast<DqShared<D>*>(smem_raw);
  const DqBlock block = dq_block(int(blockIdx.x), num_seqs, tiles_per_seq, heads, kv.kv_heads, seq_first, seq_tokens);
  if (block.p0 >= block.len) return;
  const int32_t* toks = block.toks;
  const int len = block.len, p0 = block.p0, pos_a = block.pos_a, pos_b = block.pos_b;
  const int64_t g = block.kv_head, item_a = block.item_a, item_b = block.item_b;
  const bool in_a = block.in_a, in_b = block.in_b;
  const int lane = threadIdx.x % 32, quad = 2 * (lane % 4);
  const int64_t seq_token = toks[0];  // any token of the sequence reads its page table
  const int last_block = p0 / kTile;  // the diagonal block: no key after it is visible
  // Block b's K (and V) into buffer b % 2, one cp.async group (an empty one past the last).
  auto load_block = [&](int b, bool with_v) {
    if (b <= last_block) {
      load_kv_block(sh.k[b % 2], kv.k, kv, slots, seq_token, b * kTile, len, int(g));
      if (with_v) load_kv_block(sh.v[b % 2], kv.v, kv, slots, seq_token, b * kTile, len, int(g));
    }
    cp_async_commit();
  };
  if (!lse_given) load_block(0, false);  // pass 1's first block

  // q and dout of the rows as A fragments (zeros for rows past the sequence).
  uint32_t qa[D / 16][4], da[D / 16][4];
  load_row_fragments<D>(q, dout, item_a, item_b, in_a, in_b, quad, qa, da);
  const float delta_a = in_a ? delta[item_a] : 0.0f, delta_b = in_b ? delta[item_b] : 0.0f;

  // S = q K^T of one block for the warp's 16 rows x 64 keys, scaled and masked (keys after a
  // row's position: -inf).
  float s[8][4];
  auto scores = [&](int b) {
    rows_times_tile<D>(s, qa, sh.k[b % 2], lane);
    mask_block_scores(flat(s), b, quad, pos_a, pos_b, scale);
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
      __syncthreads();           // everyone's
      scores(b);
      __syncthreads();  // block b's buffer is free for block b + 2
      lse_rows.add_block(flat(s));
    }
    keep_lse(lse_rows, block, lse, lse_a, lse_b);
  }

  // Pass 2: dq over the blocks, keys ascending.
  float acc[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[dn][e] = 0.0f;
  cp_async_wait<0>();
  __syncthreads();  // pass 1 is done with both buffers
  load_block(0, true);
  for (int b = 0; b <= last_block; ++b) {
    load_block(b + 1, true);
    cp_async_wait<1>();
    __syncthreads();
    scores(b);
    float dp[8][4];
    rows_times_tile<D>(dp, da, sh.v[b % 2], lane);
    scores_to_ds(flat(s), flat(dp), lse_a, lse_b, delta_a, delta_b, scale);
    // dq += dS K: k16 steps of keys, dS's accumulator tiles 2j, 2j + 1 as the A fragment.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
      accumulator_fragment(flat(s), j, a);
#pragma unroll
      for (int dn = 0; dn < D / 8; dn += 2) {
        uint32_t bk[4];
        sh.k[b % 2].b_cols2(dn * 8, j * 16, lane, bk);
        mma_bf16(acc[dn], a, bk[0], bk[1]);
        mma_bf16(acc[dn + 1], a, bk[2], bk[3]);
      }
    }
    __syncthreads();  // block b's buffers are free for block b + 2
  }
  store_row_pairs<D>(dq, item_a, item_b, in_a, in_b, quad, flat(acc));
}

template <int D>
struct DkvShared {
  Tile<D> k, v, q[2], dout[2];  // q and dout: the (query tile, head) being computed and the next
  float lse[2][kTile], delta[2][kTile];
};

template <int D>
__global__ void __launch_bounds__(kThreads)
    attention_dkv_tc_kernel(const bf16* q, const bf16* dout, DeviceKvLayer kv, DeviceSlots slots,
                            const int32_t* seq_first, const int32_t* seq_tokens, int num_seqs, int tiles_per_seq,
                            int64_t heads, float scale, const float* lse, const float* delta, float* dk, float* dv) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  DkvShared<D>& sh = *reinterpret_cast<DkvShared<D>*>(smem_raw);
  // (In launch order the first tiles of the last heads started last and ran nearly alone.)
  const int64_t nkv = kv.kv_heads, group = heads / nkv;
  const DkvBlock block = dkv_block(int(blockIdx.x), num_seqs, tiles_per_seq, nkv, seq_first);
  if (block.tile < 0) return;
  const int seq = block.seq, g = block.kv_head, k0 = block.tile * kTile;
  const int32_t* toks = seq_tokens + seq_first[seq];
  const int len = seq_first[seq + 1] - seq_first[seq];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = 2 * (lane % 4);
  const int row_a = 16 * warp + lane / 4, kpos_a = k0 + row_a, kpos_b = kpos_a + 8;
  const int64_t seq_token = toks[0];
  load_kv_block(sh.k, kv.k, kv, slots, seq_token, k0, len, g);
  load_kv_block(sh.v, kv.v, kv, slots, seq_token, k0, len, g);
  // Step n of the walk: query tile p0 = k0 + (n / group) 64, head g group + n % group. Its q and
  // dout by cp.async (one group, an empty one past the end), lse and delta by plain loads.
  const int steps = (len - k0 + kTile - 1) / kTile * int(group);
  auto load_step = [&](int n) {
    if (n < steps) {
      const int p0 = k0 + (n / int(group)) * kTile, buf = n % 2;
      const int64_t h = g * group + n % group;
      load_head_rows(sh.q[buf], q, toks, p0, len, heads, h);
      load_head_rows(sh.dout[buf], dout, toks, p0, len, heads, h);
      for (int r = threadIdx.x; r < kTile; r += kThreads) {
        const bool in = p0 + r < len;
        const int64_t item = in ? int64_t(toks[p0 + r]) * heads + h : 0;
        sh.lse[buf][r] = in ? lse[item] : 0.0f;
        sh.delta[buf][r] = in ? delta[item] : 0.0f;
      }
    }
    cp_async_commit();
  };
  load_step(0);  // with K and V: the first group

  float acc_k[D / 8][4], acc_v[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_k[dn][e] = acc_v[dn][e] = 0.0f;

  // Query tiles ascending, the group's heads ascending within each.
  for (int n = 0; n < steps; ++n) {
    load_step(n + 1);  // into the buffers step n - 1 used
    cp_async_wait<1>();
    __syncthreads();
    const int p0 = k0 + (n / int(group)) * kTile, buf = n % 2;
    const Tile<D>&qt = sh.q[buf], &dt = sh.dout[buf];
    const float *lse_t = sh.lse[buf], *delta_t = sh.delta[buf];
    for (int half = 0; half < 2; ++half) {
      const int c0 = half * 32;  // the 32 queries of this pass
      float s[4][4], dp[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ka[4], va[4];
        sh.k.a_rows(16 * warp, kk * 16, lane, ka);
        sh.v.a_rows(16 * warp, kk * 16, lane, va);
#pragma unroll
        for (int nt = 0; nt < 4; nt += 2) {
          uint32_t bq[4], bd[4];
          qt.b_rows2(c0 + nt * 8, kk * 16, lane, bq);
          dt.b_rows2(c0 + nt * 8, kk * 16, lane, bd);
          mma_bf16(s[nt], ka, bq[0], bq[1]);
          mma_bf16(s[nt + 1], ka, bq[2], bq[3]);
          mma_bf16(dp[nt], va, bd[0], bd[1]);
          mma_bf16(dp[nt + 1], va, bd[2], bd[3]);
        }
      }
      transposed_p_ds<4>(flat(s), flat(dp), c0, quad, p0, len, kpos_a, kpos_b, lse_t, delta_t, scale);
      // dv += P^T dout, dk += dS^T q: k16 steps of queries.
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t pa[4], dsa[4];
        accumulator_fragment(flat(s), j, pa);
        accumulator_fragment(flat(dp), j, dsa);
#pragma unroll
        for (int dn = 0; dn < D / 8; dn += 2) {
          uint32_t bd[4], bq[4];
          dt.b_cols2(dn * 8, c0 + j * 16, lane, bd);
          qt.b_cols2(dn * 8, c0 + j * 16, lane, bq);
          mma_bf16(acc_v[dn], pa, bd[0], bd[1]);
          mma_bf16(acc_v[dn + 1], pa, bd[2], bd[3]);
          mma_bf16(acc_k[dn], dsa, bq[0], bq[1]);
          mma_bf16(acc_k[dn + 1], dsa, bq[2], bq[3]);
        }
      }
    }
    __syncthreads();  // step n's buffers are free for step n + 2
  }
  const bool in_a = kpos_a < len, in_b = kpos_b < len;
  const int64_t item_a = in_a ? int64_t(toks[kpos_a]) * nkv + g : 0,
                item_b = in_b ? int64_t(toks[kpos_b]) * nkv + g : 0;
  store_row_pairs<D>(dk, item_a, item_b, in_a, in_b, quad, flat(acc_k));
  store_row_pairs<D>(dv, item_a, item_b, in_a, in_b, quad, flat(acc_v));
}

template <int D>
void launch(const bf16_t* q, const bf16_t* out, const float* dout, const DeviceKvLayer& kv, const DeviceSlots& slots,
            const int32_t* seq_first, const int32_t* seq_tokens, int64_t T, int64_t heads, int64_t num_seqs,
            int64_t max_seq_len, float scale, float* lse, bool lse_given, float* delta, bf16* dout_bf16, float* dq,
            float* dk, float* dv, AttentionDsScratch ds, cudaStream_t s, bool wgmma) {
  if constexpr (D >= 32) {
    attention_delta_warp_kernel<D>
        <<<unsigned(ceil_div(T * heads, 8)), 256, 0, s>>>(dout, out, delta, dout_bf16, T * heads);
    LS_CUDA_LAUNCHED();
  } else {
    attention_delta_kernel<<<unsigned(ceil_div(T * heads, 256)), 256, 0, s>>>(dout, out, delta, T * heads, int(D));
    LS_CUDA_LAUNCHED();
    const int64_t n = T * heads * D;
    round_bf16_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, s>>>(dout, dout_bf16, n);
    LS_CUDA_LAUNCHED();
  }
  const int tiles_per_seq = int(ceil_div(max_seq_len, kTile));
  if (wgmma)
    return attention_backward_wgmma(q, dout_bf16, kv, slots, seq_first, seq_tokens, int(num_seqs), tiles_per_seq, heads,
                                    scale, delta, lse, lse_given, dq, dk, dv, ds, s);
  const unsigned dq_grid = unsigned(num_seqs * tiles_per_seq * heads);
  const size_t dq_smem = sizeof(DqShared<D>);
  LS_CUDA_CHECK(
      cudaFuncSetAttribute(attention_dq_tc_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(dq_smem)));
  attention_dq_tc_kernel<D><<<dq_grid, kThreads, dq_smem, s>>>(q, dout_bf16, kv, slots, seq_first, seq_tokens,
                                                               int(num_seqs), tiles_per_seq, heads, scale, delta, lse,
                                                               lse_given, dq);
  LS_CUDA_LAUNCHED();
  const size_t smem = sizeof(DkvShared<D>);
  LS_CUDA_CHECK(
      cudaFuncSetAttribute(attention_dkv_tc_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const unsigned dkv_grid = unsigned(num_seqs * tiles_per_seq * kv.kv_heads);
  attention_dkv_tc_kernel<D><<<dkv_grid, kThreads, smem, s>>>(
      q, dout_bf16, kv, slots, seq_first, seq_tokens, int(num_seqs), tiles_per_seq, heads, scale, lse, delta, dk, dv);
  LS_CUDA_LAUNCHED();
}

}  // namespace

bool attention_backward_tc_supported(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
}

void paged_attention_backward_tc(const bf16_t* q, const bf16_t* out, const float* dout, const DeviceKvLayer& kv,
                                 const DeviceSlots& slots, const int32_t* seq_first, const int32_t* seq_tokens,
                                 int64_t T, int64_t heads, int64_t num_seqs, int64_t max_seq_len, float scale,
                                 float* lse_ws, float* delta_ws, bf16_t* dout_ws, float* dq, float* dk, float* dv,
                                 cudaStream_t s, AttentionKernel kernel, bool lse_given, AttentionDsScratch ds) {
  LS_CHECK(attention_backward_tc_supported(kv.head_dim), "attention backward on tensor cores: head_dim ", kv.head_dim,
           " is not 16, 32, 64 or 128");
  LS_CHECK(kv.kv_heads >= 1 && heads % kv.kv_heads == 0, "attention backward: ", heads, " heads over ", kv.kv_heads,
           " KV heads");
  LS_CHECK(num_seqs * ceil_div(max_seq_len, kTile) * heads < (int64_t(1) << 31), "attention backward: ", num_seqs,
           " sequences of up to ", max_seq_len, " tokens of ", heads, " heads exceed the grid");
  const bool wgmma =
      kernel == AttentionKernel::wgmma || (kernel == AttentionKernel::automatic && attention_takes_wgmma(kv.head_dim));
  LS_CHECK(!wgmma || attention_takes_wgmma(kv.head_dim), "attention backward on wgmma: head_dim ", kv.head_dim,
           " is not 64 or 128");
  if (T == 0 || num_seqs == 0) return;
  auto run = kv.head_dim == 16   ? launch<16>
             : kv.head_dim == 32 ? launch<32>
             : kv.head_dim == 64 ? launch<64>
                                 : launch<128>;
  run(q, out, dout, kv, slots, seq_first, seq_tokens, T, heads, num_seqs, max_seq_len, scale, lse_ws, lse_given,
      delta_ws, dout_ws, dq, dk, dv, ds, s, wgmma);
}

int64_t attention_ds_elems(int64_t num_seqs, int64_t max_seq_len, int64_t heads) {
  const int64_t tiles = ceil_div(max_seq_len, int64_t(kTile));
  return num_seqs * heads * (tiles * (tiles + 1) / 2) * kTile * kTile;
}

}  // namespace lockstep::cuda
