// Row-wise and element-wise backward kernels on the GPU (backward.h): RMSNorm, SwiGLU, RoPE,
// the embedding's gradient rows, the residual add. The bf16 casts of the recipe are
// straight-through; every sum is the CPU's procedure (backward_common.cuh) or the forward's.
#include "kernels/canonical.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/row_ops.cuh"

namespace lockstep::cuda {

namespace {

// One block of `kNormThreads` per row (the hidden-state norms' procedure), or one warp per row
// (the heads' procedure), as the forward's rmsnorm_row and norm_rope_head sum the squares.
__global__ void __launch_bounds__(kNormThreads)
    inverse_rms_block_kernel(const bf16* x, float* inv, int64_t n, float eps) {
  __shared__ float scratch[kNormThreads / 32 + 1];
  const bf16* xr = x + int64_t(blockIdx.x) * n;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kNormThreads) {
    const float v = to_f32(xr[i]);
    ss += v * v;
  }
  const float r = inverse_rms(block_sum<kNormThreads / 32>(ss, scratch), int(n), eps);
  if (threadIdx.x == 0) inv[blockIdx.x] = r;
}

__global__ void inverse_rms_warp_kernel(const bf16* x, float* inv, int64_t rows, int64_t n, float eps) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  const bf16* xr = x + row * n;
  float ss = 0.0f;
  for (int64_t i = lane; i < n; i += 32) {
    const float v = to_f32(xr[i]);
    ss += v * v;
  }
  const float r = inverse_rms(warp_sum(ss), int(n), eps);
  if (lane == 0) inv[row] = r;
}

// dx per row, a warp a row: lanes 0-7 sum the CPU's dot procedure's 8 lanes (dot_lanes: lane j
// the products of the indices = j mod 8, ascending), folded by tree8; then all 32 lanes write
// the row. (A block a row with one thread summing left q_norm's 262k rows latency bound.)
constexpr int kDxRowsPerBlock = 8;
__global__ void __launch_bounds__(32 * kDxRowsPerBlock)
    rmsnorm_dx_kernel(const bf16* x, const float* inv, const float* w, const float* dout, float* dx, int64_t rows,
                      int64_t n, bool add_to_dx) {
  const int64_t r = int64_t(blockIdx.x) * kDxRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const bf16* xr = x + r * n;
  const float* dr = dout + r * n;
  float part = 0.0f;
  if (lane < 8)
    for (int64_t i = lane; i < n; i += 8) part = part + (w[i] * dr[i]) * to_f32(xr[i]);
  float lanes[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) lanes[j] = __shfl_sync(0xffffffffu, part, j);
  const float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  const float ir = inv[r];
  const float coef = ir * ir * ir * sum / float(n);
  for (int64_t i = lane; i < n; i += 32) {
    const float g = ir * (w[i] * dr[i]) - to_f32(xr[i]) * coef;
    dx[r * n + i] = add_to_dx ? dx[r * n + i] + g : g;
  }
}

