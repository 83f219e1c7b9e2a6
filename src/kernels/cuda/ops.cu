#include "kernels/cuda/ops.h"

#include <algorithm>

#include "kernels/cuda/attention.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/row_ops.cuh"

namespace lockstep::cuda {
namespace {

struct MaxSumD {
  float max, sum;
};
// The expression of lockstep::combine_maxsum (commutative bit for bit), with exp on the special
// function unit (exp_sfu) as everywhere in the GPU's log-softmax and sampling: the score path
// and the engine's sampling share these functions, so their log-probs stay equal bit for bit.
__device__ __forceinline__ MaxSumD combine(MaxSumD a, MaxSumD b) {
  if (b.sum == 0.0f) return a;
  if (a.sum == 0.0f) return b;
  float m = a.max > b.max ? a.max : b.max;
  return {m, a.sum * exp_sfu(a.max - m) + b.sum * exp_sfu(b.max - m)};
}

// One element into a lane's online (max, sum).
__device__ __forceinline__ void online_step(MaxSumD& ms, float x) {
  if (ms.sum == 0.0f) {
    ms = {x, 1.0f};
  } else if (x > ms.max) {
    ms.sum = ms.sum * exp_sfu(ms.max - x) + 1.0f;
    ms.max = x;
  } else {
    ms.sum += exp_sfu(x - ms.max);
  }
}

// The canonical per-chunk procedure: lane l folds elements begin + l, begin + l + 32, ... in
// ascending order into an online (max, sum) (x = row[i] / temp when scaled), then the lanes
// combine by butterfly. The loads run 8 elements ahead of the (serial) fold: the same
// operations on the same values, without a memory latency per element.
__device__ __forceinline__ MaxSumD chunk_maxsum_warp(const float* row, int64_t begin, int64_t end, float temp,
                                                     bool scale) {
  const int lane = threadIdx.x & 31;
  MaxSumD ms{-INFINITY, 0.0f};
  int64_t i = begin + lane;
  for (; i + 32 * 7 < end; i += 32 * 8) {
    float x[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) x[u] = row[i + 32 * u];
#pragma unroll
    for (int u = 0; u < 8; ++u) online_step(ms, scale ? x[u] / temp : x[u]);
  }
  for (; i < end; i += 32) online_step(ms, scale ? row[i] / temp : row[i]);
  for (int o = 16; o > 0; o >>= 1) {
    MaxSumD other{__shfl_xor_sync(kFull, ms.max, o), __shfl_xor_sync(kFull, ms.sum, o)};
    ms = combine(ms, other);
  }
  return ms;
}

// log sum exp of row[v] * mul (mul = 1 / temperature or 1) over V: 8 canonical chunks, one
// per warp of a 256-thread block (chunk_maxsum_warp); chunks combine by the pairwise tree.
__device__ float log_normalizer_block(const float* row, int64_t V, float inv_temp, bool scale, MaxSumD* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t clen = (V + 7) / 8;
  const int64_t begin = warp * clen, end = min(V, begin + clen);
  MaxSumD ms = chunk_maxsum_warp(row, begin, end, inv_temp, scale);
  if (lane == 0) scratch[warp] = ms;
  __syncthreads();
  MaxSumD a = combine(combine(scratch[0], scratch[1]), combine(scratch[2], scratch[3]));
  MaxSumD b = combine(combine(scratch[4], scratch[5]), combine(scratch[6], scratch[7]));
  MaxSumD r = combine(a, b);
  __syncthreads();
  return r.max + logf(r.sum);
}

__global__ void embedding_kernel(const int32_t* ids, const bf16* table, bf16* x, int64_t H) {
  start_after_previous();
  const int64_t t = blockIdx.x;
  const bf16* src = table + int64_t(ids[t]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) x[t * H + i] = src[i];
}

__global__ void __launch_bounds__(kNormThreads) rmsnorm_kernel(const bf16* x, const float* w, bf16* out, int64_t n,
                                                               float eps) {
  start_after_previous();
  __shared__ float scratch[kNormThreads / 32 + 1];
  rmsnorm_row(x + int64_t(blockIdx.x) * n, w, out + int64_t(blockIdx.x) * n, n, eps, scratch);
}

// One warp per head: q heads, then k heads, then v heads (copied). PER = D / 32 for the head
// sizes whose rotary halves are whole rows of lanes (norm_rope_head), 0 for any other D (the
// general loop, the same lane order). Sizes and offsets in 32 bits (T * heads * D < 2^31 is
// checked at launch). D = 64 and 128 run 8 blocks of 256 threads per SM (32 registers, no
// spills): the kernel is bound by the latency of its few dependent loads, so more warps in
// flight hide more of it.
template <int PER>
__global__ void __launch_bounds__(256, PER == 2 || PER == 4 ? 8 : 4)
    qk_norm_rope_kernel(const bf16* qkv, const float* q_norm, const float* k_norm, const float* rope_cos,
                        const float* rope_sin, bf16* q_out, DeviceKvLayer kv, DeviceSlots slots, int nq, int nkv,
                        int D_any, float eps) {
  start_after_previous();
  const int D = PER > 0 ? 32 * PER : D_any;
  const int t = int(blockIdx.x), lane = threadIdx.x & 31;
  const int head = int(blockIdx.y) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (head >= nq + 2 * nkv) return;
  const bf16* src = qkv + (t * (nq + 2 * nkv) + head) * D;
  const int pos = slots.positions[t];
  // Only k and v heads go to the cache: the page-table lookup (a division) for them
  // alone (ncu: done for every head, it was most of the kernel's instructions).
  if (head >= nq + nkv) {  // v: straight into the cache
    const int64_t slot = slot_of(slots, t, pos, kv.page_size);
    bf16* dst = kv.v + (slot * kv.kv_heads + (head - nq - nkv)) * D;
    for (int d = lane; d < D; d += 32) dst[d] = src[d];
    return;
  }
  const bool is_q = head < nq;
  const float* w = is_q ? q_norm : k_norm;
  bf16* dst = is_q ? q_out + (t * nq + head) * D
                   : kv.k + (slot_of(slots, t, pos, kv.page_size) * kv.kv_heads + (head - nq)) * D;
  const int half = D / 2;
  const float* c = rope_cos + pos * half;
  const float* s = rope_sin + pos * half;
  if constexpr (PER > 0) {
    norm_rope_head<PER>(src, w, c, s, dst, lane, eps);
  } else {
    float ss = 0.0f;
    for (int d = lane; d < D; d += 32) {
      float v = to_f32(src[d]);
      ss += v * v;
    }
    const float inv = inverse_rms(warp_sum(ss), D, eps);
    for (int i = lane; i < half; i += 32)
      norm_rope_pair(to_f32(src[i]), to_f32(src[i + half]), w[i], w[i + half], inv, c[i], s[i], dst + i,
                     dst + i + half);
  }
}

constexpr int kBlock = 64;      // absolute KV block of the contract
constexpr int kMaxHeadDim = 128;

// Block per (token, kv head), one warp per query head of the group. Each query walks the
// KV blocks 0, 64, ... up to its own position; only its own keys enter its sums.
__global__ void attention_kernel(const bf16* q, bf16* out, DeviceKvLayer kv, DeviceSlots slots, int64_t nq,
                                 float scale) {
  start_after_previous();
  const int64_t D = kv.head_dim, G = nq / kv.kv_heads;
  const int64_t t = blockIdx.x, kvh = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t h = kvh * G + warp;
  const int64_t ks_stride = D + 2;  // odd word stride: lanes reading different keys hit different banks
  extern __shared__ __align__(16) unsigned char smem[];
  bf16* Ks = reinterpret_cast<bf16*>(smem);
  bf16* Vs = Ks + kBlock * ks_stride + 8;
  Vs = reinterpret_cast<bf16*>((reinterpret_cast<uintptr_t>(Vs) + 15) & ~uintptr_t(15));
  float* qs = reinterpret_cast<float*>(Vs + kBlock * D);
  float* qw = qs + warp * D;

  for (int64_t d = lane; d < D; d += 32) qw[d] = to_f32(q[(t * nq + h) * D + d]);
  const int64_t pos = slots.positions[t];
  const int32_t* table = slots.page_tables + int64_t(slots.seq_of_token[t]) * *slots.table_stride;

  float m = -INFINITY, l = 0.0f;
  float acc[kMaxHeadDim / 32];
#pragma unroll
  for (int i = 0; i < kMaxHeadDim / 32; ++i) acc[i] = 0.0f;

  for (int64_t b0 = 0; b0 <= pos; b0 += kBlock) {
    const int n_valid = int(min(int64_t(kBlock), pos + 1 - b0));
    __syncthreads();  // previous block's readers are done
    const int pieces = int(D / 8);
    for (int idx = threadIdx.x; idx < kBlock * pieces; idx += blockDim.x) {
      const int j = idx / pieces, piece = idx % pieces;
      uint4 kval = make_uint4(0, 0, 0, 0), vval = make_uint4(0, 0, 0, 0);
      if (j < n_valid) {
        const int64_t p = b0 + j;
        const int64_t slot = int64_t(table[p / kv.page_size]) * kv.page_size + p % kv.page_size;
        const int64_t off = (slot * kv.kv_heads + kvh) * D + piece * 8;
        kval = *reinterpret_cast<const uint4*>(kv.k + off);
        vval = *reinterpret_cast<const uint4*>(kv.v + off);
      }
      uint32_t* kd = reinterpret_cast<uint32_t*>(Ks + j * ks_stride + piece * 8);
      kd[0] = kval.x;
      kd[1] = kval.y;
      kd[2] = kval.z;
      kd[3] = kval.w;
      *reinterpret_cast<uint4*>(Vs + j * D + piece * 8) = vval;
    }
    __syncthreads();
    float s[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int j = lane + 32 * r;
      s[r] = -INFINITY;
      if (j < n_valid) {
        const bf16* kr = Ks + j * ks_stride;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qw[d] * to_f32(kr[d]);
        s[r] = dot * scale;
      }
    }
    const float m_new = fmaxf(m, warp_max(fmaxf(s[0], s[1])));
    const float corr = expf(m - m_new);
    l *= corr;
#pragma unroll
    for (int i = 0; i < kMaxHeadDim / 32; ++i) acc[i] *= corr;
    float p[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) p[r] = (lane + 32 * r < n_valid) ? expf(s[r] - m_new) : 0.0f;
    l += warp_sum(p[0] + p[1]);
    for (int j = 0; j < n_valid; ++j) {
      const float pj = __shfl_sync(kFull, j < 32 ? p[0] : p[1], j & 31);
      const bf16* vr = Vs + j * D;
#pragma unroll
      for (int i = 0; i < kMaxHeadDim / 32; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) acc[i] += pj * to_f32(vr[d]);
      }
    }
    m = m_new;
  }
#pragma unroll
  for (int i = 0; i < kMaxHeadDim / 32; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < D) out[(t * nq + h) * D + d] = to_bf16(acc[i] / l);
  }
}

