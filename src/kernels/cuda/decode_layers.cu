// The one-launch decode kernel (decode_layers.h): phases per layer, each consumer warp's GEMM
// work in n8 column tiles ("items") of one weight matrix, fed by the producer warp's ring.
//
//   QKV     CTAs nkv ..: rmsnorm(x) -> qkv (column form), each CTA normalizing the row itself;
//           CTAs 0 .. nkv-1 start reading their kv head's earlier KV blocks meanwhile
//   ATTN    CTAs 0 .. nkv-1: q/k norm + RoPE of their kv head, the KV write, the attention
//   O       x_mid = x + o_proj(attn) (row form: a CTA's stages over its warps, then the tree)
//   ROUTER  rmsnorm(x_mid) -> router logits (fp32)
//   GATE_UP every CTA routes the token itself, then [gate | up] of the k experts (a gate tile
//           and its up tile per warp), the SwiGLU in the epilogue
//   DOWN    the activations as A rows, down projection (row form) per expert slot
// with a grid barrier after each; the combine of the experts into x happens as the next layer
// (or the end) loads the row.
#include "kernels/cuda/decode_layers.h"

#include <algorithm>
#include <cstdio>
#include <vector>

#include "kernels/cuda/attention_tile.cuh"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mbarrier.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/cuda/row_ops.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace lockstep::cuda {
namespace {

constexpr int kConsumerWarps = 8, kConsumerThreads = kConsumerWarps * 32, kThreads = kConsumerThreads + 32;
static_assert(kConsumerThreads == kNormThreads, "the consumers run the row RMSNorm");
constexpr int kStageK = 1024;                // K elements of a weight row per stage
constexpr int kRowPitch = kStageK * 2 + 16;  // bytes: 8 rows' ldmatrix reads hit 8 bank groups
constexpr int kStageBytes = 8 * kRowPitch;   // one n8 tile's rows
constexpr int kMaxStages = 12;
constexpr int kMaxSlots = 8;  // experts per token

enum Phase { kQkv, kO, kRouter, kGateUp, kDown, kPhases };

// Named barriers of a thread subset. Not the .aligned form (bar.sync), which requires every
// lane of a warp to execute the same barrier together: block procedures reach it right after
// code that one thread ran alone (block_sum's thread 0).
struct ConsumerSync {
  __device__ __forceinline__ void operator()() const { asm volatile("barrier.sync 1, 256;\n" ::: "memory"); }
};
struct AttentionSync {  // warps 0-3 (one warpgroup)
  __device__ __forceinline__ void operator()() const { asm volatile("barrier.sync 2, 128;\n" ::: "memory"); }
};

// Byte offsets of the dynamic shared memory (host-computed).
struct Layout {
  uint32_t ring = 0, a = 0, x = 0, heads = 0, logits = 0, probs = 0, routing = 0, scratch = 0, part = 0, geometry = 0,
           layer = 0, bars = 0, total = 0;
  int stages = 0;
};

// The trace's points of a layer (decode_layers_trace): where thread 0 of a CTA stands.
enum TracePoint {
  kLayerStart,
  kNormDone,
  kQkvArrive,
  kQkvLeave,
  kRopeDone,
  kAttnArrive,
  kAttnLeave,
  kOLoaded,
  kOArrive,
  kOLeave,
  kRouterNormDone,
  kRouterArrive,
  kRouterLeave,
  kLogitsLoaded,
  kProbsDone,
  kRanked,
  kRoutingDone,
  kGateUpArrive,
  kGateUpAtomic,
  kGateUpLeave,
  kActLoaded,
  kDownArrive,
  kDownAtomic,
  kDownLeave,
  kTracePoints
};

struct Params {
  DecodeLayersArgs a;
  Layout L;
  int H, nq, nkv, G, E, k, I, qkv_n;
  uint64_t* trace;  // [grid][layers][kTracePoints], or null
};

// The matrix of a GEMM phase: `slots` weight blocks (one per expert slot, else 1) of [N, K].
// Paired ([gate | up]): an item is n8 tile t of the first half and tile t of the second half,
// two chains in one warp, so the epilogue can apply the SwiGLU. The items are shared by CTAs
// first_cta and on (QKV leaves the attention CTAs free to start their KV reads).
struct Matrix {
  const bf16* W;
  int64_t expert_stride;
  int N, K, slots;
  bool paired;
  int first_cta;
  __device__ __forceinline__ int tiles() const { return paired ? N / 16 : N / 8; }  // items per slot
};
__device__ __forceinline__ Matrix matrix_of(const Params& p, const DecodeLayerWeights& w, int phase) {
  switch (phase) {
    case kQkv: return {w.qkv, 0, p.qkv_n, p.H, 1, false, p.nkv};
    case kO: return {w.o, 0, p.H, p.nq * int(p.a.shape.head_dim), 1, false, 0};
    case kRouter: return {w.router, 0, p.E, p.H, 1, false, 0};
    case kGateUp: return {w.gate_up, int64_t(2) * p.I * p.H, 2 * p.I, p.H, p.k, true, 0};
    default: return {w.down, int64_t(p.H) * p.I, p.H, p.I, p.k, false, 0};
  }
}
__device__ __forceinline__ int stages_per_item(int K) { return (K + kStageK - 1) / kStageK; }
// This CTA's items [begin, end) of a phase: contiguous shares of slots * tiles() items.
__device__ __forceinline__ void item_range(const Matrix& m, int& begin, int& end) {
  const int items = m.slots * m.tiles(), ctas = int(gridDim.x) - m.first_cta, b = int(blockIdx.x) - m.first_cta;
  begin = b < 0 ? 0 : int(int64_t(items) * b / ctas);
  end = b < 0 ? 0 : int(int64_t(items) * (b + 1) / ctas);
}

__device__ __forceinline__ void mma_k16(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  // Rows 1..15 of the A tile are zero (one token): the small-step GEMM's operands exactly.
  const uint32_t a[4] = {a0, 0u, a2, 0u};
  mma_bf16(c, a, b0, b1);
}

// A wait that never ends is a bug (a schedule mismatch between the producer and the
// consumers, a CTA not resident): after kWatchdogNs the kernel traps, so the launch fails
// instead of hanging the process. Built with LOCKSTEP_DECODE_LAYERS_DEBUG, the waiting thread
// first prints where it waits and each warp's last ring event (progress words).
constexpr uint64_t kWatchdogNs = 2000000000ull;
#ifdef LOCKSTEP_DECODE_LAYERS_DEBUG
constexpr bool kProgress = true;
#else
constexpr bool kProgress = false;
#endif
extern __shared__ __align__(128) unsigned char smem[];
// Per consumer warp and the producer (index 8) the last ring event: stage << 4 | 1 waiting, 2
// released, 3 issuing; 0xB... at a grid barrier, 0xE... the producer waiting for a routing.
__device__ __forceinline__ void note_progress(int who, uint32_t event) {
  if constexpr (kProgress) reinterpret_cast<volatile uint32_t*>(smem)[who] = event;
}
// The number of stages the producer has issued (written by the producer only).
__device__ __forceinline__ volatile uint32_t* issued_count() { return reinterpret_cast<volatile uint32_t*>(smem) + 12; }
__device__ __forceinline__ uint64_t now_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}
__device__ __forceinline__ void stuck(const char* what, uint32_t index) {
#ifdef LOCKSTEP_DECODE_LAYERS_DEBUG  // printf is a call: in a kernel with calls ptxas serializes wgmma
  volatile uint32_t* pr = reinterpret_cast<volatile uint32_t*>(smem);
  printf("decode_layers: CTA %d thread %d waited %llu ns for %s %u; progress %x %x %x %x %x %x %x %x | %x\n",
         int(blockIdx.x), int(threadIdx.x), static_cast<unsigned long long>(kWatchdogNs), what, index, pr[0], pr[1],
         pr[2], pr[3], pr[4], pr[5], pr[6], pr[7], pr[8]);
#else
  (void)what;
  (void)index;
#endif
  __trap();
}
__device__ __forceinline__ void wait_phase(uint32_t bar, uint32_t parity, const char* what, uint32_t index) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = now_ns();
  while (!mbar_try_wait(bar, parity))
    if (now_ns() - t0 > kWatchdogNs) stuck(what, index);
}
// The producer's waits: it sleeps (up to 0.1 ms per try) instead of spinning beside the
// consumer warps of its scheduler.
__device__ __forceinline__ void producer_wait(uint32_t bar, uint32_t parity, const char* what, uint32_t index) {
  if (mbar_try_wait(bar, parity)) return;
  const uint64_t t0 = now_ns();
  while (!mbar_try_wait_sleep(bar, parity, 100000u))
    if (now_ns() - t0 > kWatchdogNs) stuck(what, index);
}

