// Causal GQA attention read through a paged KV cache (docs/numerics.md, rule 3).
#pragma once
#include <cstdint>

namespace lockstep {

// Keys and values are visited in fixed blocks of kAttnBlock absolute positions
// (0, B, 2B, ...), in ascending order, with an fp32 online softmax. The trainer's whole
// sequence forward and the engine's decode walk the same blocks, so they agree bitwise.
constexpr int64_t kAttnBlock = 64;

// One layer's KV cache: k and v are [num_pages, page_size, kv_heads, head_dim].
struct PagedKvLayer {
  float* k = nullptr;
  float* v = nullptr;
  int64_t num_pages = 0;
  int64_t page_size = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;
};

// Where each token of a step lives: its position and its sequence's page table.
struct TokenSlots {
  const int32_t* positions = nullptr;          // [T]
  const int32_t* const* page_tables = nullptr; // [T] -> that token's sequence's page list
};

}  // namespace lockstep

namespace lockstep::cpu {

// Writes k_new/v_new [T, kv_heads, head_dim] at each token's (sequence, position).
void kv_write(const PagedKvLayer& kv, const TokenSlots& slots, const float* k_new, const float* v_new, int64_t T);

// out[t, h, :] = softmax(q[t, h] . K[0..pos(t)] * scale) V over the token's own sequence.
// q is [T, heads, head_dim]; query head h reads KV head h / (heads / kv_heads).
void paged_attention(const float* q, float* out, const PagedKvLayer& kv, const TokenSlots& slots, int64_t T,
                     int64_t heads, float scale);

}  // namespace lockstep::cpu