constexpr int kRouteWarps = 4;
__global__ void route_topk_kernel(const float* logits, int32_t* ids, float* weights, int64_t T, int64_t E, int64_t k,
                                  bool normalize) {
  start_after_previous();
  extern __shared__ float probs_all[];
  const int warp = threadIdx.x >> 5;
  const int64_t t = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (t >= T) return;
  route_token(logits, ids, weights, t, E, k, normalize, probs_all + warp * E);
}

// Warp 0 of a block: the per-expert counts in shared memory become each group's first row (an
// exclusive scan, each lane a contiguous run of experts), also written to group_rows [E + 1].
__device__ __forceinline__ void counts_to_group_starts(int32_t* counts, int64_t E, int32_t* group_rows) {
  const int lane = int(threadIdx.x) & 31;
  const int64_t per = (E + 31) / 32, begin = min(E, lane * per), end = min(E, begin + per);
  int32_t local = 0;
  for (int64_t e = begin; e < end; ++e) local += counts[e];
  int32_t incl = local;
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t v = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += v;
  }
  int32_t run = incl - local;
  for (int64_t e = begin; e < end; ++e) {
    const int32_t c = counts[e];
    group_rows[e] = run;
    counts[e] = run;
    run += c;
  }
  if (lane == 31) group_rows[E] = incl;
}

