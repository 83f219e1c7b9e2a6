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

// dx per row: one thread a row for the sum (the CPU's dot procedure), then the block's
// threads over the row's elements.
__global__ void rmsnorm_dx_kernel(const bf16* x, const float* inv, const float* w, const float* dout, float* dx,
                                  int64_t n) {
  const int64_t r = blockIdx.x;
  const bf16* xr = x + r * n;
  const float* dr = dout + r * n;
  __shared__ float coef_s;
  const float ir = inv[r];
  if (threadIdx.x == 0) {
    const float s = dot_lanes([&](int64_t i) { return (w[i] * dr[i]) * to_f32(xr[i]); }, n);
    coef_s = ir * ir * ir * s / float(n);
  }
  __syncthreads();
  const float coef = coef_s;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dx[r * n + i] = ir * (w[i] * dr[i]) - to_f32(xr[i]) * coef;
}

// dw[i] = token-chunk tree of dout[r, i] * r(x[r, i] * inv[r]). A block takes 32 columns;
// thread (c, i) sums chunk c of column i (ascending rows), the first 32 fold the chunks by the
// tree: 8 threads a column, each element's arithmetic unchanged.
constexpr int kDwColumns = 32;
__global__ void __launch_bounds__(kDwColumns* kTMax)
    rmsnorm_dw_kernel(const bf16* x, const float* inv, const float* dout, float* dw, int64_t n, bool round_normed,
                      ChunkBounds bounds) {
  __shared__ float partial[kTMax][kDwColumns];
  const int col = threadIdx.x % kDwColumns, c = threadIdx.x / kDwColumns;
  const int64_t i = int64_t(blockIdx.x) * kDwColumns + col;
  float acc = 0.0f;
  auto term = [&](int64_t r) {
    const float normed = to_f32(x[r * n + i]) * inv[r];
    return dout[r * n + i] * (round_normed ? round_bf16(normed) : normed);
  };
  if (i < n && c < bounds.count) {
    // 16 rows' loads in flight, then their terms added in ascending order: the same sum.
    constexpr int kAhead = 16;
    int64_t r = bounds.rows[c];
    const int64_t end = bounds.rows[c + 1];
    for (; r + kAhead <= end; r += kAhead) {
      float terms[kAhead];
#pragma unroll
      for (int u = 0; u < kAhead; ++u) terms[u] = term(r + u);
#pragma unroll
      for (int u = 0; u < kAhead; ++u) acc = acc + terms[u];
    }
    for (; r < end; ++r) acc = acc + term(r);
  }
  partial[c][col] = acc;
  __syncthreads();
  if (c != 0 || i >= n) return;
  TreeFold fold;
  float root = 0.0f;
  for (int k = 0; k < bounds.count; ++k) root = fold.push(k, partial[k][col]);
  dw[i] = root;
}

template <typename TG>
__global__ void swiglu_backward_kernel(const TG* gu, const float* dout, float* dgate, float* dup, int64_t R,
                                       int64_t I) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= R * I) return;
  const int64_t r = idx / I, i = idx % I;
  const float g = widen(gu[r * 2 * I + i]), u = widen(gu[r * 2 * I + I + i]);
  const float s = 1.0f / (1.0f + expf(-g));
  const float silu = g / (1.0f + expf(-g));  // the forward's expression
  dup[idx] = dout[idx] * silu;
  dgate[idx] = dout[idx] * u * (s * (1.0f + g * (1.0f - s)));
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
                      int64_t rows, int64_t n, bool round_normed, const ChunkBounds& chunks, cudaStream_t s) {
  if (rows > 0) {
    rmsnorm_dx_kernel<<<unsigned(rows), 128, 0, s>>>(x, inv, w, dout, dx, n);
    LS_CUDA_LAUNCHED();
  }
  if (dw) {
    rmsnorm_dw_kernel<<<blocks_for(n, kDwColumns), kDwColumns * kTMax, 0, s>>>(x, inv, dout, dw, n, round_normed,
                                                                               chunks);
    LS_CUDA_LAUNCHED();
  }
}

template <typename TG>
void swiglu_backward(const TG* gu, const float* dout, float* dgate, float* dup, int64_t R, int64_t I, cudaStream_t s) {
  if (R * I == 0) return;
  swiglu_backward_kernel<<<blocks_for(R * I, 256), 256, 0, s>>>(gu, dout, dgate, dup, R, I);
  LS_CUDA_LAUNCHED();
}
template void swiglu_backward<float>(const float*, const float*, float*, float*, int64_t, int64_t, cudaStream_t);
template void swiglu_backward<bf16>(const bf16*, const float*, float*, float*, int64_t, int64_t, cudaStream_t);

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
