// Attention backward on the GPU (backward.h): cpu::paged_attention_backward's two passes, one
// thread per (query token, head) and per (key token, KV head), reading K/V through the page
// table of the bf16 cache. Each thread's sums run in the CPU's order (keys ascending; queries
// ascending, then the group's heads), with the dot procedure of backward_common.cuh.
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/row_ops.cuh"

namespace lockstep::cuda {

namespace {

constexpr int kBlock = 64;    // the contract's absolute KV block (docs/numerics.md, rule 3)
constexpr int kMaxDim = 256;  // per-thread accumulators

__device__ __forceinline__ const bf16* kv_row(const bf16* base, const DeviceKvLayer& kv, const DeviceSlots& slots,
                                              int64_t t, int64_t pos, int64_t g) {
  return base + (slot_of(slots, t, pos, kv.page_size) * kv.kv_heads + g) * kv.head_dim;
}

// Pass 1: the log-sum-exp by the forward's block walk, D_i = dout_i . out_i, and dq_i.
__global__ void attention_dq_kernel(const bf16* q, const bf16* out, const float* dout, DeviceKvLayer kv,
                                    DeviceSlots slots, int64_t T, int64_t heads, float scale, float* lse, float* delta,
                                    float* dq) {
  const int64_t item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= T * heads) return;
  const int64_t d = kv.head_dim, t = item / heads, h = item % heads, g = h / (heads / kv.kv_heads);
  const bf16* qv = q + item * d;
  const float* dov = dout + item * d;
  const int64_t pos = slots.positions[t];
  float m = -INFINITY, l = 0.0f;
  float scores[kBlock];
  for (int64_t b0 = 0; b0 <= pos; b0 += kBlock) {
    const int64_t b1 = min(pos + 1, b0 + kBlock);
    float block_max = -INFINITY;
    for (int64_t j = b0; j < b1; ++j) {
      scores[j - b0] = dot_lanes(qv, kv_row(kv.k, kv, slots, t, j, g), d) * scale;
      block_max = fmaxf(block_max, scores[j - b0]);
    }
    const float m_new = fmaxf(m, block_max);
    l *= expf(m - m_new);
    for (int64_t j = b0; j < b1; ++j) l += expf(scores[j - b0] - m_new);
    m = m_new;
  }
  const float L = m + logf(l);
  const float D = dot_lanes(dov, out + item * d, d);
  lse[item] = L;
  delta[item] = D;
  float acc[kMaxDim];
  for (int64_t i = 0; i < d; ++i) acc[i] = 0.0f;
  for (int64_t j = 0; j <= pos; ++j) {
    const bf16* kj = kv_row(kv.k, kv, slots, t, j, g);
    const float p = expf(dot_lanes(qv, kj, d) * scale - L);
    const float ds = p * (dot_lanes(dov, kv_row(kv.v, kv, slots, t, j, g), d) - D) * scale;
    for (int64_t i = 0; i < d; ++i) acc[i] = acc[i] + ds * to_f32(kj[i]);
  }
  for (int64_t i = 0; i < d; ++i) dq[item * d + i] = acc[i];
}

// Pass 2: dk_j and dv_j over the queries of j's sequence at or after its position.
__global__ void attention_dkv_kernel(const bf16* q, const float* dout, DeviceKvLayer kv, DeviceSlots slots,
                                     const int32_t* seq_first, const int32_t* seq_tokens, int64_t T, int64_t heads,
                                     float scale, const float* lse, const float* delta, float* dk, float* dv) {
  const int64_t nkv = kv.kv_heads, item = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= T * nkv) return;
  const int64_t d = kv.head_dim, j = item / nkv, g = item % nkv, group = heads / nkv;
  const int64_t pos = slots.positions[j];
  const bf16* kj = kv_row(kv.k, kv, slots, j, pos, g);
  const bf16* vj = kv_row(kv.v, kv, slots, j, pos, g);
  const int64_t seq = slots.seq_of_token[j];
  const int32_t* toks = seq_tokens + seq_first[seq];
  const int64_t len = seq_first[seq + 1] - seq_first[seq];
  float acc_k[kMaxDim], acc_v[kMaxDim];
  for (int64_t x = 0; x < d; ++x) acc_k[x] = acc_v[x] = 0.0f;
  for (int64_t p = pos; p < len; ++p) {
    const int64_t i = toks[p];
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const int64_t qi = i * heads + h;
      const bf16* qv = q + qi * d;
      const float* dov = dout + qi * d;
      const float pr = expf(dot_lanes(qv, kj, d) * scale - lse[qi]);
      const float ds = pr * (dot_lanes(dov, vj, d) - delta[qi]) * scale;
      for (int64_t x = 0; x < d; ++x) {
        acc_v[x] = acc_v[x] + pr * dov[x];
        acc_k[x] = acc_k[x] + ds * to_f32(qv[x]);
      }
    }
  }
  for (int64_t x = 0; x < d; ++x) {
    dk[item * d + x] = acc_k[x];
    dv[item * d + x] = acc_v[x];
  }
}

}  // namespace

void paged_attention_backward(const bf16_t* q, const bf16_t* out, const float* dout, const DeviceKvLayer& kv,
                              const DeviceSlots& slots, const int32_t* seq_first, const int32_t* seq_tokens, int64_t T,
                              int64_t heads, float scale, float* lse_ws, float* delta_ws, float* dq, float* dk,
                              float* dv, cudaStream_t s) {
  LS_CHECK(kv.head_dim <= kMaxDim, "attention backward: head_dim ", kv.head_dim, " exceeds ", kMaxDim);
  LS_CHECK(heads % kv.kv_heads == 0, "attention backward: ", heads, " heads over ", kv.kv_heads, " KV heads");
  if (T == 0) return;
  attention_dq_kernel<<<unsigned(ceil_div(T * heads, 64)), 64, 0, s>>>(q, out, dout, kv, slots, T, heads, scale, lse_ws,
                                                                       delta_ws, dq);
  LS_CUDA_LAUNCHED();
  attention_dkv_kernel<<<unsigned(ceil_div(T * kv.kv_heads, 64)), 64, 0, s>>>(
      q, dout, kv, slots, seq_first, seq_tokens, T, heads, scale, lse_ws, delta_ws, dk, dv);
  LS_CUDA_LAUNCHED();
}

}  // namespace lockstep::cuda