// One block: count per expert in shared memory, an exclusive scan by one warp (each lane a
// contiguous run of experts), then each pair takes the next row of its expert's group. One
// launch and no serial pass over the experts: decode steps are latency-bound.
constexpr int kAssignThreads = 1024;
__device__ __forceinline__ void assign_block(const int32_t* ids, int64_t n, int64_t k, int64_t E, int32_t* group_rows,
                                             int32_t* gather, int32_t* scatter, int32_t* s_cursor) {
  const int tid = threadIdx.x;
  for (int64_t e = tid; e < E; e += kAssignThreads) s_cursor[e] = 0;
  __syncthreads();
  for (int64_t i = tid; i < n; i += kAssignThreads) atomicAdd(&s_cursor[ids[i]], 1);
  __syncthreads();
  if (tid < 32) counts_to_group_starts(s_cursor, E, group_rows);
  __syncthreads();
  for (int64_t i = tid; i < n; i += kAssignThreads) {
    const int32_t r = atomicAdd(&s_cursor[ids[i]], 1);
    gather[r] = int32_t(i / k);
    scatter[r] = int32_t(i);
  }
}

__global__ void __launch_bounds__(kAssignThreads) assign_experts_kernel(const int32_t* ids, int64_t n, int64_t k,
                                                                       int64_t E, int32_t* group_rows,
                                                                       int32_t* gather, int32_t* scatter) {
  start_after_previous();
  extern __shared__ int32_t s_cursor[];  // [E]: counts, then each group's next free row
  assign_block(ids, n, k, E, group_rows, gather, scatter, s_cursor);
}

// Large steps: the same grouping over many blocks (one block's shared-memory atomics on E
// counters took ~0.22 ms per layer at 16384 tokens). Block b takes the pairs
// [b * kAssignBlockPairs, (b + 1) * kAssignBlockPairs): it counts them per expert, one block
// turns the counts into each block's first row in each group, then every block places its
// pairs from there, in pair order: a group's rows are its tokens ascending (the order the
// trainer's backward sums an expert's rows in, so it can read a kept layer's rows in place).
// Only the order of rows inside a group differs from assign_block.
constexpr int kAssignBlockPairs = 2048, kAssignBlockThreads = 256;
constexpr int64_t kParallelAssignPairs = 8192;
// The placement keeps a row of E counters per warp in shared memory (48 KB at most); more
// experts take the one-block assignment at every size.
constexpr int64_t kParallelAssignMaxExperts = 48 * 1024 / (kAssignBlockThreads / 32 * 4);
bool parallel_assign(int64_t pairs, int64_t E) {
  return pairs >= kParallelAssignPairs && E <= kParallelAssignMaxExperts;
}

__global__ void __launch_bounds__(kAssignBlockThreads) expert_histogram_kernel(const int32_t* ids, int64_t n,
                                                                               int64_t E, int32_t* hist) {
  start_after_previous();
  extern __shared__ int32_t s_count[];  // [E]
  for (int64_t e = threadIdx.x; e < E; e += kAssignBlockThreads) s_count[e] = 0;
  __syncthreads();
  const int64_t begin = int64_t(blockIdx.x) * kAssignBlockPairs, end = min(n, begin + kAssignBlockPairs);
  for (int64_t i = begin + threadIdx.x; i < end; i += kAssignBlockThreads) atomicAdd(&s_count[ids[i]], 1);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += kAssignBlockThreads) hist[blockIdx.x * E + e] = s_count[e];
}

// One block: hist[b][e] (block b's count of expert e) becomes block b's first row in group e,
// and group_rows the groups' first rows (each lane of warp 0 a contiguous run of experts).
__global__ void __launch_bounds__(kAssignThreads) expert_offsets_kernel(int32_t* hist, int64_t blocks, int64_t E,
                                                                       int32_t* group_rows) {
  start_after_previous();
  extern __shared__ int32_t s_total[];  // [E]
  for (int64_t e = threadIdx.x; e < E; e += kAssignThreads) {
    int32_t run = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      const int32_t c = hist[b * E + e];
      hist[b * E + e] = run;
      run += c;
    }
    s_total[e] = run;
  }
  __syncthreads();
  if (threadIdx.x < 32) counts_to_group_starts(s_total, E, group_rows);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += kAssignThreads)
    for (int64_t b = 0; b < blocks; ++b) hist[b * E + e] += s_total[e];
}