// dw[i] = token-chunk tree of dout[r, i] * r(x[r, i] * inv[r]), in two kernels (x's row r at
// (r / x_heads) x_pitch + (r % x_heads) n: the heads of a token inside its qkv row). The partials:
// block (32 columns, chunk c); warp 0's lane i adds column i's terms of the chunk in ascending
// rows from a shared tile while 8 loader warps compute the next tile's terms (16 rows each, all
// loads in flight at once). q_norm's 262k rows x 128 columns were 4 blocks of one thread a
// (chunk, column) before: 2.7 ms, the sum's latency chain waiting on every load.
constexpr int kDwColumns = 32, kDwLoaderWarps = 8, kDwTileRows = 128;
constexpr int kDwRowsPerLoader = kDwTileRows / kDwLoaderWarps;
__global__ void __launch_bounds__(32 * (1 + kDwLoaderWarps))
    rmsnorm_dw_partials_kernel(const bf16* x, int64_t x_heads, int64_t x_pitch, const float* inv, const float* dout,
                               float* partials, int64_t n, bool round_normed, ChunkBounds bounds) {
  __shared__ float terms[2][kDwTileRows][kDwColumns];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, c = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * kDwColumns + lane, first = bounds.rows[c], end = bounds.rows[c + 1];
  // Loader warp w (1-based) computes the tile's rows w - 1, w - 1 + 8, ...; zero past the chunk.
  // x's (token, head) of those rows: one division a tile, then steps of 8 rows.
  const int64_t step_token = kDwLoaderWarps / x_heads, step_head = kDwLoaderWarps % x_heads;
  auto fill = [&](int buf, int64_t r0) {
    float dv[kDwRowsPerLoader], xv[kDwRowsPerLoader], iv[kDwRowsPerLoader];
    int64_t token = (r0 + warp - 1) / x_heads, head = (r0 + warp - 1) % x_heads;
#pragma unroll
    for (int u = 0; u < kDwRowsPerLoader; ++u) {
      const int64_t r = r0 + (warp - 1) + u * kDwLoaderWarps;
      const bool inside = r < end && i < n;
      dv[u] = inside ? dout[r * n + i] : 0.0f;
      xv[u] = inside ? to_f32(x[token * x_pitch + head * n + i]) : 0.0f;
      iv[u] = inside ? inv[r] : 0.0f;
      token += step_token, head += step_head;
      if (head >= x_heads) head -= x_heads, ++token;
    }
#pragma unroll
    for (int u = 0; u < kDwRowsPerLoader; ++u) {
      const float normed = xv[u] * iv[u];
      terms[buf][(warp - 1) + u * kDwLoaderWarps][lane] = dv[u] * (round_normed ? round_bf16(normed) : normed);
    }
  };
  float acc = 0.0f;
  if (warp != 0) fill(0, first);
  __syncthreads();
  int buf = 0;
  for (int64_t r0 = first; r0 < end; r0 += kDwTileRows, buf ^= 1) {
    if (warp != 0) {
      if (r0 + kDwTileRows < end) fill(buf ^ 1, r0 + kDwTileRows);
    } else {
      const int count = int(end - r0 < kDwTileRows ? end - r0 : kDwTileRows);
      for (int u = 0; u < count; ++u) acc = acc + terms[buf][u][lane];
    }
    __syncthreads();
  }
  if (warp == 0 && i < n) partials[c * n + i] = acc;
}