// The ring: stage i of the CTA's sequence sits in slot i % stages; full[s] completes when its
// bytes landed, empty[s] when its warp is done with it.
struct Ring {
  uint32_t base, full, empty;
  int stages;
  // Warps take their stages out of order, so a warp may ask for stage i more than a ring's
  // length ahead of the producer, where full[s]'s parity would alias an earlier use: it first
  // waits until the producer has issued stage i (issued_count() > i), after which full[s]
  // cannot complete another use before this warp releases it.
  __device__ __forceinline__ uint32_t acquire(uint32_t i) const {
    const uint32_t s = i % uint32_t(stages);
    if (*issued_count() <= i) {
      const uint64_t t0 = now_ns();
      while (*issued_count() <= i)
        if (now_ns() - t0 > kWatchdogNs) stuck("the producer to issue stage", i);
    }
    if ((threadIdx.x & 31) == 0) note_progress(int(threadIdx.x >> 5), (i << 4) | 1);
    wait_phase(full + 8 * s, (i / uint32_t(stages)) & 1, "full stage", i);
    return base + s * kStageBytes;
  }
  __device__ __forceinline__ void release(uint32_t i, int lane) const {
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + 8 * (i % uint32_t(stages)));
    if (lane == 0) note_progress(int(threadIdx.x >> 5), (i << 4) | 2);
  }
};

// Two k16 steps at stage-relative k of an item's rows (ldmatrix: lane l addresses row l % 8 at
// k + 8 (l / 8): b0, b1 of the first step, then of the second) against the A row a (k absolute
// within the row; only lanes 0-3 hold row 0 of the mma tile).
__device__ __forceinline__ void mma_k32(float (&c)[4], uint32_t lane_row, int k_stage, const bf16* a, int lane) {
  uint32_t r[4];
  ldmatrix_x4(r, lane_row + k_stage * 2);
  // Every lane loads (no branch; lanes of a quad share addresses), lanes 4-31 keep zeros.
  const bf16* ap = a + 2 * (lane & 3);
  const bool row0 = lane < 4;
  const uint32_t a0 = load_bf16_pair(ap), a2 = load_bf16_pair(ap + 8);
  const uint32_t a0n = load_bf16_pair(ap + 16), a2n = load_bf16_pair(ap + 24);
  mma_k16(c, row0 ? a0 : 0u, row0 ? a2 : 0u, r[0], r[1]);
  mma_k16(c, row0 ? a0n : 0u, row0 ? a2n : 0u, r[2], r[3]);
}

// mma_k32 for two item rows' stages against the same A values (two independent chains).
__device__ __forceinline__ void mma_k32_pair(float (&c0)[4], float (&c1)[4], uint32_t lane_row0, uint32_t lane_row1,
                                             int k_stage, const bf16* a, int lane) {
  uint32_t r[4], q[4];
  ldmatrix_x4(r, lane_row0 + k_stage * 2);
  ldmatrix_x4(q, lane_row1 + k_stage * 2);
  const bf16* ap = a + 2 * (lane & 3);
  const bool row0 = lane < 4;
  const uint32_t a0 = row0 ? load_bf16_pair(ap) : 0u, a2 = row0 ? load_bf16_pair(ap + 8) : 0u;
  const uint32_t a0n = row0 ? load_bf16_pair(ap + 16) : 0u, a2n = row0 ? load_bf16_pair(ap + 24) : 0u;
  mma_k16(c0, a0, a2, r[0], r[1]);
  mma_k16(c1, a0, a2, q[0], q[1]);
  mma_k16(c0, a0n, a2n, r[2], r[3]);
  mma_k16(c1, a0n, a2n, q[2], q[3]);
}