__global__ void __launch_bounds__(kAssignBlockThreads) expert_place_kernel(const int32_t* ids, int64_t n, int64_t k,
                                                                           int64_t E, const int32_t* first_row,
                                                                           int32_t* gather, int32_t* scatter) {
  start_after_previous();
  // [warp][E]: each warp's count of its pairs in each group, then its next row there.
  extern __shared__ int32_t s_next[];
  constexpr int kWarps = kAssignBlockThreads / 32, kWarpPairs = kAssignBlockPairs / kWarps;
  const int lane = int(threadIdx.x % 32), warp = int(threadIdx.x / 32);
  const int64_t begin = int64_t(blockIdx.x) * kAssignBlockPairs + int64_t(warp) * kWarpPairs;
  const int64_t end = min(n, begin + kWarpPairs);
  int32_t* mine = s_next + int64_t(warp) * E;
  for (int64_t e = lane; e < E; e += 32) mine[e] = 0;
  __syncwarp();
  // Each warp takes its run of pairs 32 at a time in pair order: a pair's place among its
  // group's pairs in the run is the number of lower lanes in the same group (match_any) plus
  // what earlier rounds counted; the group's lowest lane moves the count.
  auto walk = [&](bool place) {
    for (int64_t i0 = begin; i0 < end; i0 += 32) {
      const int64_t i = i0 + lane;
      const bool live = i < end;
      const int32_t e = live ? ids[i] : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      const int32_t before = __popc(peers & ((1u << lane) - 1u));
      const int32_t r = live ? mine[e] + before : 0;
      __syncwarp();
      if (live && before == 0) mine[e] = r + __popc(peers);
      __syncwarp();
      if (place && live) {
        gather[r] = int32_t(i / k);
        scatter[r] = int32_t(i);
      }
    }
  };
  walk(false);
  __syncthreads();
  // The counts become each warp's first row in each group: the block's first row, then the
  // warps before it in order.
  for (int64_t e = threadIdx.x; e < E; e += kAssignBlockThreads) {
    int32_t row = first_row[blockIdx.x * E + e];
    for (int w = 0; w < kWarps; ++w) {
      const int32_t count = s_next[int64_t(w) * E + e];
      s_next[int64_t(w) * E + e] = row;
      row += count;
    }
  }
  __syncthreads();
  walk(true);
}

// Small steps: the routing of every token (warp t routes token t, as route_topk_kernel) and
// the expert assignment (as assign_experts_kernel) in one launch.
constexpr int kRouteAssignMaxTokens = kAssignThreads / 32;
__global__ void __launch_bounds__(kAssignThreads) route_assign_kernel(const float* logits, int32_t* ids,
                                                                     float* weights, int64_t T, int64_t E, int64_t k,
                                                                     bool normalize, int32_t* group_rows,
                                                                     int32_t* gather, int32_t* scatter) {
  start_after_previous();
  extern __shared__ float smem_f[];  // [T][E] routing scratch, then [E] assignment cursors
  const int warp = threadIdx.x >> 5;
  if (warp < T) route_token(logits, ids, weights, warp, E, k, normalize, smem_f + warp * E);
  __syncthreads();  // the block's writes of ids are visible to the whole block
  assign_block(ids, T * k, k, E, group_rows, gather, scatter, reinterpret_cast<int32_t*>(smem_f + T * E));
}

__global__ void swiglu_kernel(const bf16* gu, bf16* act, int64_t R, int64_t I) {
  start_after_previous();
  int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= R * I) return;
  int64_t r = idx / I, i = idx % I;
  float g = to_f32(gu[r * 2 * I + i]), u = to_f32(gu[r * 2 * I + I + i]);
  act[idx] = to_bf16(swiglu_value(g, u));
}

// The same per-element operations, 8 consecutive columns per thread with 16-byte loads and
// stores (I % 8 == 0, aligned rows): the scalar kernel was bound by its per-element 64-bit
// index division (prefill, notes v5).
__global__ void swiglu8_kernel(const bf16* gu, bf16* act, int64_t R, int64_t I) {
  start_after_previous();
  const int64_t idx = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (idx >= R * I) return;
  const int64_t r = idx / I, i = idx - r * I;
  const uint4 gv = *reinterpret_cast<const uint4*>(gu + r * 2 * I + i);
  const uint4 uv = *reinterpret_cast<const uint4*>(gu + r * 2 * I + I + i);
  const bf16* g8 = reinterpret_cast<const bf16*>(&gv);
  const bf16* u8 = reinterpret_cast<const bf16*>(&uv);
  uint4 ov;
  bf16* o8 = reinterpret_cast<bf16*>(&ov);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float g = to_f32(g8[e]), u = to_f32(u8[e]);
    o8[e] = to_bf16(swiglu_value(g, u));
  }
  *reinterpret_cast<uint4*>(act + idx) = ov;
}

// The token's k slots in ascending expert id, sorted once by thread 0 into s_order (shared).
__device__ __forceinline__ void slot_order_to_shared(const int32_t* ids, int k, int* s_order) {
  if (threadIdx.x == 0) sort_slots(ids, k, s_order);
  __syncthreads();
}

// Block per (token, 512 hidden columns): the token's slots sorted by expert id once into
// shared memory, then each thread sums two columns over the experts in that order.
constexpr int kCombineThreads = 256;
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const int32_t* ids, const float* weights,
                                                                  const bf16* y, bf16* x, int64_t H, int64_t k) {
  start_after_previous();
  __shared__ int s_order[8];
  const int64_t t = blockIdx.x;
  slot_order_to_shared(ids + t * k, int(k), s_order);
  const int64_t h0 = (int64_t(blockIdx.y) * kCombineThreads + threadIdx.x) * 2;
  if (h0 >= H) return;
  const bool pair = h0 + 1 < H;
  float o0 = 0.0f, o1 = 0.0f;
  for (int i = 0; i < k; ++i) {
    const int slot = s_order[i];
    const float w = weights[t * k + slot];
    const bf16* yr = y + (t * k + slot) * H + h0;
    o0 += w * to_f32(yr[0]);
    if (pair) o1 += w * to_f32(yr[1]);
  }
  x[t * H + h0] = to_bf16(to_f32(x[t * H + h0]) + round_bf16(o0));
  if (pair) x[t * H + h0 + 1] = to_bf16(to_f32(x[t * H + h0 + 1]) + round_bf16(o1));
}