// The same partials, streamed (rows of 16-byte pieces: n and x's pitch multiples of 8): block
// (kCols columns, chunk c); the loader warps copy the chunk's raw rows (dout, x through the head
// map, inv) by cp.async into a ring kDwStages tiles deep, turn a landed tile into terms in
// shared memory, and warp 0 adds a tile's terms in ascending rows one tile behind, sixteen rows
// of loads ahead of its additions. (The loader warps above wait on their own loads every tile:
// q_norm's weight gradient takes 0.82 ms a layer there, 0.38 here; notes/gpu-trainer.md.)
// kCols 8 with 4x the rows a tile: where 32 columns leave most SMs idle (q_norm: 4 column blocks
// x 8 chunks), the bytes a chain needs are what one SM can have in flight: 4x the blocks, each
// streaming a quarter of the bytes.
constexpr int kDwStages = 4;
bool g_narrow_dw_blocks = true;  // set_rmsnorm_narrow_dw_blocks
template <int kCols, int kTileRows>
struct DwShared {
  struct Raw {
    float dout[kTileRows][kCols];
    bf16 x[kTileRows][kCols];
    float inv[kTileRows];
  } raw[kDwStages];
  float terms[2][kTileRows][kCols];
};
constexpr int kDwStreamLoaderWarps = 16, kDwLoaderThreads = 32 * kDwStreamLoaderWarps;
template <int kCols, int kTileRows>
__global__ void __launch_bounds__(32 * (1 + kDwStreamLoaderWarps))
    rmsnorm_dw_partials_streamed_kernel(const bf16* x, int64_t x_heads, int64_t x_pitch, const float* inv,
                                        const float* dout, float* partials, int64_t n, bool round_normed,
                                        ChunkBounds bounds) {
  using Shared = DwShared<kCols, kTileRows>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Shared& sh = *reinterpret_cast<Shared*>(smem_raw);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, c = blockIdx.y;
  const int64_t i0 = int64_t(blockIdx.x) * kCols, first = bounds.rows[c], end = bounds.rows[c + 1];
  const int tiles = int((end - first + kTileRows - 1) / kTileRows);
  const int loader = int(threadIdx.x) - 32;  // 0 .. kDwLoaderThreads - 1 in the loader warps
  // Tile t's raw rows into its ring slot (zeros past the chunk and past column n), one group.
  auto issue = [&](int t) {
    if (t < tiles) {
      typename Shared::Raw& raw = sh.raw[t % kDwStages];
      const int64_t r0 = first + int64_t(t) * kTileRows;
      constexpr int kDoutPieces = kCols / 4, kXPieces = kCols / 8;  // 16 bytes each
      for (int q = loader; q < kTileRows * kDoutPieces; q += kDwLoaderThreads) {
        const int row = q / kDoutPieces, piece = q % kDoutPieces;
        const int64_t r = min(r0 + row, end - 1), col = i0 + piece * 4;
        cp_async16(smem_addr(&raw.dout[row][piece * 4]), dout + r * n + min(col, n - 4), r0 + row < end && col < n);
      }
      for (int q = loader; q < kTileRows * kXPieces; q += kDwLoaderThreads) {
        const int row = q / kXPieces, piece = q % kXPieces;
        const int r = int(min(r0 + row, end - 1)), heads = int(x_heads);  // rows < 2^31: 32-bit divisions
        const int64_t col = i0 + piece * 8;
        const bf16* src = x + int64_t(r / heads) * x_pitch + int64_t(r % heads) * n + min(col, n - 8);
        cp_async16(smem_addr(&raw.x[row][piece * 8]), src, r0 + row < end && col < n);
      }
      for (int row = loader; row < kTileRows; row += kDwLoaderThreads)
        cp_async4(smem_addr(&raw.inv[row]), inv + min(r0 + row, end - 1), r0 + row < end);
    }
    cp_async_commit();
  };
  float acc = 0.0f;
  if (warp != 0)
    for (int t = 0; t < kDwStages - 1; ++t) issue(t);
  for (int t = 0; t <= tiles; ++t) {
    if (warp != 0 && t < tiles) {
      issue(t + kDwStages - 1);
      cp_async_wait<kDwStages - 1>();                                        // tile t's pieces, this thread's
      asm volatile("bar.sync 1, %0;\n" ::"n"(kDwLoaderThreads) : "memory");  // every loader's
      const typename Shared::Raw& raw = sh.raw[t % kDwStages];
      for (int q = loader; q < kTileRows * kCols; q += kDwLoaderThreads) {
        const int row = q / kCols, col = q % kCols;
        const float normed = to_f32(raw.x[row][col]) * raw.inv[row];
        sh.terms[t % 2][row][col] = raw.dout[row][col] * (round_normed ? round_bf16(normed) : normed);
      }
    } else if (warp == 0 && t > 0 && lane < kCols) {
      const float(&terms)[kTileRows][kCols] = sh.terms[(t - 1) % 2];
      const int64_t r0 = first + int64_t(t - 1) * kTileRows;
      if (end - r0 >= kTileRows) {
#pragma unroll 16
        for (int u = 0; u < kTileRows; ++u) acc = acc + terms[u][lane];
      } else {
        for (int u = 0; u < int(end - r0); ++u) acc = acc + terms[u][lane];
      }
    }
    __syncthreads();  // tile t's terms are written; tile t - 1's are read
  }
  if (warp == 0 && lane < kCols && i0 + lane < n) partials[c * n + i0 + lane] = acc;
}

template <int kCols, int kTileRows>
void launch_dw_partials_streamed(const bf16* x, int64_t x_heads, int64_t x_pitch, const float* inv, const float* dout,
                                 float* partials, int64_t n, bool round_normed, const ChunkBounds& chunks,
                                 cudaStream_t s) {
  const auto kernel = rmsnorm_dw_partials_streamed_kernel<kCols, kTileRows>;
  constexpr int bytes = int(sizeof(DwShared<kCols, kTileRows>));
  static const bool configured = [&] {
    LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    return true;
  }();
  (void)configured;
  const dim3 grid(unsigned(ceil_div(n, kCols)), unsigned(chunks.count));
  kernel<<<grid, 32 * (1 + kDwStreamLoaderWarps), bytes, s>>>(x, x_heads, x_pitch, inv, dout, partials, n, round_normed,
                                                              chunks);
}

