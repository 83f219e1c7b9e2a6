// The MoE block's backward kernels around the experts' GEMMs (backward.h): gathering expert
// rows, the combine's backward, and the sum of a token's expert input gradients in ascending
// expert id (cpu::moe_backward's order).
#include "kernels/cuda/backward.h"
#include "kernels/cuda/backward_common.cuh"

namespace lockstep::cuda {

namespace {

__global__ void gather_rows_kernel(const bf16* src, const int32_t* index, bf16* dst, int64_t H) {
  const int64_t r = blockIdx.x;
  const bf16* from = src + int64_t(index[r]) * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) dst[r * H + h] = from[h];
}

// The same in 16-byte pieces (H % 8 == 0, aligned rows): one piece a thread over all rows.
__global__ void gather_rows16_kernel(const uint4* src, const int32_t* index, uint4* dst, int64_t rows, int64_t pieces) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * pieces) return;
  const int64_t r = i / pieces, c = i - r * pieces;
  dst[i] = src[int64_t(index[r]) * pieces + c];
}

// Row r's part of the combine's backward, by one block. Its threads read the row once
// (coalesced): each element's product dout * y into shared memory for the dot, and its scaled
// gradient; then the dot is dot_lanes' procedure spread over 8 threads, thread j the lane of the
// indices = j (mod 8) in ascending order from shared memory, the lanes folded by the same tree:
// the same additions as one thread running dot_lanes. (Those 8 threads used to read the row from
// global memory themselves, eight loads in flight against a 256-long chain: 0.65 ms a layer.)
constexpr int kExpertOutThreads = 256;
__device__ __forceinline__ void expert_output_row(int64_t r, const float* dout, const bf16* y, const float* weights,
                                                  const int32_t* row_token, const int32_t* row_pair, float* dweights,
                                                  float* dy_rows, int64_t H, bool packed, float* products) {
  const int64_t t = row_token[r], pair = row_pair[r];
  const float* g = dout + t * H;
  const bf16* yr = y + pair * H;
  const float w = weights[pair];
  float* out = dy_rows + r * H;
  bf16* packed_out = reinterpret_cast<bf16*>(out);  // packed: the row's bf16 at the front of its bytes
  if (H % 4 == 0 && ((reinterpret_cast<uintptr_t>(g) | reinterpret_cast<uintptr_t>(out)) & 15) == 0 &&
      (reinterpret_cast<uintptr_t>(yr) & 7) == 0) {
    for (int64_t h = 4 * int64_t(threadIdx.x); h < H; h += 4 * kExpertOutThreads) {
      const float4 v = *reinterpret_cast<const float4*>(g + h);
      const uint2 yv = *reinterpret_cast<const uint2*>(yr + h);
      products[h] = v.x * __uint_as_float(yv.x << 16);
      products[h + 1] = v.y * __uint_as_float(yv.x & 0xffff0000u);
      products[h + 2] = v.z * __uint_as_float(yv.y << 16);
      products[h + 3] = v.w * __uint_as_float(yv.y & 0xffff0000u);
      const float4 d = make_float4(w * v.x, w * v.y, w * v.z, w * v.w);
      if (packed)
        *reinterpret_cast<uint2*>(packed_out + h) =
            make_uint2(pack_bf16(to_bf16(d.x), to_bf16(d.y)), pack_bf16(to_bf16(d.z), to_bf16(d.w)));
      else
        *reinterpret_cast<float4*>(out + h) = d;
    }
  } else {
    for (int64_t h = threadIdx.x; h < H; h += kExpertOutThreads) {
      products[h] = g[h] * widen(yr[h]);
      const float d = w * g[h];
      if (packed)
        packed_out[h] = to_bf16(d);
      else
        out[h] = d;
    }
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int j = int(threadIdx.x) & 7;
    float lane = 0.0f;
    if (threadIdx.x < 8) {
#pragma unroll 8
      for (int64_t i = j; i < H; i += 8) lane = lane + products[i];
    }
    float l[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) l[q] = __shfl_sync(0xffffffffu, lane, q);
    if (threadIdx.x == 0) dweights[pair] = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
}

// One block a row.
__global__ void __launch_bounds__(kExpertOutThreads)
    expert_output_backward_kernel(const float* dout, const bf16* y, const float* weights, const int32_t* row_token,
                                  const int32_t* row_pair, float* dweights, float* dy_rows, int64_t H, bool packed) {
  extern __shared__ float products[];  // [H]
  expert_output_row(blockIdx.x, dout, y, weights, row_token, row_pair, dweights, dy_rows, H, packed, products);
}

// One block a token: its k rows (order[t k + j]) one after the other, so the token's dout row
// comes from L1 after the first, where the rows in expert order read it once each from L2 or
// memory (a [T, H] fp32 tensor larger than L2 at 8192 tokens). Each row's arithmetic is the
// one-block-a-row kernel's. (At least 6 blocks an SM, as that kernel gets: its blocks wait on
// loads and on an 8-thread dot chain a row, so they need company.)
__global__ void __launch_bounds__(kExpertOutThreads, 6)
    expert_output_backward_by_token_kernel(const float* dout, const bf16* y, const float* weights,
                                           const int32_t* row_token, const int32_t* row_pair, const int32_t* order,
                                           int64_t k, float* dweights, float* dy_rows, int64_t H, bool packed) {
  extern __shared__ float products[];  // [H]
  for (int64_t j = 0; j < k; ++j) {
    if (j > 0) __syncthreads();  // the previous row's dot has read `products`
    expert_output_row(order[int64_t(blockIdx.x) * k + j], dout, y, weights, row_token, row_pair, dweights, dy_rows, H,
                      packed, products);
  }
}

// kSecond: each row is the sum of its two parts. kVec: 4 columns a thread (H % 4 == 0, 16-byte
// aligned rows); the same additions per element either way.
template <bool kSecond, bool kVec>
__global__ void add_rows_in_order_kernel(float* dh, const float* rows, const float* second_rows, const int32_t* order,
                                         int64_t k, int64_t H) {
  const int64_t t = blockIdx.x;
  const auto row = [&](int64_t j, int64_t h) {
    const int64_t at = int64_t(order[t * k + j]) * H + h;
    if constexpr (kVec) {
      const float4 a = *reinterpret_cast<const float4*>(rows + at);
      if constexpr (!kSecond) return a;
      const float4 b = *reinterpret_cast<const float4*>(second_rows + at);
      return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
    } else {
      return kSecond ? rows[at] + second_rows[at] : rows[at];
    }
  };
  constexpr int64_t kWidth = kVec ? 4 : 1;
  for (int64_t h = kWidth * threadIdx.x; h < H; h += kWidth * blockDim.x) {
    if constexpr (kVec) {
      float4 acc = *reinterpret_cast<const float4*>(dh + t * H + h);
      for (int64_t j = 0; j < k; ++j) {
        const float4 r = row(j, h);
        acc = make_float4(acc.x + r.x, acc.y + r.y, acc.z + r.z, acc.w + r.w);
      }
      *reinterpret_cast<float4*>(dh + t * H + h) = acc;
    } else {
      float acc = dh[t * H + h];
      for (int64_t j = 0; j < k; ++j) acc = acc + row(j, h);
      dh[t * H + h] = acc;
    }
  }
}

bool g_expert_output_by_token = false;  // set_expert_output_by_token

}  // namespace