// combine_kernel's per-column sums, 8 consecutive columns per thread with 16-byte loads and
// stores (H % 8 == 0, aligned rows): the same operations in the same order per column.
__global__ void __launch_bounds__(kCombineThreads) combine8_kernel(const int32_t* ids, const float* weights,
                                                                   const bf16* y, bf16* x, int64_t H, int64_t k) {
  start_after_previous();
  __shared__ int s_order[8];
  const int64_t t = blockIdx.x;
  slot_order_to_shared(ids + t * k, int(k), s_order);
  const int64_t h0 = (int64_t(blockIdx.y) * kCombineThreads + threadIdx.x) * 8;
  if (h0 >= H) return;
  float o[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) o[e] = 0.0f;
  for (int i = 0; i < k; ++i) {
    const int slot = s_order[i];
    const float w = weights[t * k + slot];
    const uint4 yv = *reinterpret_cast<const uint4*>(y + (t * k + slot) * H + h0);
    const bf16* y8 = reinterpret_cast<const bf16*>(&yv);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] += w * to_f32(y8[e]);
  }
  uint4 xv = *reinterpret_cast<const uint4*>(x + t * H + h0);
  bf16* x8 = reinterpret_cast<bf16*>(&xv);
#pragma unroll
  for (int e = 0; e < 8; ++e) x8[e] = to_bf16(to_f32(x8[e]) + round_bf16(o[e]));
  *reinterpret_cast<uint4*>(x + t * H + h0) = xv;
}

__global__ void __launch_bounds__(256) log_softmax_gather_kernel(const float* logits, const int32_t* targets,
                                                                 float* out, int64_t V) {
  start_after_previous();
  __shared__ MaxSumD scratch[8];
  const int64_t r = blockIdx.x;
  const float* row = logits + r * V;
  const float z = log_normalizer_block(row, V, 1.0f, false, scratch);
  if (threadIdx.x == 0) out[r] = targets[r] >= 0 ? row[targets[r]] - z : NAN;
}

__global__ void gather_log_probs_kernel(const float* logits, const float* lse, const int32_t* targets, float* out,
                                        int64_t R, int64_t V) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r < R) out[r] = targets[r] >= 0 ? logits[r * V + targets[r]] - lse[r] : NAN;
}

__global__ void __launch_bounds__(256) log_normalizer_kernel(const float* logits, float* lse, int64_t V) {
  __shared__ MaxSumD scratch[8];
  const float z = log_normalizer_block(logits + int64_t(blockIdx.x) * V, V, 1.0f, false, scratch);
  if (threadIdx.x == 0) lse[blockIdx.x] = z;
}

// Sampling over several blocks per row (a decode step samples few rows, and one block per
// row was latency-bound over 152k logits):
//   1. grid (R, 8): block c runs the canonical chunk c of the log-normalizer with the same
//      per-lane procedure as log_normalizer_block (one warp), its (max, sum) to the workspace;
//   2. grid (R, kSampleBlocks): the 8 chunk results folded by the same tree (so log_z has the
//      bits of the score path), then per thread one segment of kSampleSegLen.. logits: its
//      probability mass (sampled rows) or its arg max (greedy rows);
//   3. grid R: the segments in ascending order: the total mass, the draw (the first token whose
//      cumulative probability exceeds u * mass), or the arg max; the log-prob.
// Every step is a fixed function of the row alone.
constexpr int kSampleThreads = 256, kSampleBlocks = 32, kSampleSegs = kSampleThreads * kSampleBlocks;
constexpr int kSampleGroup = kSampleSegs / kSampleThreads;  // segments per thread in step 3

// Chunk c of the log-normalizer (the score path's per-chunk procedure), for one warp.
__device__ MaxSumD chunk_maxsum(const float* row, int64_t V, int c, float temp, bool scale) {
  const int64_t clen = (V + 7) / 8;
  const int64_t begin = c * clen, end = min(V, begin + clen);
  return chunk_maxsum_warp(row, begin, end, temp, scale);
}

// The tree of log_normalizer_block over the 8 chunk results.
__device__ __forceinline__ float fold_chunks(const MaxSumD* c) {
  MaxSumD a = combine(combine(c[0], c[1]), combine(c[2], c[3]));
  MaxSumD b = combine(combine(c[4], c[5]), combine(c[6], c[7]));
  MaxSumD r = combine(a, b);
  return r.max + logf(r.sum);
}

struct SampleWs {  // per row: 8 chunk results, then per segment a mass or an arg max
  MaxSumD chunks[8];
  float seg_value[kSampleSegs];
  int32_t seg_index[kSampleSegs];
};

__global__ void __launch_bounds__(32) sample_chunks_kernel(const float* logits, const DeviceSampleParams* params,
                                                           SampleWs* ws, int64_t V) {
  start_after_previous();
  const int64_t r = blockIdx.x;
  const int c = int(blockIdx.y);
  const float temp = params[r].temperature;
  const MaxSumD ms = chunk_maxsum(logits + r * V, V, c, temp, temp != 0.0f);
  if (threadIdx.x == 0) ws[r].chunks[c] = ms;
}

