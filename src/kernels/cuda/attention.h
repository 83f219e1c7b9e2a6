// Paged attention on tensor cores for head_dim 16, 32, 64 or 128: the same kernel for
// prefill and decode (see attention.cu for why the bits do not depend on the tile), on
// warpgroup MMA for head_dim 64 and 128.
#pragma once
#include <cstdint>

#include "kernels/cuda/ops.h"

namespace lockstep::cuda {

// Query rows (tokens x query heads of one kv head) per tile.
constexpr int kTileRows = 64;
// Positions per KV block: the contract's absolute blocks, which a tile walks in order up to its
// last position.
constexpr int kAttentionKvBlock = 64;

bool tensor_core_attention_supported(int64_t head_dim, int64_t group);

// Tokens per tile for `group` query heads per kv head: tiles are cut from each run of
// consecutive tokens of one sequence, at most this many tokens each.
int64_t attention_tile_tokens(int64_t group);

// Which kernel: warpgroup MMA (head_dim 64 and 128, what automatic takes there) or mma.sync
// (every head_dim). Both give the same bits; the choice is for tests and measurements.
enum class AttentionKernel { automatic, mma_sync, wgmma };
bool attention_takes_wgmma(int64_t head_dim);

// lse (or null): [T, nq] floats, each query row's log-sum-exp of its scaled scores (the
// online softmax's m scale + ln(l)), which the backward takes as its normaliser.
void flash_attention(const bf16_t* q, bf16_t* out, const DeviceKvLayer& kv, const DeviceSlots& slots, int64_t nq,
                     float scale, cudaStream_t s, AttentionKernel kernel = AttentionKernel::automatic,
                     float* lse = nullptr);

}  // namespace lockstep::cuda