__global__ void fold_chunk_partials_kernel(const float* partials, float* out, int64_t n, int count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  TreeFold fold;
  float root = 0.0f;
  for (int k = 0; k < count; ++k) root = fold.push(k, partials[k * n + i]);
  out[i] = root;
}

template <typename TG>
__global__ void swiglu_backward_kernel(const TG* gu, const float* dout, float* dgate, float* dup, int64_t R, int64_t I,
                                       bool packed) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= R * I) return;
  const int64_t r = idx / I, i = idx % I;
  const float g = widen(gu[r * 2 * I + i]), u = widen(gu[r * 2 * I + I + i]);
  const float s = 1.0f / (1.0f + expf(-g));
  const float silu = g / (1.0f + expf(-g));  // the forward's expression
  const float d_up = dout[idx] * silu, d_gate = dout[idx] * u * (s * (1.0f + g * (1.0f - s)));
  if (packed) {  // element (r, i) at bf16 index 2 I r + i: the front of row r's own bytes
    reinterpret_cast<bf16*>(dup)[2 * I * r + i] = to_bf16(d_up);
    reinterpret_cast<bf16*>(dgate)[2 * I * r + i] = to_bf16(d_gate);
  } else {
    dup[idx] = d_up;
    dgate[idx] = d_gate;
  }
}

__global__ void rope_backward_kernel(float* dx, const int32_t* positions, const float* rope_cos, const float* rope_sin,
                                     int64_t T, int64_t heads, int64_t half) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * heads * half) return;
  const int64_t i = idx % half, th = idx / half, t = th / heads;
  const int64_t p = positions[t];
  const float c = rope_cos[p * half + i], s = rope_sin[p * half + i];
  float* v = dx + th * 2 * half;
  const float d1 = v[i], d2 = v[i + half];
  v[i] = d1 * c + d2 * s;
  v[i + half] = d2 * c - d1 * s;
}

// qk_norm_rope_store's backward for one kind of head, a warp a (token, head) row, lane l
// holding elements l + 32 j: RoPE's backward on dq in place (rope_backward_kernel's
// expressions; a pair i, i + D / 2 lies in one lane), 1 / rms of the projection row
// (inverse_rms_warp_kernel's order), rmsnorm_dx_kernel's dx (its dot by dot_lanes_of_warp).
// The same operations, so the same bits.
template <int D>
__global__ void __launch_bounds__(32 * kDxRowsPerBlock)
    qk_norm_rope_backward_kernel(float* dq, const bf16* proj, int64_t pitch, const int32_t* positions,
                                 const float* rope_cos, const float* rope_sin, const float* w, float* inv,
                                 float* d_proj, int64_t rows, int64_t heads, float eps) {
  constexpr int kPer = D / 32, kPairs = kPer / 2, half = D / 2;
  const int64_t r = int64_t(blockIdx.x) * kDxRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t t = r / heads, p = positions[t];
  float* dr = dq + r * D;
  const bf16* xr = proj + t * pitch + (r % heads) * D;
  float d[kPer], x[kPer], wd[kPer];
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const int i = lane + 32 * j;
    const float c = rope_cos[p * half + i], s = rope_sin[p * half + i];
    const float d1 = dr[i], d2 = dr[i + half];
    d[j] = d1 * c + d2 * s;
    d[j + kPairs] = d2 * c - d1 * s;
  }
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    x[j] = to_f32(xr[lane + 32 * j]);
    ss += x[j] * x[j];
  }
  const float ir = inverse_rms(warp_sum(ss), D, eps);
  float prod[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    dr[lane + 32 * j] = d[j];
    wd[j] = w[lane + 32 * j] * d[j];
    prod[j] = wd[j] * x[j];
  }
  const float sum = dot_lanes_of_warp(prod);
  const float coef = ir * ir * ir * sum / float(D);
#pragma unroll
  for (int j = 0; j < kPer; ++j) d_proj[r * D + lane + 32 * j] = ir * wd[j] - x[j] * coef;
  if (lane == 0) inv[r] = ir;
}