__global__ void __launch_bounds__(kSampleThreads) sample_segments_kernel(const float* logits,
                                                                         const DeviceSampleParams* params,
                                                                         SampleWs* ws, int64_t V) {
  start_after_previous();
  const int64_t r = blockIdx.x;
  const DeviceSampleParams prm = params[r];
  if (prm.temperature != 0.0f && prm.forced >= 0) return;
  const float* row = logits + r * V;
  const int seg = int(blockIdx.y) * kSampleThreads + int(threadIdx.x);
  const int64_t len = (V + kSampleSegs - 1) / kSampleSegs;
  const int64_t begin = min(V, seg * len), end = min(V, begin + len);
  SampleWs& w = ws[r];
  if (prm.temperature == 0.0f) {
    float bv = -INFINITY;
    int64_t bi = V;
    for (int64_t v = begin; v < end; ++v)
      if (row[v] > bv || bi == V) {
        bv = row[v];
        bi = v;
      }
    w.seg_value[seg] = bv;
    w.seg_index[seg] = int32_t(bi);
    return;
  }
  const float log_z = fold_chunks(w.chunks);
  float mass = 0.0f;
  for (int64_t v = begin; v < end; ++v) mass += exp_sfu(row[v] / prm.temperature - log_z);
  w.seg_value[seg] = mass;
}

__global__ void __launch_bounds__(kSampleThreads) sample_pick_kernel(const float* logits,
                                                                     const DeviceSampleParams* params,
                                                                     const SampleWs* ws, int32_t* tokens,
                                                                     float* logprobs, int64_t V) {
  start_after_previous();
  __shared__ float g_value[kSampleThreads];
  __shared__ int32_t g_index[kSampleThreads];
  const int64_t r = blockIdx.x;
  const float* row = logits + r * V;
  const DeviceSampleParams prm = params[r];
  const SampleWs& w = ws[r];
  const int tid = threadIdx.x;
  const float log_z = fold_chunks(w.chunks);
  if (prm.temperature != 0.0f && prm.forced >= 0) {
    if (tid == 0) {
      tokens[r] = prm.forced;
      logprobs[r] = row[prm.forced] / prm.temperature - log_z;
    }
    return;
  }
  const int s0 = tid * kSampleGroup;
  if (prm.temperature == 0.0f) {
    float bv = w.seg_value[s0];
    int32_t bi = w.seg_index[s0];
    for (int i = 1; i < kSampleGroup; ++i) {
      const int32_t oi = w.seg_index[s0 + i];
      if (oi < V && (w.seg_value[s0 + i] > bv || bi == V)) {  // ascending ids: ties keep the lower
        bv = w.seg_value[s0 + i];
        bi = oi;
      }
    }
    g_value[tid] = bv;
    g_index[tid] = bi;
    __syncthreads();
    if (tid == 0) {
      for (int i = 1; i < kSampleThreads; ++i)
        if (g_index[i] < V && (g_value[i] > bv || bi == V)) {
          bv = g_value[i];
          bi = g_index[i];
        }
      tokens[r] = bi;
      logprobs[r] = row[bi] - log_z;
    }
    return;
  }
  float mass = 0.0f;
  for (int i = 0; i < kSampleGroup; ++i) mass += w.seg_value[s0 + i];
  g_value[tid] = mass;
  __syncthreads();
  if (tid != 0) return;
  float total = 0.0f;
  for (int i = 0; i < kSampleThreads; ++i) total += g_value[i];
  const float target = prm.u * total;
  const int64_t len = (V + kSampleSegs - 1) / kSampleSegs;
  float cum = 0.0f;
  int64_t pick = V - 1;
  for (int g = 0; g < kSampleThreads; ++g) {
    if (!(cum + g_value[g] > target)) {
      cum += g_value[g];
      continue;
    }
    // The first group past the target; then its first segment past it; then the token.
    const int gs = g * kSampleGroup;
    pick = min(V, (gs + kSampleGroup) * len) - 1;
    for (int i = 0; i < kSampleGroup; ++i) {
      const float m = w.seg_value[gs + i];
      if (!(cum + m > target)) {
        cum += m;
        continue;
      }
      const int64_t b = min(V, (gs + i) * len), e = min(V, b + len);
      pick = e - 1;
      for (int64_t v = b; v < e; ++v) {
        cum += exp_sfu(row[v] / prm.temperature - log_z);
        if (cum > target) {
          pick = v;
          break;
        }
      }
      break;
    }
    break;
  }
  pick = max(int64_t(0), pick);
  tokens[r] = int32_t(pick);
  logprobs[r] = row[pick] / prm.temperature - log_z;
}

// The log-probs of every token under the distribution the row was drawn from, in place: the
// expressions of sample_pick_kernel, so the drawn token's entry is its log-prob bit for bit.
__global__ void __launch_bounds__(kSampleThreads) sampled_log_softmax_kernel(float* logits,
                                                                             const DeviceSampleParams* params,
                                                                             const SampleWs* ws, int64_t V) {
  const int64_t r = blockIdx.x;
  float* row = logits + r * V;
  const float temp = params[r].temperature;
  const float log_z = fold_chunks(ws[r].chunks);
  for (int64_t v = int64_t(blockIdx.y) * kSampleThreads + threadIdx.x; v < V; v += int64_t(gridDim.y) * kSampleThreads)
    row[v] = temp == 0.0f ? row[v] - log_z : row[v] / temp - log_z;
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
__global__ void fill_bf16_kernel(bf16* p, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float u = float(mix64(seed * 0x9E3779B97F4A7C15ull + uint64_t(i)) >> 40) * (1.0f / 16777216.0f);
    p[i] = to_bf16((2.0f * u - 1.0f) * scale + offset);
  }
}
__global__ void fill_f32_kernel(float* p, int64_t n, uint64_t seed, float scale, float offset) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float u = float(mix64(seed * 0x9E3779B97F4A7C15ull + uint64_t(i)) >> 40) * (1.0f / 16777216.0f);
    p[i] = round_bf16((2.0f * u - 1.0f) * scale + offset);
  }
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace

