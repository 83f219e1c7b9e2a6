// Linear-layer backward on the GPU: the chunked outer-product sums of backward.h (weight and
// input gradients) and the chunked column sums (norm weight gradients), in fp32 on CUDA cores.
// One procedure per output element, whatever the tile: each chunk's sum starts at 0 and adds
// one product per row in ascending order; the chunk partials fold by the pairwise tree. The
// linears with a bf16 operand run the tensor-core form (outer_sum_tc.cu); these CUDA-core
// sums, the CPU's bits, are its reference and serve the fp32 operands.
#include <algorithm>
#include <type_traits>

#include "kernels/canonical.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"
#include "kernels/cuda/common.cuh"

namespace lockstep::cuda {

namespace {

constexpr int kSide = 16;   // threads per block side
constexpr int kSteps = 16;  // summed rows staged in shared memory at a time

// Block tile (16 TI) x (16 TK) outputs; thread (ty, tx) owns rows i0 + ty + 16 a, columns
// k0 + tx + 16 b.
template <int TI, int TK, typename TG, typename TM>
__global__ void __launch_bounds__(kSide* kSide) outer_sum_kernel(const TG* g, int64_t g_row, int64_t g_col, const TM* m,
                                                                 int64_t K, ChunkBounds bounds, float* out, int64_t I) {
  constexpr int BI = kSide * TI, BK = kSide * TK;
  __shared__ float sg[kSteps][BI], sm[kSteps][BK];
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t i0 = int64_t(blockIdx.y) * BI, k0 = int64_t(blockIdx.x) * BK;
  TreeFold fold[TI][TK];
  float root[TI][TK];
  for (int c = 0; c < bounds.count; ++c) {
    float acc[TI][TK];
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < TK; ++b) acc[a][b] = 0.0f;
    const int64_t end = bounds.rows[c + 1];
    for (int64_t s0 = bounds.rows[c]; s0 < end; s0 += kSteps) {
      const int n = int(end - s0 < kSteps ? end - s0 : kSteps);
      __syncthreads();
      for (int idx = threadIdx.x; idx < kSteps * BI; idx += kSide * kSide) {
        const int st = idx / BI, ii = idx % BI;
        sg[st][ii] = st < n && i0 + ii < I ? widen(g[(i0 + ii) * g_row + (s0 + st) * g_col]) : 0.0f;
      }
      for (int idx = threadIdx.x; idx < kSteps * BK; idx += kSide * kSide) {
        const int st = idx / BK, kk = idx % BK;
        sm[st][kk] = st < n && k0 + kk < K ? widen(m[(s0 + st) * K + k0 + kk]) : 0.0f;
      }
      __syncthreads();
      for (int st = 0; st < n; ++st) {
        float gv[TI], mv[TK];
#pragma unroll
        for (int a = 0; a < TI; ++a) gv[a] = sg[st][ty + kSide * a];
#pragma unroll
        for (int b = 0; b < TK; ++b) mv[b] = sm[st][tx + kSide * b];
#pragma unroll
        for (int a = 0; a < TI; ++a)
#pragma unroll
          for (int b = 0; b < TK; ++b) acc[a][b] = acc[a][b] + gv[a] * mv[b];
      }
    }
#pragma unroll
    for (int a = 0; a < TI; ++a)
#pragma unroll
      for (int b = 0; b < TK; ++b) root[a][b] = fold[a][b].push(c, acc[a][b]);
  }
#pragma unroll
  for (int a = 0; a < TI; ++a)
#pragma unroll
    for (int b = 0; b < TK; ++b) {
      const int64_t i = i0 + ty + kSide * a, k = k0 + tx + kSide * b;
      if (i < I && k < K) out[i * K + k] = root[a][b];
    }
}

__global__ void column_sum_kernel(const float* a, const float* b, float* out, int64_t n, ChunkBounds bounds) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  TreeFold fold;
  float root = 0.0f;
  for (int c = 0; c < bounds.count; ++c) {
    float acc = 0.0f;
    for (int64_t r = bounds.rows[c]; r < bounds.rows[c + 1]; ++r)
      acc = acc + (b ? a[r * n + i] * b[r * n + i] : a[r * n + i]);
    root = fold.push(c, acc);
  }
  out[i] = root;
}

__global__ void round_to_bf16_kernel(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = to_f32(to_bf16(x[i]));
}

}  // namespace

ChunkBounds chunk_bounds(const cpu::TokenChunks& chunks) {
  ChunkBounds b;
  std::copy(chunks.rows, chunks.rows + kTMax + 1, b.rows);
  return b;
}

ChunkBounds token_chunk_bounds(int64_t T, int64_t rows_per_token) {
  return chunk_bounds(cpu::token_chunks(T, rows_per_token));
}

template <typename TG, typename TM>
void outer_sum_chunked(const TG* g, int64_t g_row, int64_t g_col, const TM* m, int64_t K, const ChunkBounds& bounds,
                       float* out, int64_t I, cudaStream_t s, OuterTile tile) {
  check_chunk_bounds(bounds, "outer_sum_chunked");
  if (I == 0 || K == 0) return;
  const int ti = tile == OuterTile::k4x4 ? 4 : 1;
  const dim3 grid(unsigned(ceil_div(K, kSide * ti)), unsigned(ceil_div(I, kSide * ti)));
  LS_CHECK(grid.y <= 65535, "outer_sum_chunked: ", I, " output rows exceed the grid");
  if (tile == OuterTile::k4x4)
    outer_sum_kernel<4, 4><<<grid, kSide * kSide, 0, s>>>(g, g_row, g_col, m, K, bounds, out, I);
  else
    outer_sum_kernel<1, 1><<<grid, kSide * kSide, 0, s>>>(g, g_row, g_col, m, K, bounds, out, I);
  LS_CUDA_LAUNCHED();
}