// One block per used id; a token's chunk is its position's canonical chunk among T tokens.
__global__ void embedding_backward_kernel(const int32_t* used_ids, const int32_t* starts, const int32_t* tokens,
                                          const float* dout, float* dtable, int64_t T, int64_t H) {
  const int64_t u = blockIdx.x, len = (T + kTMax - 1) / kTMax;
  const int32_t* toks = tokens + starts[u];
  const int64_t count = starts[u + 1] - starts[u];
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float parts[kTMax] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t j = 0; j < count; ++j) {
      const int64_t t = toks[j];
      const int c = int(t / len);
#pragma unroll
      for (int cc = 0; cc < kTMax; ++cc)
        if (cc == c) parts[cc] = parts[cc] + dout[t * H + h];
    }
    dtable[int64_t(used_ids[u]) * H + h] =
        ((parts[0] + parts[1]) + (parts[2] + parts[3])) + ((parts[4] + parts[5]) + (parts[6] + parts[7]));
  }
}

__global__ void add_inplace_kernel(float* x, const float* y, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = x[i] + y[i];
}

unsigned blocks_for(int64_t n, int threads) { return unsigned(ceil_div(n, threads)); }

}  // namespace

void inverse_rms_rows(const bf16_t* x, float* inv, int64_t rows, int64_t n, float eps, int threads, cudaStream_t s) {
  LS_CHECK(threads == kNormThreads || threads == 32, "inverse_rms_rows: the forward's procedures use ", kNormThreads,
           " or 32 threads, got ", threads);
  if (rows == 0) return;
  if (threads == kNormThreads)
    inverse_rms_block_kernel<<<unsigned(rows), kNormThreads, 0, s>>>(x, inv, n, eps);
  else
    inverse_rms_warp_kernel<<<blocks_for(rows, 8), 256, 0, s>>>(x, inv, rows, n, eps);
  LS_CUDA_LAUNCHED();
}

void rmsnorm_backward(const bf16_t* x, const float* inv, const float* w, const float* dout, float* dx, float* dw,
                      float* dw_partials, int64_t rows, int64_t n, bool round_normed, const ChunkBounds& chunks,
                      cudaStream_t s, bool add_to_dx) {
  if (rows > 0) {
    rmsnorm_dx_kernel<<<blocks_for(rows, kDxRowsPerBlock), 32 * kDxRowsPerBlock, 0, s>>>(x, inv, w, dout, dx, rows, n,
                                                                                         add_to_dx);
    LS_CUDA_LAUNCHED();
  }
  if (dw) rmsnorm_weight_grad(x, 1, n, inv, dout, dw, dw_partials, n, round_normed, chunks, s);
}

void set_rmsnorm_narrow_dw_blocks(bool on) { g_narrow_dw_blocks = on; }

bool rmsnorm_narrow_dw_blocks() { return g_narrow_dw_blocks; }

void rmsnorm_weight_grad(const bf16_t* x, int64_t x_heads, int64_t x_pitch, const float* inv, const float* dout,
                         float* dw, float* dw_partials, int64_t n, bool round_normed, const ChunkBounds& chunks,
                         cudaStream_t s) {
  if (n == 0) return;
  LS_CHECK(dw_partials, "rmsnorm_weight_grad: dw needs its chunk partials' buffer");
  LS_CHECK(x_heads >= 1 && x_pitch >= x_heads * n, "rmsnorm_weight_grad: rows of ", x_heads, " heads of ", n,
           " in a pitch of ", x_pitch);
  if (n % 8 == 0 && x_pitch % 8 == 0 && aligned16(x) && aligned16(dout) &&
      chunks.rows[chunks.count] < (int64_t(1) << 31)) {
    // Only speed depends on the block shape: each (chunk, column) sum is one chain either way.
    if (g_narrow_dw_blocks && ceil_div(n, 32) * chunks.count < sm_count())
      launch_dw_partials_streamed<8, 512>(x, x_heads, x_pitch, inv, dout, dw_partials, n, round_normed, chunks, s);
    else
      launch_dw_partials_streamed<32, 128>(x, x_heads, x_pitch, inv, dout, dw_partials, n, round_normed, chunks, s);
  } else {
    const dim3 grid(blocks_for(n, kDwColumns), unsigned(chunks.count));
    rmsnorm_dw_partials_kernel<<<grid, 32 * (1 + kDwLoaderWarps), 0, s>>>(x, x_heads, x_pitch, inv, dout, dw_partials,
                                                                          n, round_normed, chunks);
  }
  LS_CUDA_LAUNCHED();
  fold_chunk_partials(dw_partials, dw, n, chunks.count, s);
}

