// Row procedures shared by the kernels of ops.cu and the one-launch decode kernel
// (decode_layers.cu): the fixed reductions, the RMSNorm of a row and of a head with the rotary
// embedding, a token's routing and its experts' combine order. Each is the one procedure of
// its op, so a value's bits do not depend on which kernel computes it.
#pragma once
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/ops.h"

namespace lockstep::cuda {

// The barrier of a block-level procedure: the whole CTA, or (a kernel whose other warps do
// something else) a named barrier of the threads that run it.
struct CtaSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

constexpr unsigned kFull = 0xffffffffu;

// Fixed reductions: a warp butterfly in xor order 16, 8, 4, 2, 1 (every lane ends with the
// same bits), then warps in index order. The shape depends only on blockDim, which each op
// fixes independently of the batch.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
template <int WARPS, typename Sync = CtaSync>
__device__ float block_sum(float v, float* scratch, Sync sync = {}) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  sync();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < WARPS; ++w) total += scratch[w];
    scratch[WARPS] = total;
  }
  sync();
  total = scratch[WARPS];
  sync();
  return total;
}

constexpr int kNormThreads = 256;
// 1 / rms of n values whose squares sum to ss (every RMSNorm: rows and heads).
__device__ __forceinline__ float inverse_rms(float ss, int n, float eps) { return 1.0f / sqrtf(ss / float(n) + eps); }
// The RMSNorm of one row by the first kNormThreads threads of a block (Sync: their barrier;
// the one procedure of every norm of the hidden state: a row's bits do not depend on which
// kernel runs it). Thread t takes elements t, t + kNormThreads, ... in that order; PER > 0 is
// n / kNormThreads known at compile time (the loops unrolled, each element loaded once),
// PER = 0 any n: the same operations.
template <int PER, typename Sync = CtaSync>
__device__ __forceinline__ void rmsnorm_row_fixed(const bf16* xr, const float* w, bf16* o, int n, float eps,
                                                  float* scratch, Sync sync = {}) {
  const int t = threadIdx.x;
  float v[PER], wv[PER];  // the weights loaded before the block sum's barriers, not after
#pragma unroll
  for (int j = 0; j < PER; ++j) v[j] = to_f32(xr[t + kNormThreads * j]), wv[j] = w[t + kNormThreads * j];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < PER; ++j) ss += v[j] * v[j];
  const float inv = inverse_rms(block_sum<kNormThreads / 32>(ss, scratch, sync), n, eps);
#pragma unroll
  for (int j = 0; j < PER; ++j) o[t + kNormThreads * j] = to_bf16(wv[j] * round_bf16(v[j] * inv));
}
template <typename Sync = CtaSync>
__device__ __forceinline__ void rmsnorm_row(const bf16* xr, const float* w, bf16* o, int64_t n, float eps,
                                            float* scratch, Sync sync = {}) {
  switch (n) {  // the hidden sizes of the Qwen3-MoE shapes
    case 2048: return rmsnorm_row_fixed<2048 / kNormThreads>(xr, w, o, int(n), eps, scratch, sync);
    case 4096: return rmsnorm_row_fixed<4096 / kNormThreads>(xr, w, o, int(n), eps, scratch, sync);
    default: break;
  }
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kNormThreads) {
    float v = to_f32(xr[i]);
    ss += v * v;
  }
  const float inv = inverse_rms(block_sum<kNormThreads / 32>(ss, scratch, sync), int(n), eps);
  for (int64_t i = threadIdx.x; i < n; i += kNormThreads) o[i] = to_bf16(w[i] * round_bf16(to_f32(xr[i]) * inv));
}

__device__ __forceinline__ int64_t slot_of(const DeviceSlots& s, int64_t t, int64_t pos, int64_t page_size) {
  const int32_t* table = s.page_tables + int64_t(s.seq_of_token[t]) * *s.table_stride;
  // Positions and page sizes fit 32 bits: a 32-bit division (a 64-bit one is a long call).
  const int p = int(pos), page = int(page_size), pg = p / page;
  return int64_t(table[pg]) * page_size + (p - pg * page);
}

// The per-head procedure after the sum of squares ss: 1 / rms (inverse_rms), then per rotary
// pair (v1, v2) of raw values with norm weights (w1, w2): normalized, weighted, rotated, cast.
__device__ __forceinline__ void norm_rope_pair(float v1, float v2, float w1, float w2, float inv, float c, float s,
                                               bf16* lo, bf16* hi) {
  const float x1 = round_bf16(w1 * round_bf16(v1 * inv));
  const float x2 = round_bf16(w2 * round_bf16(v2 * inv));
  *lo = to_bf16(x1 * c - x2 * s);
  *hi = to_bf16(x2 * c + x1 * s);
}

// One head's RMSNorm and rotary embedding by one warp, D = 32 PER: lane l holds elements l,
// l + 32, ... (the sum in that order, then the butterfly), as the general loop of
// qk_norm_rope_kernel, with every load issued before the sum (one round trip, not three).
template <int PER>
__device__ __forceinline__ void norm_rope_head(const bf16* src, const float* w, const float* c, const float* s,
                                               bf16* dst, int lane, float eps) {
  constexpr int D = 32 * PER, HALF = D / 2;
  float v[PER], wv[PER], cv[PER / 2], sv[PER / 2];
#pragma unroll
  for (int j = 0; j < PER; ++j) v[j] = to_f32(src[lane + 32 * j]), wv[j] = w[lane + 32 * j];
#pragma unroll
  for (int j = 0; j < PER / 2; ++j) cv[j] = c[lane + 32 * j], sv[j] = s[lane + 32 * j];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < PER; ++j) ss += v[j] * v[j];
  const float inv = inverse_rms(warp_sum(ss), D, eps);
