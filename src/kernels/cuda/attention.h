// Paged attention on tensor cores for head_dim 16, 32, 64 or 128: the same kernel for
// prefill and decode (see attention.cu for why the bits do not depend on the tile).
#pragma once
#include <cstdint>

#include "kernels/cuda/ops.h"

namespace lockstep::cuda {

// Query rows (tokens x query heads of one kv head) per tile.
constexpr int kTileRows = 64;

bool tensor_core_attention_supported(int64_t head_dim, int64_t group);

// Tokens per tile for `group` query heads per kv head: tiles are cut from each run of
// consecutive tokens of one sequence, at most this many tokens each.
int64_t attention_tile_tokens(int64_t group);

void flash_attention(const bf16_t* q, bf16_t* out, const DeviceKvLayer& kv, const DeviceSlots& slots, int64_t nq,
                     float scale, cudaStream_t s);

}  // namespace lockstep::cuda
