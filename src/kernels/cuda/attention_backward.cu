// Attention backward on the GPU (backward.h): cpu::paged_attention_backward's two passes, one
// warp per (query token, head) and per (key token, KV head), reading K/V through the page
// table of the bf16 cache. The sums over keys and queries run in the CPU's order (keys
// ascending; queries ascending, then the group's heads), each lane on its own dimensions; the
// dot products are the warp's fixed procedure (Lanes::dot), so the values differ from the CPU's
// by rounding and are one fixed function of the item's inputs.
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/row_ops.cuh"

namespace lockstep::cuda {

namespace {

constexpr int kBlock = 64;  // the contract's absolute KV block (docs/numerics.md, rule 3)
constexpr int kWarps = 4;   // items (warps) per thread block
constexpr int kMaxPer = 8;  // head_dim <= 32 * kMaxPer

__device__ __forceinline__ const bf16* kv_row(const bf16* base, const DeviceKvLayer& kv, const DeviceSlots& slots,
                                              int64_t t, int64_t pos, int64_t g) {
  return base + (slot_of(slots, t, pos, kv.page_size) * kv.kv_heads + g) * kv.head_dim;
}

// One warp per item; lane l holds the dimensions l, l + 32, ... (PER of them, fewer past
// head_dim). A dot product is each lane's sum over its dimensions in that order, then the
// butterfly of warp_sum: one fixed procedure whatever the launch.
template <int PER>
struct Lanes {
  float v[PER];
  __device__ __forceinline__ void load(const bf16* p, int lane, int D) {
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = lane + 32 * i < D ? to_f32(p[lane + 32 * i]) : 0.0f;
  }
  __device__ __forceinline__ void load(const float* p, int lane, int D) {
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = lane + 32 * i < D ? p[lane + 32 * i] : 0.0f;
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = 0.0f;
  }
  __device__ __forceinline__ float dot(const Lanes& o) const {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) s += v[i] * o.v[i];
    return warp_sum(s);
  }
  __device__ __forceinline__ void add_scaled(float a, const Lanes& o) {  // this += a * o
#pragma unroll
    for (int i = 0; i < PER; ++i) v[i] = v[i] + a * o.v[i];
  }
  __device__ __forceinline__ void store(float* p, int lane, int D) const {
#pragma unroll
    for (int i = 0; i < PER; ++i)
      if (lane + 32 * i < D) p[lane + 32 * i] = v[i];
  }
};

// Pass 1, per (query token, head): the log-sum-exp by the forward's block walk, D_i =
// dout_i . out_i, and dq_i = sum over keys ascending of (scale ds_ij) k_j.
template <int PER>
__global__ void __launch_bounds__(32 * kWarps)
    attention_dq_kernel(const bf16* q, const bf16* out, const float* dout, DeviceKvLayer kv, DeviceSlots slots,
                        int64_t T, int64_t heads, float scale, float* lse, float* delta, float* dq) {
  __shared__ float block_scores[kWarps][kBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t item = int64_t(blockIdx.x) * kWarps + warp;
  if (item >= T * heads) return;
  const int D = int(kv.head_dim);
  const int64_t t = item / heads, h = item % heads, g = h / (heads / kv.kv_heads);
  Lanes<PER> qv, dov, ov, kj, vj, acc;
  qv.load(q + item * D, lane, D);
  dov.load(dout + item * D, lane, D);
  ov.load(out + item * D, lane, D);
  const int64_t pos = slots.positions[t];
  float* scores = block_scores[warp];
  float m = -INFINITY, l = 0.0f;
  for (int64_t b0 = 0; b0 <= pos; b0 += kBlock) {
    const int64_t b1 = min(pos + 1, b0 + kBlock);
    float block_max = -INFINITY;
    for (int64_t j = b0; j < b1; ++j) {
      kj.load(kv_row(kv.k, kv, slots, t, j, g), lane, D);
      const float sc = qv.dot(kj) * scale;
      if (lane == 0) scores[j - b0] = sc;
      block_max = fmaxf(block_max, sc);
    }
    __syncwarp();
    const float m_new = fmaxf(m, block_max);
    l *= expf(m - m_new);
    for (int64_t j = b0; j < b1; ++j) l += expf(scores[j - b0] - m_new);
    m = m_new;
    __syncwarp();
  }
  const float L = m + logf(l);
  const float Di = dov.dot(ov);
  if (lane == 0) lse[item] = L, delta[item] = Di;
  acc.zero();
  for (int64_t j = 0; j <= pos; ++j) {
    kj.load(kv_row(kv.k, kv, slots, t, j, g), lane, D);
    vj.load(kv_row(kv.v, kv, slots, t, j, g), lane, D);
    const float p = expf(qv.dot(kj) * scale - L);
    const float ds = p * (dov.dot(vj) - Di) * scale;
    acc.add_scaled(ds, kj);
  }
  acc.store(dq + item * D, lane, D);
}

// Pass 2, per (key token, KV head): dk_j and dv_j over the queries of j's sequence at or after
// its position, ascending, then the group's heads ascending.
template <int PER>
__global__ void __launch_bounds__(32 * kWarps)
    attention_dkv_kernel(const bf16* q, const float* dout, DeviceKvLayer kv, DeviceSlots slots,
                         const int32_t* seq_first, const int32_t* seq_tokens, int64_t T, int64_t heads, float scale,
                         const float* lse, const float* delta, float* dk, float* dv) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const int64_t nkv = kv.kv_heads, item = int64_t(blockIdx.x) * kWarps + warp;
  if (item >= T * nkv) return;
  const int D = int(kv.head_dim);
  const int64_t j = item / nkv, g = item % nkv, group = heads / nkv;
  const int64_t pos = slots.positions[j];
  Lanes<PER> kj, vj, qv, dov, acc_k, acc_v;
  kj.load(kv_row(kv.k, kv, slots, j, pos, g), lane, D);
  vj.load(kv_row(kv.v, kv, slots, j, pos, g), lane, D);
  const int64_t seq = slots.seq_of_token[j];
  const int32_t* toks = seq_tokens + seq_first[seq];
  const int64_t len = seq_first[seq + 1] - seq_first[seq];
  acc_k.zero();
  acc_v.zero();
  for (int64_t p = pos; p < len; ++p) {
    const int64_t i = toks[p];
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const int64_t qi = i * heads + h;
      qv.load(q + qi * D, lane, D);
      dov.load(dout + qi * D, lane, D);
      const float pr = expf(qv.dot(kj) * scale - lse[qi]);
      const float ds = pr * (dov.dot(vj) - delta[qi]) * scale;
      acc_v.add_scaled(pr, dov);
      acc_k.add_scaled(ds, qv);
    }
  }
  acc_k.store(dk + item * D, lane, D);
  acc_v.store(dv + item * D, lane, D);
}