// Paired column form: the chains of the two tiles of a paired item, stage by stage (stages
// first + t stride and the one after it: K part t of either tile).
__device__ __forceinline__ void column_pair_item(float (&c0)[4], float (&c1)[4], const bf16* a, int K, const Ring& ring,
                                                 uint32_t first, uint32_t stride, int lane) {
  const int spi = stages_per_item(K);
  for (int t = 0; t < spi; ++t) {
    const uint32_t at_t = first + uint32_t(t) * stride;
    const uint32_t stage0 = ring.acquire(at_t), stage1 = ring.acquire(at_t + 1);
    const uint32_t lane_off = (lane & 7) * kRowPitch + (lane >> 3) * 16;
    const int kn = min(kStageK, K - t * kStageK);
    const bf16* at = a + t * kStageK;
#pragma unroll 2
    for (int kk = 0; kk < kn; kk += 32) mma_k32_pair(c0, c1, stage0 + lane_off, stage1 + lane_off, kk, at + kk, lane);
    ring.release(at_t, lane);
    ring.release(at_t + 1, lane);
  }
}

// Column form: one chain of k16 steps over the whole K into c (row 0: c[0], c[1]).
__device__ __forceinline__ void column_item(float (&c)[4], const bf16* a, int K, const Ring& ring, uint32_t first,
                                            int lane) {
  const int spi = stages_per_item(K);
  for (int t = 0; t < spi; ++t) {
    const uint32_t stage = ring.acquire(first + t);
    const uint32_t lane_row = stage + (lane & 7) * kRowPitch + (lane >> 3) * 16;
    const int kn = min(kStageK, K - t * kStageK);
    const bf16* at = a + t * kStageK;
#pragma unroll 4
    for (int kk = 0; kk < kn; kk += 32) mma_k32(c, lane_row, kk, at + kk, lane);
    ring.release(first + t, lane);
  }
}

// Row form: stage `index` (K part t of an item) holds CPS whole chunks; their chains (from
// zero) into acc, interleaved for the tensor pipe, to be folded by the tree (fold_partials).
template <int CPS>
__device__ __forceinline__ void row_unit(float (&acc)[CPS][4], const bf16* a, int K, const Ring& ring, uint32_t index,
                                         int t, int lane) {
  const int chunk = K / 8;
#pragma unroll
  for (int cc = 0; cc < CPS; ++cc)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[cc][e] = 0.0f;
  const uint32_t stage = ring.acquire(index);
  const uint32_t lane_row = stage + (lane & 7) * kRowPitch + (lane >> 3) * 16;
  const bf16* at = a + t * CPS * chunk;
  for (int kk = 0; kk < chunk; kk += 32)
#pragma unroll
    for (int cc = 0; cc < CPS; ++cc) mma_k32(acc[cc], lane_row, cc * chunk + kk, at + cc * chunk + kk, lane);
  ring.release(index, lane);
}

// The tree of the 8 chunk sums of one column (fold_chunk's operations in one expression).
__device__ __forceinline__ float fold_partials(const float* p, int stride) {
  return ((p[0] + p[stride]) + (p[2 * stride] + p[3 * stride])) +
         ((p[4 * stride] + p[5 * stride]) + (p[6 * stride] + p[7 * stride]));
}

__device__ __forceinline__ void gemm_item(float (&c)[4], bool row_form, const bf16* a, int K, const Ring& ring,
                                          uint32_t first, int lane) {
#pragma unroll
  for (int e = 0; e < 4; ++e) c[e] = 0.0f;
  if (!row_form) return column_item(c, a, K, ring, first, lane);
  // Row form with K <= kStageK (longer: gemm_phase's split form): the 8 chunk chains of the one
  // stage, interleaved for the tensor pipe, then the tree.
  float acc[8][4];
  row_unit<8>(acc, a, K, ring, first, 0, lane);
#pragma unroll
  for (int e = 0; e < 4; ++e) c[e] = fold_partials(&acc[0][e], 4);
}

// The producer: every stage of every phase of every layer, in the consumers' order.
__device__ void produce(const Params& p, const Ring& ring, uint32_t routed, const int32_t* s_ids) {
  const uint64_t streamed = l2_evict_first_policy();  // each weight byte is read once per step
  uint32_t i = 0;
  for (int l = 0; l < p.a.num_layers; ++l) {
    const DecodeLayerWeights& w = p.a.layers[l];
    for (int phase = 0; phase < kPhases; ++phase) {
      if (phase == kGateUp) note_progress(8, 0xE0000000u | uint32_t(l));
      if (phase == kGateUp) producer_wait(routed, uint32_t(l) & 1, "routing of layer", uint32_t(l));
      const Matrix m = matrix_of(p, w, phase);
      int begin, end;
      item_range(m, begin, end);
      const int tiles = m.tiles(), spi = stages_per_item(m.K), halves = m.paired ? 2 : 1;
      // Items in order, each K part in turn; paired items K part by K part across the items
      // (every warp starts on its item's first part at once), the two tiles of a part together.
      const int outer = m.paired ? spi : end - begin, inner = m.paired ? end - begin : spi;
      for (int o = 0; o < outer; ++o)
        for (int n = 0; n < inner; ++n) {
          const int j = begin + (m.paired ? n : o), t = m.paired ? o : n;
          const int slot = j / tiles, tile = j - slot * tiles;
          const bf16* rows = m.W + (m.slots > 1 ? int64_t(s_ids[slot]) * m.expert_stride : 0) + int64_t(tile) * 8 * m.K;
          for (int h = 0; h < halves; ++h, ++i) {  // paired: the tile of the first half, then of the second
            const bf16* src = rows + int64_t(h) * (m.N / 2) * m.K + t * kStageK;
            const uint32_t s = i % uint32_t(ring.stages);
            note_progress(8, (i << 4) | 3);
            if (i >= uint32_t(ring.stages))
              producer_wait(ring.empty + 8 * s, (i / uint32_t(ring.stages) - 1) & 1, "empty stage", i);
            const int kn = min(kStageK, m.K - t * kStageK);
            const uint32_t bar = ring.full + 8 * s, dst = ring.base + s * kStageBytes;
            mbar_arrive_expect_tx(bar, uint32_t(8 * kn * 2));
#pragma unroll
            for (int r = 0; r < 8; ++r)
              bulk_copy_to_shared(dst + r * kRowPitch, src + int64_t(r) * m.K, uint32_t(kn * 2), bar, streamed);
            *issued_count() = i + 1;
          }
        }
    }
  }
}

