// What the two tensor-core forms of the attention backward share (attention_backward_tc.cu:
// mma.sync, every head size; attention_backward_wgmma.cu: warpgroup MMA, head_dim 64 and 128,
// the same bits): the tile, the blocks' order, the per-element steps, and the wgmma kernels'
// entry point.
#pragma once
#include "kernels/cuda/backward.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma_sync.cuh"

namespace lockstep::cuda::attention_backward_detail {

constexpr int kTile = 64;  // queries or keys a block: the contract's KV block

// The dq kernel's block: (sequence, 64-query tile at p0, head), longest first (a query tile
// walks the KV blocks up to its own: the sequences' last tiles first), then by sequence and
// head, so no long block starts at the end; and a lane's two query rows (mma accumulator rows
// lane / 4 and + 8 of its warp's 16). p0 >= len: the tile lies past a short sequence's end.
struct DqBlock {
  const int32_t* toks;  // the sequence's tokens by position
  int seq, len, p0, pos_a, pos_b;
  int64_t head, kv_head, item_a, item_b;  // items: (token, head) rows of q, dout, dq
  bool in_a, in_b;
};
__device__ __forceinline__ DqBlock dq_block(int block, int num_seqs, int tiles_per_seq, int64_t heads, int64_t kv_heads,
                                            const int32_t* seq_first, const int32_t* seq_tokens) {
  const int per_rank = num_seqs * int(heads), rank = block / per_rank, rest = block % per_rank, seq = rest / int(heads);
  DqBlock b;
  b.toks = seq_tokens + seq_first[seq];
  b.seq = seq;
  b.len = seq_first[seq + 1] - seq_first[seq];
  b.p0 = (tiles_per_seq - 1 - rank) * kTile;
  b.head = rest % heads;
  b.kv_head = b.head / (heads / kv_heads);
  b.pos_a = b.p0 + 16 * int(threadIdx.x / 32) + int(threadIdx.x % 32) / 4;
  b.pos_b = b.pos_a + 8;
  b.in_a = b.pos_a < b.len;
  b.in_b = b.pos_b < b.len;
  b.item_a = b.in_a ? int64_t(b.toks[b.pos_a]) * heads + b.head : 0;
  b.item_b = b.in_b ? int64_t(b.toks[b.pos_b]) * heads + b.head : 0;
  return b;
}

// The dkv kernel's block: (sequence, 64-key tile, KV head), longest first: a key tile walks
// the query tiles from its own to its sequence's end, so rank r takes the tiles with
// tiles_per_seq - r tiles from them to the end; then by sequence and KV head. tile < 0: none.
struct DkvBlock {
  int seq, tile, kv_head;
};
__device__ __forceinline__ DkvBlock dkv_block(int block, int num_seqs, int tiles_per_seq, int64_t kv_heads,
                                              const int32_t* seq_first) {
  const int per_rank = num_seqs * int(kv_heads), rank = block / per_rank, rest = block % per_rank;
  const int seq = rest / int(kv_heads), len = seq_first[seq + 1] - seq_first[seq];
  return {seq, (len + kTile - 1) / kTile - tiles_per_seq + rank, rest % int(kv_heads)};
}

// q and dout of a lane's two rows (items a and b: mma accumulator rows lane / 4 and + 8 of its
// warp's 16; an absent row zero) as m16n8k16 A fragments over head_dim.
template <int D>
__device__ __forceinline__ void load_row_fragments(const bf16* q, const bf16* dout, int64_t item_a, int64_t item_b,
                                                   bool in_a, bool in_b, int quad, uint32_t (&qa)[D / 16][4],
                                                   uint32_t (&da)[D / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int d = kk * 16 + quad;
    const bf16 *qra = q + item_a * D, *qrb = q + item_b * D, *dra = dout + item_a * D, *drb = dout + item_b * D;
    qa[kk][0] = in_a ? load_bf16_pair(qra + d) : 0u;
    qa[kk][1] = in_b ? load_bf16_pair(qrb + d) : 0u;
    qa[kk][2] = in_a ? load_bf16_pair(qra + d + 8) : 0u;
    qa[kk][3] = in_b ? load_bf16_pair(qrb + d + 8) : 0u;
    da[kk][0] = in_a ? load_bf16_pair(dra + d) : 0u;
    da[kk][1] = in_b ? load_bf16_pair(drb + d) : 0u;
    da[kk][2] = in_a ? load_bf16_pair(dra + d + 8) : 0u;
    da[kk][3] = in_b ? load_bf16_pair(drb + d + 8) : 0u;
  }
}

// A lane's scores of KV block b (s[4 nt + e]: n8 tile nt, e < 2 row a, else row b) scaled, keys
// after the row's position -inf.
__device__ __forceinline__ void mask_block_scores(float (&s)[32], int b, int quad, int pos_a, int pos_b, float scale) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = b * kTile + nt * 8 + quad + (e & 1), pos = e < 2 ? pos_a : pos_b;
      s[4 * nt + e] = key <= pos ? s[4 * nt + e] * scale : -INFINITY;
    }
}