#pragma unroll
  for (int j = 0; j < PER / 2; ++j) {
    const int i = lane + 32 * j;
    norm_rope_pair(v[j], v[j + PER / 2], wv[j], wv[j + PER / 2], inv, cv[j], sv[j], dst + i, dst + i + HALF);
  }
}

// Routing of token t by one warp (probs: E floats of shared scratch for this warp).
// The routing probabilities of one token's E logits z by one warp: the softmax, lane l taking
// experts l, l + 32, ... (the max and the sum in that order, then the butterfly).
__device__ __forceinline__ void route_probs(const float* z, int64_t E, float* probs) {
  const int lane = threadIdx.x & 31;
  float m = -INFINITY;
  for (int64_t e = lane; e < E; e += 32) m = fmaxf(m, z[e]);
  m = warp_max(m);
  float s = 0.0f;
  for (int64_t e = lane; e < E; e += 32) {
    float p = expf(z[e] - m);
    probs[e] = p;
    s += p;
  }
  s = warp_sum(s);
  for (int64_t e = lane; e < E; e += 32) probs[e] = probs[e] / s;
  __syncwarp();
}

// The chosen experts are the k most probable in descending probability, ties to the lower id;
// slot i's weight is its probability, divided (normalize) by the sum of the chosen ones taken
// in slot order. Every routing procedure gives exactly this.
__device__ __forceinline__ void route_token(const float* logits, int32_t* ids, float* weights, int64_t t, int64_t E,
                                            int64_t k, bool normalize, float* probs) {
  const int lane = threadIdx.x & 31;
  route_probs(logits + t * E, E, probs);
  float total = 0.0f;
  float chosen_p[8];
  int chosen_e[8];
  for (int64_t i = 0; i < k; ++i) {
    float best = -1.0f;
    int best_e = int(E);
    for (int64_t e = lane; e < E; e += 32)
      if (probs[e] > best) {  // ascending e: ties keep the lower id
        best = probs[e];
        best_e = int(e);
      }
    for (int o = 16; o > 0; o >>= 1) {
      float ob = __shfl_xor_sync(kFull, best, o);
      int oe = __shfl_xor_sync(kFull, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
    __syncwarp();
    if (lane == 0) probs[best_e] = -2.0f;
    __syncwarp();
    chosen_p[i] = best;
    chosen_e[i] = best_e;
    total += best;
  }
  if (lane == 0)
    for (int64_t i = 0; i < k; ++i) {
      ids[t * k + i] = chosen_e[i];
      weights[t * k + i] = normalize ? chosen_p[i] / total : chosen_p[i];
    }
}

// route_token's result by a block of THREADS (the first threads of the block; sync: their
// barrier), for steps of one token: warp 0 computes the probabilities, then each thread the
// rank of its experts (how many are more probable, or as probable with a lower id) in one pass
// instead of k dependent rounds of a warp arg max (probs 16-byte aligned, E a multiple of 4); then thread i < k takes
// slot i: its weight (the chosen summed in slot order, as route_token) and its place in ascending expert id (order[],
// as sort_slots: the ids are distinct). mark(step) is called after each step (the one-launch decode's trace).
template <int THREADS, typename Sync, typename Mark>
__device__ __forceinline__ void route_token_ranked(const float* logits, int32_t* ids, float* weights, int* order, int E,
                                                   int k, bool normalize, float* probs, Sync sync, Mark mark) {
  if (threadIdx.x < 32) route_probs(logits, E, probs);
  sync();
  mark(0);
  // probs 16-byte aligned, E a multiple of 4: four probabilities per load.
  for (int e = threadIdx.x; e < E; e += THREADS) {
    const float p = probs[e];
    int rank = 0;
#pragma unroll 4
    for (int o = 0; o < E; o += 4) {
      const float4 q = *reinterpret_cast<const float4*>(probs + o);
      rank += (q.x > p || (q.x == p && o < e)) ? 1 : 0;
      rank += (q.y > p || (q.y == p && o + 1 < e)) ? 1 : 0;
      rank += (q.z > p || (q.z == p && o + 2 < e)) ? 1 : 0;
      rank += (q.w > p || (q.w == p && o + 3 < e)) ? 1 : 0;
    }
    if (rank < k) ids[rank] = e;
  }
  sync();
  mark(1);
  if (int(threadIdx.x) < k) {
    const int slot = int(threadIdx.x), id = ids[slot];
    int chosen[8];
    float p[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) chosen[i] = i < k ? ids[i] : 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = i < k ? probs[chosen[i]] : 0.0f;
    float total = 0.0f;
    int place = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < k) {
        total += p[i];
        place += chosen[i] < id ? 1 : 0;
      }
    weights[slot] = normalize ? probs[id] / total : probs[id];
    order[place] = slot;
  }
  sync();
}

// The token's k slots in ascending expert id (insertion sort; k <= 8), into order[].
__device__ __forceinline__ void sort_slots(const int32_t* ids, int k, int* order_out) {
  int order[8], id[8];
  for (int i = 0; i < k; ++i) {
    order[i] = i;
    id[i] = ids[i];
  }
  for (int i = 1; i < k; ++i)
    for (int j = i; j > 0 && id[order[j]] < id[order[j - 1]]; --j) {
      int tmp = order[j];
      order[j] = order[j - 1];
      order[j - 1] = tmp;
    }
  for (int i = 0; i < k; ++i) order_out[i] = order[i];
}

}  // namespace lockstep::cuda