// Thread 0's time at a point of the trace (when tracing: row is this CTA's layer row).
__device__ __forceinline__ void trace_at(uint64_t* row, int point) {
  if (row != nullptr && threadIdx.x == 0) row[point] = now_ns();
}

// All consumers of all CTAs: each CTA's writes before it are visible to every CTA after it.
struct GridBarrier {
  uint32_t* counter;
  uint32_t target = 0;
  uint64_t* trace_row = nullptr;
  // The trace's points: arrive_point, then (atomic_point >= 0) after the arrival's add, then the
  // next point after the wait.
  __device__ __forceinline__ void operator()(int arrive_point, int atomic_point = -1) {
    if ((threadIdx.x & 31) == 0) note_progress(int(threadIdx.x >> 5), 0xB0000000u | target);
    ConsumerSync{}();
    trace_at(trace_row, arrive_point);
    target += gridDim.x;
    if (threadIdx.x < 32) {  // warp 0 waits, all lanes together
      if (threadIdx.x == 0) {
        // This CTA's writes before the arrival (the consumers' barrier ordered them before
        // thread 0's), released at gpu scope with the add.
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(counter) : "memory");
        if (atomic_point >= 0) trace_at(trace_row, atomic_point);
      }
      const uint64_t t0 = now_ns();
      for (;;) {
        uint32_t seen = 0;
        if (threadIdx.x == 0)
          asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
        if (__shfl_sync(0xffffffffu, seen, 0) >= target) break;
        if (now_ns() - t0 > kWatchdogNs) stuck("the grid barrier at count", target);
      }
      __threadfence();
    }
    ConsumerSync{}();
    trace_at(trace_row, atomic_point >= 0 ? atomic_point + 1 : arrive_point + 1);
  }
};

// x = x_mid + the experts' outputs in ascending expert id (combine_kernel's operations), 8
// columns from c0 on, every 8 * step, into dst (shared or global). Reads go to L2: other SMs
// wrote them (their lines may be stale in this SM's L1); all of a thread's loads are issued
// before its sums.
__device__ __forceinline__ void combine_into(const Params& p, bf16* dst, int c0, int step, const int* s_order,
                                             const float* s_weights) {
  for (int c = 8 * c0; c < p.H; c += 8 * step) {
    uint4 yv[kMaxSlots];
#pragma unroll
    for (int i = 0; i < kMaxSlots; ++i)
      if (i < p.k) yv[i] = __ldcg(reinterpret_cast<const uint4*>(p.a.y + int64_t(s_order[i]) * p.H + c));
    const uint4 xv = __ldcg(reinterpret_cast<const uint4*>(p.a.x_mid + c));
    float o[8] = {};
#pragma unroll
    for (int i = 0; i < kMaxSlots; ++i)
      if (i < p.k) {
        const float w = s_weights[s_order[i]];
        const bf16* y8 = reinterpret_cast<const bf16*>(&yv[i]);
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] += w * to_f32(y8[e]);
      }
    uint4 out;
    const bf16* x8 = reinterpret_cast<const bf16*>(&xv);
    bf16* o8 = reinterpret_cast<bf16*>(&out);
#pragma unroll
    for (int e = 0; e < 8; ++e) o8[e] = to_bf16(to_f32(x8[e]) + round_bf16(o[e]));
    *reinterpret_cast<uint4*>(dst + c) = out;
  }
}

// The consumers' RMSNorm of the hidden row.
__device__ __forceinline__ void norm_row(const bf16* x, const float* w, bf16* out, int H, float eps, float* scratch) {
  rmsnorm_row(x, w, out, H, eps, scratch, ConsumerSync{});
}