void embedding(const int32_t* ids, const bf16_t* table, bf16_t* x, int64_t T, int64_t H, cudaStream_t s) {
  if (T == 0) return;
  launch_after_previous(embedding_kernel, unsigned(T), 256, 0, s, ids, table, x, H);
}

void rmsnorm(const bf16_t* x, const float* w, bf16_t* out, int64_t rows, int64_t n, float eps, cudaStream_t s) {
  if (rows == 0) return;
  launch_after_previous(rmsnorm_kernel, unsigned(rows), kNormThreads, 0, s, x, w, out, n, eps);
}

void qk_norm_rope_store(const bf16_t* qkv, const float* q_norm, const float* k_norm, const float* rope_cos,
                        const float* rope_sin, bf16_t* q_out, const DeviceKvLayer& kv, const DeviceSlots& slots,
                        int64_t T, int64_t nq, int64_t nkv, int64_t D, float eps, cudaStream_t s) {
  if (T == 0) return;
  const int64_t heads = nq + 2 * nkv;
  LS_CHECK(T * heads * D < (int64_t(1) << 31), "cuda qk_norm_rope: ", T, " tokens of ", heads, " heads of ", D,
           " need 64-bit offsets");
  const int warps = 8;
  dim3 grid(unsigned(T), unsigned((heads + warps - 1) / warps));
  auto kernel = D == 64    ? qk_norm_rope_kernel<2>
                : D == 128 ? qk_norm_rope_kernel<4>
                : D == 256 ? qk_norm_rope_kernel<8>
                           : qk_norm_rope_kernel<0>;
  launch_after_previous(kernel, grid, warps * 32, 0, s, qkv, q_norm, k_norm, rope_cos, rope_sin, q_out, kv, slots,
                        int(nq), int(nkv), int(D), eps);
}

void paged_attention(const bf16_t* q, bf16_t* out, const DeviceKvLayer& kv, const DeviceSlots& slots, int64_t T,
                     int64_t nq, float scale, cudaStream_t s, float* lse) {
  if (T == 0) return;
  const int64_t D = kv.head_dim, G = nq / kv.kv_heads;
  if (G * kv.kv_heads == nq && tensor_core_attention_supported(D, G))
    return flash_attention(q, out, kv, slots, nq, scale, s, AttentionKernel::automatic, lse);
  LS_CHECK(D % 8 == 0 && D <= kMaxHeadDim, "cuda attention: head_dim must be a multiple of 8 and <= ",
           kMaxHeadDim, ", got ", D);
  LS_CHECK(G >= 1 && G <= 32 && G * kv.kv_heads == nq, "cuda attention: bad GQA grouping ", nq, "/", kv.kv_heads);
  const size_t smem = size_t(kBlock) * (D + 2) * 2 + 32 + size_t(kBlock) * D * 2 + size_t(G) * D * 4;
  static const bool configured = [] {
    LS_CUDA_CHECK(cudaFuncSetAttribute(attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024));
    return true;
  }();
  (void)configured;
  dim3 grid(unsigned(T), unsigned(kv.kv_heads));
  launch_after_previous(attention_kernel, grid, unsigned(G * 32), smem, s, q, out, kv, slots, nq, scale);
}

void route_topk(const float* logits, int32_t* ids, float* weights, int64_t T, int64_t E, int64_t k, bool normalize,
                cudaStream_t s) {
  if (T == 0) return;
  LS_CHECK(k >= 1 && k <= 8 && k <= E, "cuda route_topk: num_experts_per_tok must be in 1..8, got ", k);
  launch_after_previous(route_topk_kernel, unsigned((T + kRouteWarps - 1) / kRouteWarps), kRouteWarps * 32,
                        size_t(kRouteWarps) * E * sizeof(float), s, logits, ids, weights, T, E, k, normalize);
}

void route_and_assign(const float* logits, int32_t* ids, float* weights, int64_t T, int64_t E, int64_t k,
                      bool normalize, int32_t* counts, int32_t* group_rows, int32_t* gather, int32_t* scatter,
                      cudaStream_t s) {
  const size_t smem = size_t(T * E + E) * sizeof(float);
  if (T == 0 || T > kRouteAssignMaxTokens || smem > 48 * 1024) {
    route_topk(logits, ids, weights, T, E, k, normalize, s);
    assign_experts(ids, T, k, E, counts, group_rows, gather, scatter, s);
    return;
  }
  LS_CHECK(k >= 1 && k <= 8 && k <= E, "cuda route_topk: num_experts_per_tok must be in 1..8, got ", k);
  launch_after_previous(route_assign_kernel, 1, kAssignThreads, smem, s, logits, ids, weights, T, E, k, normalize,
                        group_rows, gather, scatter);
}

int64_t assign_workspace_ints(int64_t pairs, int64_t E) {
  return parallel_assign(pairs, E) ? ceil_div(pairs, kAssignBlockPairs) * E : E;
}