template <typename TX>
void linear_weight_grad(const float* dy, const TX* x, float* dW, int64_t N, int64_t K, const ChunkBounds& chunks,
                        cudaStream_t s) {
  // dW[n, k]: output rows n (factor dy[r * N + n]), the summed index the token row r.
  if constexpr (std::is_same_v<TX, bf16>)
    outer_sum_chunked_tc(dy, 1, N, x, K, chunks, dW, N, s);
  else
    outer_sum_chunked(dy, 1, N, x, K, chunks, dW, N, s);
}

template <typename TW>
void linear_input_grad(const float* dy, const TW* w, float* dx, int64_t T, int64_t N, int64_t K, cudaStream_t s) {
  // dx[t, k]: output rows t (factor dy[t * N + n]), the summed index n in its canonical chunks
  // (those of canonical_chunk(N), as the token chunks of N rows).
  const ChunkBounds b = token_chunk_bounds(N);
  if constexpr (std::is_same_v<TW, bf16>)
    outer_sum_chunked_tc(dy, N, 1, w, K, b, dx, T, s);
  else
    outer_sum_chunked(dy, N, 1, w, K, b, dx, T, s);
}

bool linear_grads_take_split(int64_t T, int64_t N, int64_t K, const ChunkBounds& chunks) {
  return outer_sum_split_tc_supported(1, N, K, chunks, N) &&
         outer_sum_split_tc_supported(N, 1, K, token_chunk_bounds(N), T);
}

namespace {
// The weight gradient, then the input gradient (over N's canonical chunks), of one operand.
void split_linear_grads(const bf16_t* g, const bf16_t* x, const bf16_t* w, float* dW, float* dx, int64_t T, int64_t N,
                        int64_t K, const ChunkBounds& chunks, float* workspace, cudaStream_t s,
                        GradientOperand operand) {
  outer_sum_split_tc(g, 1, N, x, K, chunks, dW, N, s, workspace, SplitTile::automatic, operand);
  outer_sum_split_tc(g, N, 1, w, K, token_chunk_bounds(N), dx, T, s, workspace, SplitTile::automatic, operand);
}
}  // namespace

void linear_grads_consuming_dy(float* dy, const bf16_t* x, const bf16_t* w, float* dW, float* dx, int64_t T, int64_t N,
                               int64_t K, const ChunkBounds& chunks, float* workspace, cudaStream_t s,
                               GradientOperand operand) {
  if (!linear_grads_take_split(T, N, K, chunks)) {
    if (operand == GradientOperand::bf16) round_to_bf16(dy, T * N, s);
    linear_weight_grad(dy, x, dW, N, K, chunks, s);
    linear_input_grad(dy, w, dx, T, N, K, s);
    return;
  }
  to_gradient_operand(dy, T, N, operand, s);
  split_linear_grads(reinterpret_cast<const bf16_t*>(dy), x, w, dW, dx, T, N, K, chunks, workspace, s, operand);
}

void linear_grads_of_packed_dy(const bf16_t* dy_packed, const bf16_t* x, const bf16_t* w, float* dW, float* dx,
                               int64_t T, int64_t N, int64_t K, const ChunkBounds& chunks, float* workspace,
                               cudaStream_t s) {
  LS_CHECK(linear_grads_take_split(T, N, K, chunks), "linear_grads_of_packed_dy: the split kernels do not take T ", T,
           ", N ", N, ", K ", K, " (check linear_grads_take_split first)");
  split_linear_grads(dy_packed, x, w, dW, dx, T, N, K, chunks, workspace, s, GradientOperand::bf16);
}

void round_to_bf16(float* x, int64_t n, cudaStream_t s) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 1 << 20);
  round_to_bf16_kernel<<<unsigned(blocks), 256, 0, s>>>(x, n);
  LS_CUDA_LAUNCHED();
}

void column_sum_chunked(const float* a, const float* b, float* out, int64_t n, const ChunkBounds& bounds,
                        cudaStream_t s) {
  check_chunk_bounds(bounds, "column_sum_chunked");
  if (n == 0) return;
  column_sum_kernel<<<unsigned(ceil_div(n, 256)), 256, 0, s>>>(a, b, out, n, bounds);
  LS_CUDA_LAUNCHED();
}

template void outer_sum_chunked<float, float>(const float*, int64_t, int64_t, const float*, int64_t, const ChunkBounds&,
                                              float*, int64_t, cudaStream_t, OuterTile);
template void outer_sum_chunked<float, bf16>(const float*, int64_t, int64_t, const bf16*, int64_t, const ChunkBounds&,
                                             float*, int64_t, cudaStream_t, OuterTile);
template void linear_weight_grad<float>(const float*, const float*, float*, int64_t, int64_t, const ChunkBounds&,
                                        cudaStream_t);
template void linear_weight_grad<bf16>(const float*, const bf16*, float*, int64_t, int64_t, const ChunkBounds&,
                                       cudaStream_t);
template void linear_input_grad<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, cudaStream_t);
template void linear_input_grad<bf16>(const float*, const bf16*, float*, int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace lockstep::cuda