template <int PER>
void launch(const bf16_t* q, const bf16_t* out, const float* dout, const DeviceKvLayer& kv, const DeviceSlots& slots,
            const int32_t* seq_first, const int32_t* seq_tokens, int64_t T, int64_t heads, float scale, float* lse,
            float* delta, float* dq, float* dk, float* dv, cudaStream_t s) {
  attention_dq_kernel<PER><<<unsigned(ceil_div(T * heads, kWarps)), 32 * kWarps, 0, s>>>(q, out, dout, kv, slots, T,
                                                                                         heads, scale, lse, delta, dq);
  LS_CUDA_LAUNCHED();
  attention_dkv_kernel<PER><<<unsigned(ceil_div(T * kv.kv_heads, kWarps)), 32 * kWarps, 0, s>>>(
      q, dout, kv, slots, seq_first, seq_tokens, T, heads, scale, lse, delta, dk, dv);
  LS_CUDA_LAUNCHED();
}

}  // namespace

void paged_attention_backward(const bf16_t* q, const bf16_t* out, const float* dout, const DeviceKvLayer& kv,
                              const DeviceSlots& slots, const int32_t* seq_first, const int32_t* seq_tokens, int64_t T,
                              int64_t heads, float scale, float* lse_ws, float* delta_ws, float* dq, float* dk,
                              float* dv, cudaStream_t s) {
  const int64_t D = kv.head_dim;
  LS_CHECK(D >= 1 && D <= 32 * kMaxPer, "attention backward: head_dim ", D, " outside [1, ", 32 * kMaxPer, "]");
  LS_CHECK(heads % kv.kv_heads == 0, "attention backward: ", heads, " heads over ", kv.kv_heads, " KV heads");
  if (T == 0) return;
  const int per = int(ceil_div(D, 32));
  auto run = per <= 1 ? launch<1> : per <= 2 ? launch<2> : per <= 4 ? launch<4> : launch<8>;
  run(q, out, dout, kv, slots, seq_first, seq_tokens, T, heads, scale, lse_ws, delta_ws, dq, dk, dv, s);
}

}  // namespace lockstep::cuda
