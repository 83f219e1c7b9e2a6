// The non-GEMM forward ops of the bfloat16 recipe on the GPU. Each op computes a row (a
// token, a head) by one fixed procedure that never looks at other rows, so results are
// batch invariant by construction (docs/numerics.md). The GPU procedures need not equal
// the CPU ones bit for bit; they are fixed within this backend.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lockstep::cuda {

using bf16_t = __nv_bfloat16;

// Where each token of a step lives: position, sequence, and the sequences' page tables
// ([num_seqs, *table_stride] page ids). All device pointers, so a captured CUDA graph can be
// replayed with new contents.
struct DeviceSlots {
  const int32_t* positions = nullptr;
  const int32_t* seq_of_token = nullptr;
  const int32_t* page_tables = nullptr;
  const int32_t* table_stride = nullptr;
  // Attention tiles: num_tiles (device) entries of (first token, tokens), each a run of
  // consecutive tokens of one sequence; max_tiles (host) bounds num_tiles and sizes the
  // grid (a function of the step size only, so a captured graph stays valid).
  const int32_t* tiles = nullptr;
  const int32_t* num_tiles = nullptr;
  int64_t max_tiles = 0;
};

// One layer's bf16 KV cache: [num_pages, page_size, kv_heads, head_dim].
struct DeviceKvLayer {
  bf16_t* k = nullptr;
  bf16_t* v = nullptr;
  int64_t page_size = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
};

// x[t] = table[ids[t]].
void embedding(const int32_t* ids, const bf16_t* table, bf16_t* x, int64_t T, int64_t H, cudaStream_t s);

// out = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) per row of n.
void rmsnorm(const bf16_t* x, const float* w, bf16_t* out, int64_t rows, int64_t n, float eps, cudaStream_t s);

// From qkv [T, (nq + 2 nkv) * D]: per head RMSNorm (q_norm / k_norm), rotary embedding, bf16
// casts as in the recipe; q to q_out [T, nq, D]; k and v written to the cache slot of the token.
void qk_norm_rope_store(const bf16_t* qkv, const float* q_norm, const float* k_norm, const float* rope_cos,
                        const float* rope_sin, bf16_t* q_out, const DeviceKvLayer& kv, const DeviceSlots& slots,
                        int64_t T, int64_t nq, int64_t nkv, int64_t D, float eps, cudaStream_t s);

// out[t, h] = bf16(softmax(q . K[0..pos] * scale) V) over blocks of 64 absolute positions in
// ascending order with an fp32 online softmax; the same walk for prefill and decode. Tensor
// cores (attention.h) where the head_dim has a kernel, else CUDA cores; chosen by shape only.
// lse (or null): on tensor cores (tensor_core_attention_supported), flash_attention's per-row
// log-sum-exp, [T, nq]; the CUDA-core kernel leaves it untouched.
void paged_attention(const bf16_t* q, bf16_t* out, const DeviceKvLayer& kv, const DeviceSlots& slots, int64_t T,
                     int64_t nq, float scale, cudaStream_t s, float* lse = nullptr);

// MoE routing: fp32 softmax of the router logits, top k by value (ties to the lower id),
// renormalised when asked. ids/weights are [T, k] in selection order.
void route_topk(const float* logits, int32_t* ids, float* weights, int64_t T, int64_t E, int64_t k, bool normalize,
                cudaStream_t s);

// Groups the T*k (token, slot) pairs by expert: group_rows [E + 1], and per row the token
// to read (gather) and the output row token * k + slot (scatter). `counts` is scratch of
// assign_workspace_ints(T * k, E) ints. The order of rows inside a group is not fixed (the
// GEMM is batch invariant per row).
int64_t assign_workspace_ints(int64_t pairs, int64_t E);
void assign_experts(const int32_t* ids, int64_t T, int64_t k, int64_t E, int32_t* counts, int32_t* group_rows,
                    int32_t* gather, int32_t* scatter, cudaStream_t s);

// route_topk then assign_experts; small steps in one launch (the same per-token and
// assignment procedures). `counts` as for assign_experts.
void route_and_assign(const float* logits, int32_t* ids, float* weights, int64_t T, int64_t E, int64_t k,
                      bool normalize, int32_t* counts, int32_t* group_rows, int32_t* gather, int32_t* scatter,
                      cudaStream_t s);

// act[r, i] = bf16(silu(g) * u) with gu [R, 2I] = [gate | up] of each row.
void swiglu(const bf16_t* gu, bf16_t* act, int64_t R, int64_t I, cudaStream_t s);

// x[t] = bf16(x[t] + bf16(sum over the token's experts in ascending id of w * y[t * k + slot])).
void combine_experts_residual(const int32_t* ids, const float* weights, const bf16_t* y, bf16_t* x, int64_t T,
                              int64_t H, int64_t k, cudaStream_t s);

// out[r] = logits[r, target[r]] - log_normalizer(logits[r]) (canonical 8-chunk log-sum-exp);
// NaN where target < 0.
void log_softmax_gather(const float* logits, const int32_t* targets, float* out, int64_t R, int64_t V,
                        cudaStream_t s);

// Per row: temperature 0 = argmax (ties to the lower id); otherwise z = logits / T and the
// token is the first, in ascending id order, whose cumulative probability exceeds u * mass.
// logprob = z[token] - log_normalizer(z) (T = 1 when greedy). top-k / top-p are not done here:
// the caller picks such a token elsewhere and passes it as `forced` (>= 0; temperature > 0),
// which skips the draw and gives that token's log-prob by the same arithmetic.
struct DeviceSampleParams {
  float temperature;
  float u;
  int32_t forced = -1;
};
// `workspace`: sample_workspace_floats(R) floats of device scratch (several blocks per row).
int64_t sample_workspace_floats(int64_t R);
void sample_rows(const float* logits, const DeviceSampleParams* params, int32_t* tokens, float* logprobs, int64_t R,
                 int64_t V, float* workspace, cudaStream_t s);

// After sample_rows(logits, params, ..., workspace): replaces each row of `logits` by the log-probs
// of the distribution its token was drawn from, z - log_z (z = logits / T, T = 1 when greedy),
// with the draw's own log-normaliser from `workspace`: the drawn (or forced) token's entry has
// the bits of its returned log-prob, and at T = 1 or greedy every entry is log_softmax_gather's.
void sampled_log_softmax_rows(float* logits, const DeviceSampleParams* params, const float* workspace, int64_t R,
                              int64_t V, cudaStream_t s);

// Fills a bf16 buffer with uniform values in [-scale, scale) + offset, deterministic in seed.
void fill_random_bf16(bf16_t* p, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t s);
void fill_random_f32(float* p, int64_t n, uint64_t seed, float scale, float offset, cudaStream_t s);

}  // namespace lockstep::cuda