void assign_experts(const int32_t* ids, int64_t T, int64_t k, int64_t E, int32_t* counts, int32_t* group_rows,
                    int32_t* gather, int32_t* scatter, cudaStream_t s) {
  LS_CHECK(E <= 12288, "cuda assign_experts: at most 12288 experts (48 KB of shared counters), got ", E);
  const int64_t n = T * k, smem = E * int64_t(sizeof(int32_t));
  if (!parallel_assign(n, E))  // one launch: decode steps are latency-bound
    return launch_after_previous(assign_experts_kernel, 1, kAssignThreads, size_t(smem), s, ids, n, k, E, group_rows,
                                 gather, scatter);
  const int64_t blocks = ceil_div(n, kAssignBlockPairs);
  LS_CHECK(blocks <= 0x7fffffff, "cuda assign_experts: too many pairs, ", n);
  launch_after_previous(expert_histogram_kernel, unsigned(blocks), kAssignBlockThreads, size_t(smem), s, ids, n, E,
                        counts);
  launch_after_previous(expert_offsets_kernel, 1, kAssignThreads, size_t(smem), s, counts, blocks, E, group_rows);
  launch_after_previous(expert_place_kernel, unsigned(blocks), kAssignBlockThreads,
                        size_t(smem) * (kAssignBlockThreads / 32), s, ids, n, k, E, static_cast<const int32_t*>(counts),
                        gather, scatter);
}

void swiglu(const bf16_t* gu, bf16_t* act, int64_t R, int64_t I, cudaStream_t s) {
  if (R * I == 0) return;
  // Large steps only (decode keeps more, lighter threads); the same bits either way.
  if (R * I >= (int64_t(1) << 20) && I % 8 == 0 &&
      ((reinterpret_cast<uintptr_t>(gu) | reinterpret_cast<uintptr_t>(act)) & 15) == 0)
    return launch_after_previous(swiglu8_kernel, blocks_for(R * I / 8, 256), 256, 0, s, gu, act, R, I);
  launch_after_previous(swiglu_kernel, blocks_for(R * I, 256), 256, 0, s, gu, act, R, I);
}

void combine_experts_residual(const int32_t* ids, const float* weights, const bf16_t* y, bf16_t* x, int64_t T,
                              int64_t H, int64_t k, cudaStream_t s) {
  if (T == 0) return;
  LS_CHECK(k >= 1 && k <= 8, "cuda combine_experts: num_experts_per_tok must be in 1..8, got ", k);
  // Large steps only (decode keeps 4 blocks per token); the same bits either way.
  if (T >= 256 && H % 8 == 0 && ((reinterpret_cast<uintptr_t>(y) | reinterpret_cast<uintptr_t>(x)) & 15) == 0) {
    dim3 grid8(unsigned(T), unsigned((H + 8 * kCombineThreads - 1) / (8 * kCombineThreads)));
    return launch_after_previous(combine8_kernel, grid8, kCombineThreads, 0, s, ids, weights, y, x, H, k);
  }
  dim3 grid(unsigned(T), unsigned((H + 2 * kCombineThreads - 1) / (2 * kCombineThreads)));
  launch_after_previous(combine_kernel, grid, kCombineThreads, 0, s, ids, weights, y, x, H, k);
}

void log_softmax_gather(const float* logits, const int32_t* targets, float* out, int64_t R, int64_t V,
                        cudaStream_t s) {
  if (R == 0) return;
  launch_after_previous(log_softmax_gather_kernel, unsigned(R), 256, 0, s, logits, targets, out, V);
}

void log_normalizer_rows(const float* logits, float* lse, int64_t R, int64_t V, cudaStream_t s) {
  if (R == 0) return;
  log_normalizer_kernel<<<unsigned(R), 256, 0, s>>>(logits, lse, V);
  LS_CUDA_LAUNCHED();
}

void gather_log_probs(const float* logits, const float* lse, const int32_t* targets, float* out, int64_t R, int64_t V,
                      cudaStream_t s) {
  if (R == 0) return;
  gather_log_probs_kernel<<<unsigned(ceil_div(R, int64_t(256))), 256, 0, s>>>(logits, lse, targets, out, R, V);
  LS_CUDA_LAUNCHED();
}

int64_t sample_workspace_floats(int64_t R) {
  return R * int64_t((sizeof(SampleWs) + sizeof(float) - 1) / sizeof(float));
}

void sample_rows(const float* logits, const DeviceSampleParams* params, int32_t* tokens, float* logprobs, int64_t R,
                 int64_t V, float* workspace, cudaStream_t s) {
  if (R == 0) return;
  LS_CHECK(V > 0 && V < (int64_t(1) << 31), "sample_rows: vocabulary of ", V, " entries");
  auto* ws = reinterpret_cast<SampleWs*>(workspace);
  launch_after_previous(sample_chunks_kernel, dim3(unsigned(R), 8), 32, 0, s, logits, params, ws, V);
  launch_after_previous(sample_segments_kernel, dim3(unsigned(R), kSampleBlocks), kSampleThreads, 0, s, logits, params,
                        ws, V);
  launch_after_previous(sample_pick_kernel, unsigned(R), kSampleThreads, 0, s, logits, params, ws, tokens, logprobs,
                        V);
}

void sampled_log_softmax_rows(float* logits, const DeviceSampleParams* params, const float* workspace, int64_t R,
                              int64_t V, cudaStream_t s) {
  if (R == 0) return;
  const auto* ws = reinterpret_cast<const SampleWs*>(workspace);
  const unsigned blocks = unsigned(std::min<int64_t>((V + kSampleThreads - 1) / kSampleThreads, 64));
  sampled_log_softmax_kernel<<<dim3(unsigned(R), blocks), kSampleThreads, 0, s>>>(logits, params, ws, V);
  LS_CUDA_LAUNCHED();
}

void fill_random_bf16(bf16_t* p, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t s) {
  fill_bf16_kernel<<<1024, 256, 0, s>>>(p, n, seed, scale, offset);
  LS_CUDA_LAUNCHED();
}
void fill_random_f32(float* p, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t s) {
  fill_f32_kernel<<<1024, 256, 0, s>>>(p, n, seed, scale, offset);
  LS_CUDA_LAUNCHED();
}

}  // namespace lockstep::cuda
