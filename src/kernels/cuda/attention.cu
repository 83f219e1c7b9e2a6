// Paged attention on tensor cores (bf16 in, fp32 accumulate; warpgroup MMA for head_dim 64
// and 128, mma.sync m16n8k16 otherwise, the same bits), one kernel for prefill and decode, so
// the engine's decode and the trainer's whole-sequence forward give the same bits
// (docs/numerics.md, D2).
//
// A CTA takes one tile (up to kTileRows query rows = tokens x query heads of one kv head, all
// tokens of one sequence) and walks the KV blocks 0, 64, 128, ... of absolute positions in
// ascending order up to the tile's last position, K/V read through the page table into
// shared memory. Per query row, the arithmetic is fixed: S = q K^T over head_dim in ascending
// k16 steps (mma rows never mix, so a row's scores do not depend on the other rows of the
// tile), keys after the row's own position masked to -inf, an fp32 online softmax of the
// unscaled scores s (P = 2^(s c - m c), c = scale log2 e, on the special function unit) with
// the row max and the row sum taken in a fixed lane order, P rounded to bf16, O += P V in
// ascending key steps. A block that lies wholly after a row's position leaves that row's
// state unchanged (max, sum and accumulator are multiplied by exp(0) = 1 and receive exact
// zeros), so a row gets the same bits whether its tile holds 1 token (decode) or many.
#include "kernels/cuda/attention.h"

#include <algorithm>

#include "kernels/cuda/attention_tile.cuh"

namespace lockstep::cuda {
namespace {

using namespace attention_detail;

template <int D, bool WGMMA>
__global__ void __launch_bounds__(kThreads, 3)
    flash_attention_kernel(const bf16* q, bf16* out, DeviceKvLayer kv, DeviceSlots slots, int nq, int G, float scale,
                           float* lse) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  start_after_previous();
  const int tile = int(blockIdx.x);
  if (tile >= *slots.num_tiles) return;
  const KvTileGeometry geometry = tile_geometry(slots, tile);
  attention_tile<D, WGMMA>(q, out, kv, slots, geometry, nq, G, scale, int(blockIdx.y), smem_raw, CtaSync{}, 0, lse);
}

template <int D, bool WGMMA>
void launch(const bf16* q, bf16* out, const DeviceKvLayer& kv, const DeviceSlots& slots, int64_t nq, float scale,
            cudaStream_t s, float* lse) {
  constexpr size_t smem = attention_smem_bytes<D, WGMMA>();
  static const bool configured = [] {
    LS_CUDA_CHECK(
        cudaFuncSetAttribute(flash_attention_kernel<D, WGMMA>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)configured;
  dim3 grid(unsigned(slots.max_tiles), unsigned(kv.kv_heads));
  launch_after_previous(flash_attention_kernel<D, WGMMA>, grid, kThreads, smem, s, q, out, kv, slots, int(nq),
                        int(nq / kv.kv_heads), scale, lse);
}

}  // namespace

bool tensor_core_attention_supported(int64_t head_dim, int64_t group) {
  return (head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128) && group >= 1 &&
         group <= kTileRows;
}

int64_t attention_tile_tokens(int64_t group) { return std::max<int64_t>(1, kTileRows / std::max<int64_t>(group, 1)); }

bool attention_takes_wgmma(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

void flash_attention(const bf16* q, bf16* out, const DeviceKvLayer& kv, const DeviceSlots& slots, int64_t nq,
                     float scale, cudaStream_t s, AttentionKernel kernel, float* lse) {
  LS_CHECK(slots.tiles != nullptr && slots.num_tiles != nullptr && slots.max_tiles > 0,
           "cuda attention: the step's query tiles are missing");
  LS_CHECK(slots.max_tiles <= 0x7fffffff && kv.kv_heads <= 65535, "cuda attention: too many tiles");
  const bool wgmma =
      kernel == AttentionKernel::wgmma || (kernel == AttentionKernel::automatic && attention_takes_wgmma(kv.head_dim));
  LS_CHECK(!wgmma || attention_takes_wgmma(kv.head_dim),
           "cuda attention: the wgmma kernel takes head_dim 64 or 128, got ", kv.head_dim);
  if (wgmma)
    return kv.head_dim == 64 ? launch<64, true>(q, out, kv, slots, nq, scale, s, lse)
                             : launch<128, true>(q, out, kv, slots, nq, scale, s, lse);
  switch (kv.head_dim) {
    case 16: return launch<16, false>(q, out, kv, slots, nq, scale, s, lse);
    case 32: return launch<32, false>(q, out, kv, slots, nq, scale, s, lse);
    case 64: return launch<64, false>(q, out, kv, slots, nq, scale, s, lse);
    case 128: return launch<128, false>(q, out, kv, slots, nq, scale, s, lse);
    default: fail("cuda attention: head_dim ", kv.head_dim, " has no tensor-core kernel");
  }
}

}  // namespace lockstep::cuda