void set_expert_output_by_token(bool on) { g_expert_output_by_token = on; }

bool expert_output_by_token() { return g_expert_output_by_token; }

void gather_rows(const bf16_t* src, const int32_t* index, bf16_t* dst, int64_t rows, int64_t H, cudaStream_t s) {
  if (rows == 0) return;
  if (H % 8 == 0 && ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0) {
    const int64_t pieces = H / 8;
    gather_rows16_kernel<<<unsigned(ceil_div(rows * pieces, 256)), 256, 0, s>>>(
        reinterpret_cast<const uint4*>(src), index, reinterpret_cast<uint4*>(dst), rows, pieces);
  } else {
    gather_rows_kernel<<<unsigned(rows), 256, 0, s>>>(src, index, dst, H);
  }
  LS_CUDA_LAUNCHED();
}

void expert_output_backward(const float* dout, const bf16_t* y, const float* weights, const int32_t* row_token,
                            const int32_t* row_pair, float* dweights, float* dy_rows, int64_t rows, int64_t H,
                            cudaStream_t s, RowsOut rows_out, const int32_t* order, int64_t k) {
  LS_CHECK(!order || (k > 0 && rows % k == 0), "expert_output_backward: rows by token need k > 0 dividing the ", rows,
           " rows, got k ", k);
  if (rows == 0) return;
  const size_t smem = size_t(H) * sizeof(float);  // the row's products
  LS_CHECK(smem <= 227 * 1024, "expert_output_backward: rows of ", H, " exceed shared memory");
  const bool packed = rows_out == RowsOut::packed_bf16;
  const auto launch = [&](auto kernel, int64_t blocks, auto... args) {
    if (smem > 48 * 1024)
      LS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<unsigned(blocks), kExpertOutThreads, smem, s>>>(args...);
  };
  if (order)
    launch(expert_output_backward_by_token_kernel, rows / k, dout, y, weights, row_token, row_pair, order, k, dweights,
           dy_rows, H, packed);
  else
    launch(expert_output_backward_kernel, rows, dout, y, weights, row_token, row_pair, dweights, dy_rows, H, packed);
  LS_CUDA_LAUNCHED();
}

void add_rows_in_order(float* dh, const float* rows, const float* second_rows, const int32_t* order, int64_t T,
                       int64_t k, int64_t H, cudaStream_t s) {
  if (T == 0) return;
  const bool vec = H % 4 == 0 && aligned16(dh) && aligned16(rows) && (!second_rows || aligned16(second_rows));
  const auto launch = [&](auto kernel) { kernel<<<unsigned(T), 256, 0, s>>>(dh, rows, second_rows, order, k, H); };
  if (second_rows)
    vec ? launch(add_rows_in_order_kernel<true, true>) : launch(add_rows_in_order_kernel<true, false>);
  else
    vec ? launch(add_rows_in_order_kernel<false, true>) : launch(add_rows_in_order_kernel<false, false>);
  LS_CUDA_LAUNCHED();
}

}  // namespace lockstep::cuda