// The log-sum-exp of a lane's two rows, online over the KV blocks' masked scores: per lane
// ascending keys, then the quad's butterfly (xor 1, xor 2).
struct RowLogSumExp {
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
  __device__ __forceinline__ void add_block(const float (&s)[32]) {
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      mx_a = fmaxf(mx_a, fmaxf(s[4 * nt], s[4 * nt + 1]));
      mx_b = fmaxf(mx_b, fmaxf(s[4 * nt + 2], s[4 * nt + 3]));
    }
#pragma unroll
    for (int x = 1; x <= 2; x *= 2) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, x));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, x));
    }
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    float sum_a = 0.0f, sum_b = 0.0f;
    if (mn_a != -INFINITY)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) sum_a = (sum_a + expf(s[4 * nt] - mn_a)) + expf(s[4 * nt + 1] - mn_a);
    if (mn_b != -INFINITY)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) sum_b = (sum_b + expf(s[4 * nt + 2] - mn_b)) + expf(s[4 * nt + 3] - mn_b);
#pragma unroll
    for (int x = 1; x <= 2; x *= 2) {
      sum_a += __shfl_xor_sync(0xffffffffu, sum_a, x);
      sum_b += __shfl_xor_sync(0xffffffffu, sum_b, x);
    }
    l_a = (m_a == -INFINITY ? 0.0f : l_a * expf(m_a - mn_a)) + sum_a;
    l_b = (m_b == -INFINITY ? 0.0f : l_b * expf(m_b - mn_b)) + sum_b;
    m_a = mn_a, m_b = mn_b;
  }
  __device__ __forceinline__ float lse_a() const { return m_a + logf(l_a); }
  __device__ __forceinline__ float lse_b() const { return m_b + logf(l_b); }
};

// Pass 1's log-sum-exp of a lane's two rows, kept in lse for the dkv kernel (by each quad's
// first lane).
__device__ __forceinline__ void keep_lse(const RowLogSumExp& rows, const DqBlock& b, float* lse, float& lse_a,
                                         float& lse_b) {
  lse_a = rows.lse_a(), lse_b = rows.lse_b();
  if (threadIdx.x % 4 == 0) {
    if (b.in_a) lse[b.item_a] = lse_a;
    if (b.in_b) lse[b.item_b] = lse_b;
  }
}

// The log-sum-exp of a lane's two rows as the forward left it (0 for an absent row).
__device__ __forceinline__ void forward_lse(const float* lse, const DqBlock& b, float& lse_a, float& lse_b) {
  lse_a = b.in_a ? lse[b.item_a] : 0.0f;
  lse_b = b.in_b ? lse[b.item_b] : 0.0f;
}

// dS in place of a block's masked scores: P = exp(s - lse), dS = P (dP - delta) scale (a masked
// key: P = exp(-inf) = 0, so dS = 0).
__device__ __forceinline__ void scores_to_ds(float (&s)[32], const float (&dp)[32], float lse_a, float lse_b,
                                             float delta_a, float delta_b, float scale) {
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const bool row_a = i % 4 < 2;
    const float p = expf(s[i] - (row_a ? lse_a : lse_b));
    s[i] = p * (dp[i] - (row_a ? delta_a : delta_b)) * scale;
  }
}