void fold_chunk_partials(const float* partials, float* out, int64_t n, int count, cudaStream_t s) {
  LS_CHECK(count >= 1 && count <= kTMax, "fold_chunk_partials: ", count, " partials");
  if (n == 0) return;
  fold_chunk_partials_kernel<<<blocks_for(n, 256), 256, 0, s>>>(partials, out, n, count);
  LS_CUDA_LAUNCHED();
}

bool qk_norm_rope_backward_supported(int64_t head_dim) { return head_dim == 64 || head_dim == 128 || head_dim == 256; }

void qk_norm_rope_backward(float* dq, const bf16_t* proj, int64_t proj_pitch, const int32_t* positions,
                           const float* rope_cos, const float* rope_sin, const float* w, float* inv, float* d_proj,
                           int64_t T, int64_t heads, int64_t head_dim, float eps, cudaStream_t s) {
  LS_CHECK(qk_norm_rope_backward_supported(head_dim), "qk_norm_rope_backward: head_dim ", head_dim,
           " is not 64, 128 or 256");
  LS_CHECK(proj_pitch >= heads * head_dim, "qk_norm_rope_backward: ", heads, " heads of ", head_dim, " in a pitch of ",
           proj_pitch);
  const int64_t rows = T * heads;
  if (rows == 0) return;
  auto kernel = head_dim == 64    ? qk_norm_rope_backward_kernel<64>
                : head_dim == 128 ? qk_norm_rope_backward_kernel<128>
                                  : qk_norm_rope_backward_kernel<256>;
  kernel<<<blocks_for(rows, kDxRowsPerBlock), 32 * kDxRowsPerBlock, 0, s>>>(dq, proj, proj_pitch, positions, rope_cos,
                                                                            rope_sin, w, inv, d_proj, rows, heads, eps);
  LS_CUDA_LAUNCHED();
}

template <typename TG>
void swiglu_backward(const TG* gu, const float* dout, float* dgate, float* dup, int64_t R, int64_t I, cudaStream_t s,
                     RowsOut rows_out) {
  if (R * I == 0) return;
  swiglu_backward_kernel<<<blocks_for(R * I, 256), 256, 0, s>>>(gu, dout, dgate, dup, R, I,
                                                                rows_out == RowsOut::packed_bf16);
  LS_CUDA_LAUNCHED();
}
template void swiglu_backward<float>(const float*, const float*, float*, float*, int64_t, int64_t, cudaStream_t,
                                     RowsOut);
template void swiglu_backward<bf16>(const bf16*, const float*, float*, float*, int64_t, int64_t, cudaStream_t, RowsOut);

void rope_backward(float* dx, const int32_t* positions, const float* rope_cos, const float* rope_sin, int64_t T,
                   int64_t heads, int64_t head_dim, cudaStream_t s) {
  const int64_t n = T * heads * (head_dim / 2);
  if (n == 0) return;
  rope_backward_kernel<<<blocks_for(n, 256), 256, 0, s>>>(dx, positions, rope_cos, rope_sin, T, heads, head_dim / 2);
  LS_CUDA_LAUNCHED();
}

void embedding_backward(const int32_t* used_ids, const int32_t* starts, const int32_t* tokens_by_id, int64_t used,
                        const float* dout, float* dtable, int64_t T, int64_t V, int64_t H, cudaStream_t s) {
  LS_CUDA_CHECK(cudaMemsetAsync(dtable, 0, size_t(V * H) * sizeof(float), s));
  if (used == 0) return;
  embedding_backward_kernel<<<unsigned(used), 256, 0, s>>>(used_ids, starts, tokens_by_id, dout, dtable, T, H);
  LS_CUDA_LAUNCHED();
}

void add_inplace(float* x, const float* y, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  add_inplace_kernel<<<blocks_for(n, 256), 256, 0, s>>>(x, y, n);
  LS_CUDA_LAUNCHED();
}

}  // namespace lockstep::cuda