template <int D>
__global__ void __launch_bounds__(kThreads, 1) decode_layers_kernel(Params p) {
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const Layout& L = p.L;
  const uint32_t base = smem_addr(smem);
  const Ring ring{base + L.ring, base + L.bars, base + L.bars + 8 * uint32_t(L.stages), L.stages};
  const uint32_t routed = base + L.bars + 16 * uint32_t(L.stages);
  bf16* s_a = reinterpret_cast<bf16*>(smem + L.a);  // the GEMM's A row (aliases the attention's K/V)
  bf16* s_x = reinterpret_cast<bf16*>(smem + L.x);
  bf16* s_heads = reinterpret_cast<bf16*>(smem + L.heads);
  float* s_logits = reinterpret_cast<float*>(smem + L.logits);
  float* s_probs = reinterpret_cast<float*>(smem + L.probs);
  int32_t* s_ids = reinterpret_cast<int32_t*>(smem + L.routing);
  float* s_weights = reinterpret_cast<float*>(smem + L.routing + 4 * kMaxSlots);
  int* s_order = reinterpret_cast<int*>(smem + L.routing + 8 * kMaxSlots);
  float* s_scratch = reinterpret_cast<float*>(smem + L.scratch);
  float* s_part = reinterpret_cast<float*>(smem + L.part);
  auto& s_geometry = *reinterpret_cast<attention_detail::KvTileGeometry*>(smem + L.geometry);
  if (tid == 0) {
    for (int s = 0; s < L.stages; ++s) {
      mbar_init(ring.full + 8 * s, 1);
      mbar_init(ring.empty + 8 * s, 1);
    }
    mbar_init(routed, 1);
    *issued_count() = 0;
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (warp == kConsumerWarps) {  // the producer
    if (lane == 0) produce(p, ring, routed, s_ids);
    return;
  }

  const DecodeLayersArgs& a = p.a;
  const int H = p.H, G = p.G;
  GridBarrier grid_barrier{a.barrier};
  uint32_t ring_at = 0;  // the CTA's next stage
  // One GEMM phase: warp w takes items begin + w, begin + w + 8, ...; store(slot, column, c).
  auto gemm_phase = [&](const Matrix& m, bool row_form, auto a_of_slot, auto store) {
    int begin, end;
    item_range(m, begin, end);
    const int tiles = m.tiles(), spi = stages_per_item(m.K);
    if (row_form && spi > 1) {
      // Row form over several stages: warp w takes stages (units) w, w + 8, ... of the CTA's
      // items, their chunk sums go to shared memory, then the tree per column.
      const int units = (end - begin) * spi;
      for (int u = warp; u < units; u += kConsumerWarps) {
        const int jl = u / spi, t = u - jl * spi, slot = (begin + jl) / tiles;
        float* part = s_part + jl * 64 + 2 * lane;  // [item][chunk][column]
        auto run = [&](auto cps) {
          constexpr int CPS = decltype(cps)::value;
          float acc[CPS][4];
          row_unit<CPS>(acc, a_of_slot(slot), m.K, ring, ring_at + uint32_t(u), t, lane);
          if (lane < 4)
#pragma unroll
            for (int cc = 0; cc < CPS; ++cc)
              *reinterpret_cast<float2*>(part + (t * CPS + cc) * 8) = make_float2(acc[cc][0], acc[cc][1]);
        };
        switch (8 * kStageK / m.K) {  // chunks per stage
          case 4: run(std::integral_constant<int, 4>{}); break;
          case 2: run(std::integral_constant<int, 2>{}); break;
          default: run(std::integral_constant<int, 1>{}); break;
        }
      }
      ring_at += uint32_t(units);
      ConsumerSync{}();
      for (int idx = tid; idx < (end - begin) * 4; idx += kConsumerThreads) {
        const int jl = idx >> 2, pr = idx & 3, j = begin + jl, slot = j / tiles, tile = j - slot * tiles;
        const float* part = s_part + jl * 64 + 2 * pr;
        store(slot, tile * 8 + 2 * pr, fold_partials(part, 8), fold_partials(part + 1, 8));
      }
      ConsumerSync{}();  // the partials are rewritten by the next split phase
      return;
    }
    for (int j = begin + warp; j < end; j += kConsumerWarps) {
      const int slot = j / tiles, tile = j - slot * tiles;
      float c[4];
      gemm_item(c, row_form, a_of_slot(slot), m.K, ring, ring_at + uint32_t((j - begin) * spi), lane);
      if (lane < 4) store(slot, tile * 8 + 2 * lane, c[0], c[1]);
    }
    ring_at += uint32_t((end - begin) * spi);
  };
  // Paired column form ([gate | up]): store(slot, column of the first half, g0, g1, u0, u1).
  auto pair_phase = [&](const Matrix& m, const bf16* a, auto store) {
    int begin, end;
    item_range(m, begin, end);
    const int tiles = m.tiles(), spi = stages_per_item(m.K);
    for (int j = begin + warp; j < end; j += kConsumerWarps) {
      const int slot = j / tiles, tile = j - slot * tiles;
      float g[4] = {}, u[4] = {};
      column_pair_item(g, u, a, m.K, ring, ring_at + uint32_t(2 * (j - begin)), uint32_t(2 * (end - begin)), lane);
      if (lane < 4) store(slot, tile * 8 + 2 * lane, g[0], g[1], u[0], u[1]);
    }
    ring_at += uint32_t((end - begin) * 2 * spi);
  };
  const int slot_pos = a.slots.positions[0];
  if (int(blockIdx.x) < p.nkv) {  // the attention's reads of the slots and page table, once for all layers
    if (tid == 0) {
      const attention_detail::KvTileGeometry g = attention_detail::tile_geometry(a.slots, 0);
      s_geometry.table = g.table;
      s_geometry.t0 = g.t0;
      s_geometry.ntok = g.ntok;
      s_geometry.max_pos = g.max_pos;
    }
    ConsumerSync{}();
    attention_detail::fill_first_slots(s_geometry, reinterpret_cast<int32_t*>(&s_geometry + 1),
                                       int(a.layers[0].kv.page_size), kConsumerThreads);
    ConsumerSync{}();
  }

  static_assert(sizeof(DecodeLayerWeights) % 8 == 0, "the layer's pointers are copied in 8-byte words");
  constexpr int kLayerWords = int(sizeof(DecodeLayerWeights) / 8);
  const DecodeLayerWeights& w = *reinterpret_cast<const DecodeLayerWeights*>(smem + L.layer);
  for (int l = 0; l < a.num_layers; ++l) {
    uint64_t* trace_row = p.trace ? p.trace + (int64_t(blockIdx.x) * a.num_layers + l) * kTracePoints : nullptr;
    grid_barrier.trace_row = trace_row;
    trace_at(trace_row, kLayerStart);
    // The layer's pointers into shared memory (every phase reads them; global reads would
    // each wait on L2), loaded beside the row below.
    if (tid < kLayerWords)
      reinterpret_cast<uint64_t*>(smem + L.layer)[tid] = __ldg(reinterpret_cast<const uint64_t*>(a.layers + l) + tid);
    // QKV: the layer's input row (the embedding, or the previous layer's x_mid + experts).
    if (l == 0)
      for (int c = tid; c < H / 8; c += kConsumerThreads)
        reinterpret_cast<uint4*>(s_x)[c] = __ldcg(reinterpret_cast<const uint4*>(a.x) + c);
    else
      combine_into(p, s_x, tid, kConsumerThreads, s_order, s_weights);
    ConsumerSync{}();
    // The attention CTAs take no QKV items: they start reading the KV blocks before this
    // token's block (in the cache already) now, ahead of the barrier and the RoPE, into the
    // attention's stages (s_a, which no QKV item needs there).
    const bool attention_cta = int(blockIdx.x) < p.nkv;
    const int prefetched = min(2, slot_pos / attention_detail::kKvBlock);
    if (attention_cta) {
      if (warp < 4)
        attention_detail::attention_prefetch<D, false>(w.kv, s_geometry, int(blockIdx.x),
                                                       reinterpret_cast<unsigned char*>(s_a), prefetched);
    } else {
      norm_row(s_x, w.input_norm, s_a, H, a.eps, s_scratch);
      ConsumerSync{}();
    }
    trace_at(trace_row, kNormDone);
    gemm_phase(
        matrix_of(p, w, kQkv), false, [&](int) { return s_a; },
        [&](int, int n, float v0, float v1) {
          *reinterpret_cast<__nv_bfloat162*>(a.qkv + n) = __floats2bfloat162_rn(v0, v1);
        });
    grid_barrier(kQkvArrive);

    // ATTN: kv head b's q heads, k and v (qk_norm_rope_kernel's procedure), then its attention.
    if (int(blockIdx.x) < p.nkv) {
      const int kvh = int(blockIdx.x), nq = p.nq;
      for (int idx = tid; idx < (G + 2) * (D / 8); idx += kConsumerThreads) {
        const int h = idx / (D / 8), piece = idx - h * (D / 8);
        const int head = h < G ? kvh * G + h : nq + (h - G) * p.nkv + kvh;  // q heads, k, v
        reinterpret_cast<uint4*>(s_heads)[idx] = __ldcg(reinterpret_cast<const uint4*>(a.qkv + head * D) + piece);
      }
      ConsumerSync{}();
      const DeviceKvLayer& kv = w.kv;
      const int64_t cache_row = (slot_of(a.slots, 0, slot_pos, kv.page_size) * kv.kv_heads + kvh) * D;
      for (int h = warp; h < G + 2; h += kConsumerWarps) {
        const bf16* src = s_heads + h * D;
        if (h == G + 1) {
          for (int d = lane; d < D; d += 32) kv.v[cache_row + d] = src[d];
        } else {
          const bool is_q = h < G;
          bf16* dst = is_q ? a.q + (kvh * G + h) * D : kv.k + cache_row;
          norm_rope_head<D / 32>(src, is_q ? w.q_norm : w.k_norm, a.rope_cos + slot_pos * (D / 2),
                                 a.rope_sin + slot_pos * (D / 2), dst, lane, a.eps);
        }
      }
      ConsumerSync{}();
      trace_at(trace_row, kRopeDone);
      // mma.sync with the output columns split over the 4 warps: the whole-tile accumulators
      // (the attention kernel's) spilled at this kernel's 168 registers, and with them the
      // rest of the kernel (wgmma would also be serialized by any call in the kernel).
      if (warp < 4)
        attention_detail::attention_tile<D, false, AttentionSync, true>(
            a.q, a.attn, kv, a.slots, s_geometry, nq, G, a.scale, kvh, reinterpret_cast<unsigned char*>(s_a),
            AttentionSync{}, prefetched);
    }
    grid_barrier(kAttnArrive);

    // O: x_mid = x + o_proj(attn).
    const int q_dim = p.nq * D;
    for (int c = tid; c < q_dim / 8; c += kConsumerThreads)
      reinterpret_cast<uint4*>(s_a)[c] = __ldcg(reinterpret_cast<const uint4*>(a.attn) + c);
    ConsumerSync{}();
    trace_at(trace_row, kOLoaded);
    gemm_phase(
        matrix_of(p, w, kO), true, [&](int) { return s_a; },
        [&](int, int n, float v0, float v1) {
          const float r0 = to_f32(s_x[n]) + round_bf16(v0), r1 = to_f32(s_x[n + 1]) + round_bf16(v1);
          *reinterpret_cast<__nv_bfloat162*>(a.x_mid + n) = __floats2bfloat162_rn(r0, r1);
        });
    grid_barrier(kOArrive);

    // ROUTER: rmsnorm(x_mid) (kept in s_a for GATE_UP), fp32 logits.
    for (int c = tid; c < H / 8; c += kConsumerThreads)
      reinterpret_cast<uint4*>(s_x)[c] = __ldcg(reinterpret_cast<const uint4*>(a.x_mid) + c);
    ConsumerSync{}();
    norm_row(s_x, w.post_norm, s_a, H, a.eps, s_scratch);
    ConsumerSync{}();
    trace_at(trace_row, kRouterNormDone);
    gemm_phase(
        matrix_of(p, w, kRouter), false, [&](int) { return s_a; },
        [&](int, int n, float v0, float v1) { *reinterpret_cast<float2*>(a.router_logits + n) = make_float2(v0, v1); });
    grid_barrier(kRouterArrive);

    // GATE_UP: the routing (route_token's procedure, every CTA alike), handed to the producer.
    for (int e = tid; e < p.E; e += kConsumerThreads) s_logits[e] = __ldcg(a.router_logits + e);
    ConsumerSync{}();
    trace_at(trace_row, kLogitsLoaded);
    route_token_ranked<kConsumerThreads>(s_logits, s_ids, s_weights, s_order, p.E, p.k, a.normalize_topk, s_probs,
                                         ConsumerSync{}, [&](int step) { trace_at(trace_row, kProbsDone + step); });
    if (tid == 0) mbar_arrive(routed);
    trace_at(trace_row, kRoutingDone);
    // The expert's SwiGLU in the epilogue (the gate and up sums rounded to bf16 first, as the
    // per-op path stores them): act[slot] = a.gu + slot I.
    pair_phase(matrix_of(p, w, kGateUp), s_a, [&](int slot, int n, float g0, float g1, float u0, float u1) {
      const float a0 = swiglu_value(round_bf16(g0), round_bf16(u0)), a1 = swiglu_value(round_bf16(g1), round_bf16(u1));
      *reinterpret_cast<__nv_bfloat162*>(a.gu + int64_t(slot) * p.I + n) = __floats2bfloat162_rn(a0, a1);
    });
    grid_barrier(kGateUpArrive, kGateUpAtomic);

    // DOWN: the experts' activations (k rows of I) into shared memory.
    for (int c = tid; c < p.k * p.I / 8; c += kConsumerThreads)
      reinterpret_cast<uint4*>(s_a)[c] = __ldcg(reinterpret_cast<const uint4*>(a.gu) + c);
    ConsumerSync{}();
    trace_at(trace_row, kActLoaded);
    gemm_phase(
        matrix_of(p, w, kDown), true, [&](int slot) { return s_a + slot * p.I; },
        [&](int slot, int n, float v0, float v1) {
          *reinterpret_cast<__nv_bfloat162*>(a.y + int64_t(slot) * H + n) = __floats2bfloat162_rn(v0, v1);
        });
    grid_barrier(kDownArrive, kDownAtomic);
  }
  // The last layer's output row.
  combine_into(p, a.x, int(blockIdx.x) * kConsumerThreads + tid, int(gridDim.x) * kConsumerThreads, s_order, s_weights);
}

Layout layout_for(const Params& p, int D, int max_smem, int ctas) {
  auto up = [](uint32_t v, uint32_t a) { return (v + a - 1) / a * a; };
  Layout L;
  const uint32_t a_bytes = uint32_t(std::max({p.H, p.nq * D, p.k * p.I})) * 2;
  const uint32_t attn_bytes = uint32_t(D == 64 ? attention_detail::attention_smem_bytes<64, false>()
                                               : attention_detail::attention_smem_bytes<128, false>());
  uint32_t at = 128;  // 0: the progress words and the issued count
  L.a = at;
  at = up(at + std::max(a_bytes, attn_bytes), 128);
  L.x = at;
  at = up(at + uint32_t(p.H) * 2, 128);
  L.heads = at;
  at = up(at + uint32_t(p.G + 2) * D * 2, 128);
  L.logits = at;
  at = up(at + uint32_t(p.E) * 4, 16);
  L.probs = at;
  at = up(at + uint32_t(p.E) * 4, 16);
  L.routing = at;
  at = up(at + 12 * kMaxSlots, 16);
  L.scratch = at;
  at = up(at + (kNormThreads / 32 + 1) * 4, 16);
  // The row-form phases split over warps (K over several stages): 8 chunks x 8 columns of
  // every item of the CTA.
  int split_items = 0;
  if (p.nq * D > kStageK) split_items = std::max(split_items, (p.H / 8 + ctas - 1) / ctas);
  if (p.I > kStageK) split_items = std::max(split_items, (p.k * p.H / 8 + ctas - 1) / ctas);
  L.part = at;
  at = up(at + uint32_t(split_items) * 64 * 4, 16);
  L.geometry = at;
  at = up(at + uint32_t(sizeof(attention_detail::KvTileGeometry) + 4 * attention_detail::kGeometryBlocks), 16);
  L.layer = at;
  at = up(at + uint32_t(sizeof(DecodeLayerWeights)), 16);
  L.bars = at;
  at = up(at + 8 * (2 * kMaxStages + 1), 128);
  L.ring = at;
  L.stages = std::min(kMaxStages, (max_smem - int(at)) / kStageBytes);
  L.total = at + uint32_t(std::max(L.stages, 0)) * kStageBytes;
  return L;
}

// The trace (decode_layers_trace): a device buffer for grids and layers up to these (steps may
// be captured in CUDA graphs, so the buffer exists before the first launch of a trace).
constexpr int kTraceMaxCtas = 1024, kTraceMaxLayers = 128;
struct Trace {
  bool on = false;
  uint64_t* buffer = nullptr;
  int ctas = 0, layers = 0;
};
Trace& trace_state() {
  static Trace t;
  return t;
}

}  // namespace