// The dkv kernels' P^T and dS^T in place of S^T and dP^T (rows: the lane's keys at kpos_a,
// kpos_b; columns: queries c0 + 8 nt + quad (+ 1) of the step's tile at p0). A query sees keys at
// or before its position; a query past the sequence is absent. In two halves, so that dv's MMAs
// can start on P while dP is still in flight (set_attention_dkv_overlap): P into s, then dS into
// dp from P; transposed_p_ds runs both.
template <int NT>
__device__ __forceinline__ void transposed_p(float (&s)[4 * NT], int c0, int quad, int p0, int len, int kpos_a,
                                             int kpos_b, const float* lse_t, float scale) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 4 * nt + e, col = c0 + nt * 8 + quad + (e & 1), qpos = p0 + col, kpos = e < 2 ? kpos_a : kpos_b;
      s[i] = qpos < len && kpos <= qpos ? expf(s[i] * scale - lse_t[col]) : 0.0f;
    }
}
template <int NT>
__device__ __forceinline__ void transposed_ds(const float (&p)[4 * NT], float (&dp)[4 * NT], int c0, int quad,
                                              const float* delta_t, float scale) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = 4 * nt + e, col = c0 + nt * 8 + quad + (e & 1);
      dp[i] = p[i] * (dp[i] - delta_t[col]) * scale;
    }
}
template <int NT>
__device__ __forceinline__ void transposed_p_ds(float (&s)[4 * NT], float (&dp)[4 * NT], int c0, int quad, int p0,
                                                int len, int kpos_a, int kpos_b, const float* lse_t,
                                                const float* delta_t, float scale) {
  transposed_p<NT>(s, c0, quad, p0, len, kpos_a, kpos_b, lse_t, scale);
  transposed_ds<NT>(s, dp, c0, quad, delta_t, scale);
}

// The A fragment of k16 step j from accumulators (n8 tiles 2j and 2j + 1), rounded to bf16.
template <int N>
__device__ __forceinline__ void accumulator_fragment(const float (&x)[N], int j, uint32_t (&a)[4]) {
  a[0] = pack_bf16(x[8 * j], x[8 * j + 1]);
  a[1] = pack_bf16(x[8 * j + 2], x[8 * j + 3]);
  a[2] = pack_bf16(x[8 * j + 4], x[8 * j + 5]);
  a[3] = pack_bf16(x[8 * j + 6], x[8 * j + 7]);
}

// A lane's accumulators of two rows over head_dim (acc[4 dn + e]) into rows a and b of `out`.
template <int D>
__device__ __forceinline__ void store_row_pairs(float* out, int64_t row_a, int64_t row_b, bool in_a, bool in_b,
                                                int quad, const float (&acc)[D / 2]) {
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) {
    const int d = dn * 8 + quad;
    if (in_a) *reinterpret_cast<float2*>(out + row_a * D + d) = make_float2(acc[4 * dn], acc[4 * dn + 1]);
    if (in_b) *reinterpret_cast<float2*>(out + row_b * D + d) = make_float2(acc[4 * dn + 2], acc[4 * dn + 3]);
  }
}

// dq (and each query's lse) then dk and dv by the warpgroup-MMA kernels, head_dim 64 or 128,
// for paged_attention_backward_tc (its arguments; dout_bf16 and delta already made; lse_given:
// lse holds the forward's, else the dq kernel writes it there). With the forward's lse and a
// dS scratch of attention_ds_elems: dk and dv first, keeping dS, then dq from it.
void attention_backward_wgmma(const bf16* q, const bf16* dout_bf16, const DeviceKvLayer& kv, const DeviceSlots& slots,
                              const int32_t* seq_first, const int32_t* seq_tokens, int num_seqs, int tiles_per_seq,
                              int64_t heads, float scale, const float* delta, float* lse, bool lse_given, float* dq,
                              float* dk, float* dv, AttentionDsScratch ds, cudaStream_t s);

}  // namespace lockstep::cuda::attention_backward_detail