void decode_layers_trace(bool on) {
  Trace& t = trace_state();
  const size_t bytes = size_t(kTraceMaxCtas) * kTraceMaxLayers * kTracePoints * sizeof(uint64_t);
  if (on && t.buffer == nullptr) LS_CUDA_CHECK(cudaMalloc(&t.buffer, bytes));
  if (on) LS_CUDA_CHECK(cudaMemset(t.buffer, 0, bytes));
  t.on = on;
}

std::string decode_layers_trace_report() {
  Trace& t = trace_state();
  if (t.buffer == nullptr || t.layers < 3) return "decode_layers trace: no launch of 3 or more layers recorded\n";
  std::vector<uint64_t> h(size_t(t.ctas) * t.layers * kTracePoints);
  LS_CUDA_CHECK(cudaDeviceSynchronize());
  LS_CUDA_CHECK(cudaMemcpy(h.data(), t.buffer, h.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  static const char* names[kTracePoints] = {
      "combine+norm",    "qkv items",    "qkv barrier", "rope (or idle)", "attention",     "attn barrier",
      "o A row load",    "o_proj items", "o barrier",   "router norm",    "router items",  "router barrier",
      "logits load",     "probs",        "ranks",       "weights+order",  "gate_up items", "gate_up fence+add",
      "gate_up barrier", "act A load",   "down items",  "down fence+add", "down barrier",  "to next layer"};
  std::string out = "decode_layers trace (us, mean over layers 1.." + std::to_string(t.layers - 2) + ")\n";
  char line[160];
  std::snprintf(line, sizeof line, "%-20s %8s %8s %8s %8s\n", "interval", "CTA 0", "mean", "max CTA", "max/layer");
  out += line;
  double total[3] = {};
  for (int point = 0; point < kTracePoints; ++point) {
    // Per CTA, the interval from this point to the next recorded one (the attention CTAs
    // record more points than the others), summed over the middle layers.
    // max/layer: the slowest CTA of each layer (mean over layers).
    std::vector<double> per_cta(size_t(t.ctas), 0.0), layer_max(size_t(t.layers), 0.0);
    for (int cta = 0; cta < t.ctas; ++cta)
      for (int l = 1; l + 1 < t.layers; ++l) {
        const uint64_t* row = h.data() + (size_t(cta) * t.layers + l) * kTracePoints;
        int next = point + 1;
        while (next < kTracePoints && row[next] == 0) ++next;
        const uint64_t from = row[point], to = row[next];
        const double v = from != 0 && to >= from ? double(to - from) : 0.0;
        per_cta[size_t(cta)] += v;
        layer_max[size_t(l)] = std::max(layer_max[size_t(l)], v);
      }
    double sum = 0, max = 0, max_sum = 0;
    for (double v : per_cta) sum += v, max = std::max(max, v);
    for (double v : layer_max) max_sum += v;
    const double scale = 1e-3 / (t.layers - 2);
    const double shown[4] = {per_cta[0] * scale, sum / t.ctas * scale, max * scale, max_sum * scale};
    for (int c = 0; c < 3; ++c) total[c] += shown[c];
    std::snprintf(line, sizeof line, "%-20s %8.2f %8.2f %8.2f %8.2f\n", names[point], shown[0], shown[1], shown[2],
                  shown[3]);
    out += line;
  }
  std::snprintf(line, sizeof line, "%-20s %8.2f %8.2f\n", "layer", total[0], total[1]);
  out += line;
  return out;
}

bool decode_layers_supported(const DecodeShape& s, std::string* why) {
  auto no = [&](const char* reason) {
    if (why) *why = reason;
    return false;
  };
  const int64_t H = s.hidden, D = s.head_dim, I = s.intermediate, q_dim = s.heads * D;
  if (D != 64 && D != 128) return no("head_dim must be 64 or 128");
  if (s.kv_heads < 1 || s.heads % s.kv_heads != 0 || s.heads / s.kv_heads > 16)
    return no("the query heads must be a multiple of the kv heads, at most 16 per kv head");
  if (s.experts < 8 || s.experts % 8 != 0 || s.experts > 1024) return no("experts must be a multiple of 8, <= 1024");
  if (s.experts_per_token < 1 || s.experts_per_token > kMaxSlots) return no("experts per token must be 1..8");
  // Column-form K (hidden): whole stages or one; row-form K (q_dim, I): 8 chunks of whole k32 steps per stage.
  auto stages_fit = [](int64_t K) { return K <= kStageK ? K % 32 == 0 : K % kStageK == 0; };
  if (H % 256 != 0 || !stages_fit(H) || H > 8192) return no("hidden must be a multiple of 256 (and of 1024 above it)");
  // Row form: a stage holds whole chunks of whole k32 steps (8 chunks in one stage, or 4, 2, 1).
  auto row_fits = [](int64_t K) { return K <= kStageK ? K % 256 == 0 : K == 2048 || K == 4096 || K == 8192; };
  if (!row_fits(q_dim) || !row_fits(I) || I * s.experts_per_token > 16384)
    return no(
        "heads x head_dim and the expert intermediate size must be multiples of 256 up to 1024, or 2048, "
        "4096 or 8192");
  return true;
}

void decode_layers(const DecodeLayersArgs& args, cudaStream_t stream) {
  std::string why;
  LS_CHECK(decode_layers_supported(args.shape, &why), "cuda decode_layers: ", why);
  LS_CHECK(args.slots.max_tiles == 1, "cuda decode_layers: a step of one token only");
  Params p;
  p.a = args;
  p.H = int(args.shape.hidden);
  p.nq = int(args.shape.heads);
  p.nkv = int(args.shape.kv_heads);
  p.G = p.nq / p.nkv;
  p.E = int(args.shape.experts);
  p.k = int(args.shape.experts_per_token);
  p.I = int(args.shape.intermediate);
  const int D = int(args.shape.head_dim);
  p.qkv_n = (p.nq + 2 * p.nkv) * D;
  int device = 0, sms = 0, max_smem = 0;
  LS_CUDA_CHECK(cudaGetDevice(&device));
  LS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  LS_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  p.L = layout_for(p, D, max_smem, sms);
  LS_CHECK(p.L.stages >= 4, "cuda decode_layers: ", max_smem, " bytes of shared memory leave ", p.L.stages,
           " weight stages (4 needed)");
  LS_CHECK(sms > p.nkv, "cuda decode_layers: as many kv heads as SMs (the QKV items go to the other CTAs)");
  p.trace = nullptr;
  if (Trace& t = trace_state(); t.on && sms <= kTraceMaxCtas && args.num_layers <= kTraceMaxLayers) {
    t.ctas = sms;
    t.layers = args.num_layers;
    p.trace = t.buffer;
  }
  auto kernel = D == 64 ? decode_layers_kernel<64> : decode_layers_kernel<128>;
  static const bool configured = [&] {
    for (auto k : {decode_layers_kernel<64>, decode_layers_kernel<128>})
      LS_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem));
    return true;
  }();
  (void)configured;
  int per_sm = 0;
  LS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, p.L.total));
  LS_CHECK(per_sm >= 1, "cuda decode_layers: the kernel does not fit on an SM");
  // One CTA per SM, all resident together (the grid barrier needs every CTA running): a
  // cooperative launch, so the driver guarantees it even beside kernels of other streams.
  LS_CUDA_CHECK(cudaMemsetAsync(args.barrier, 0, sizeof(uint32_t), stream));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(sms));
  config.blockDim = dim3(unsigned(kThreads));
  config.dynamicSmemBytes = p.L.total;
  config.stream = stream;
  cudaLaunchAttribute cooperative = {};
  cooperative.id = cudaLaunchAttributeCooperative;
  cooperative.val.cooperative = 1;
  config.attrs = &cooperative;
  config.numAttrs = 1;
  LS_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

}  // namespace lockstep::cuda
