// The attention backward's tensor-core kernels (paged_attention_backward_tc) at a training
// step's shape: B sequences of S tokens, Qwen3-30B-A3B's heads (32 query, 4 KV, head_dim 128)
// unless told otherwise, random bf16 q, output and cache, fp32 dout. Times each kernel choice
// (mma.sync, warpgroup MMA; the latter also with the forward's log-sum-exp given, as in
// training, with the dS tiles kept for dq: AttentionDsScratch, and with the dk/dv kernel's
// softmax overlapping its MMAs: set_attention_dkv_overlap) in the same run, checks that they
// give the same bits, and reports the model FLOP/s (2.5 x the causal forward's QK^T and PV:
// 10 D flops a (query, key) pair a head) against the card's measured bf16 matmul ceiling.
// Prints one JSON object per line.
//   cuda_attention_backward_bench [--batch B] [--seq S] [--heads H] [--kv-heads G] [--head-dim D] [--reps R]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#ifdef LOCKSTEP_CUDA
#include <cuda_runtime.h>

#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/attention.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/ops.h"  // fill_random_bf16, fill_random_f32

namespace {

using namespace lockstep;

constexpr double kMatmulPeak = 771e12;  // bf16 FLOP/s, measured 8192^3 matmul (notes/cuda-perf.md)

void cuda_ok(cudaError_t e) { LS_CHECK(e == cudaSuccess, "cuda_attention_backward_bench: ", cudaGetErrorString(e)); }

template <typename T>
T* device_copy(const std::vector<T>& host) {
  T* d = nullptr;
  cuda_ok(cudaMalloc(&d, host.size() * sizeof(T)));
  cuda_ok(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
T* device_zeros(int64_t n) {
  T* d = nullptr;
  cuda_ok(cudaMalloc(&d, size_t(n) * sizeof(T)));
  cuda_ok(cudaMemset(d, 0, size_t(n) * sizeof(T)));
  return d;
}
}  // namespace

int main(int argc, char** argv) {
  try {
    int64_t B = 4, S = 2048, heads = 32, kv_heads = 4, D = 128, reps = 10;
    for (int i = 1; i < argc; ++i) {
      auto value = [&]() {
        LS_CHECK(i + 1 < argc, "cuda_attention_backward_bench: ", argv[i], " needs a value");
        return std::atoll(argv[++i]);
      };
      if (!std::strcmp(argv[i], "--batch"))
        B = value();
      else if (!std::strcmp(argv[i], "--seq"))
        S = value();
      else if (!std::strcmp(argv[i], "--heads"))
        heads = value();
      else if (!std::strcmp(argv[i], "--kv-heads"))
        kv_heads = value();
      else if (!std::strcmp(argv[i], "--head-dim"))
        D = value();
      else if (!std::strcmp(argv[i], "--reps"))
        reps = value();
      else
        fail("cuda_attention_backward_bench: unknown argument ", argv[i]);
    }
    LS_CHECK(B >= 1 && S >= 1 && kv_heads >= 1 && heads % kv_heads == 0 && reps >= 1,
             "cuda_attention_backward_bench: bad shape");
    const int64_t T = B * S, page = 64, pages_per_seq = (S + page - 1) / page;
    // Sequence b's tokens b S .. b S + S - 1 at positions 0 .., its pages consecutive.
    std::vector<int32_t> positions(T), seq_of_token(T), tables(B * pages_per_seq), seq_first(B + 1), seq_tokens(T);
    for (int64_t t = 0; t < T; ++t) {
      positions[t] = int32_t(t % S);
      seq_of_token[t] = int32_t(t / S);
      seq_tokens[t] = int32_t(t);
    }
    for (int64_t i = 0; i < B * pages_per_seq; ++i) tables[i] = int32_t(i);
    for (int64_t b = 0; b <= B; ++b) seq_first[b] = int32_t(b * S);
    const int32_t stride = int32_t(pages_per_seq);
    const int64_t slots = B * pages_per_seq * page, items = T * heads;
    // Uniform random operands drawn on the device.
    auto* k = device_zeros<cuda::bf16_t>(slots * kv_heads * D);
    auto* v = device_zeros<cuda::bf16_t>(slots * kv_heads * D);
    auto* q = device_zeros<cuda::bf16_t>(items * D);
    auto* out = device_zeros<cuda::bf16_t>(items * D);
    float* dout = device_zeros<float>(items * D);
    cuda::fill_random_bf16(k, slots * kv_heads * D, 1, 1.0f, 0.0f, nullptr);
    cuda::fill_random_bf16(v, slots * kv_heads * D, 2, 1.0f, 0.0f, nullptr);
    cuda::fill_random_bf16(q, items * D, 3, 1.0f, 0.0f, nullptr);
    cuda::fill_random_bf16(out, items * D, 4, 1.0f, 0.0f, nullptr);
    cuda::fill_random_f32(dout, items * D, 5, 1.0f, 0.0f, nullptr);
    cuda::DeviceKvLayer kv{k, v, page, kv_heads, D};
    cuda::DeviceSlots dslots;
    dslots.positions = device_copy(positions);
    dslots.seq_of_token = device_copy(seq_of_token);
    dslots.page_tables = device_copy(tables);
    dslots.table_stride = device_copy(std::vector<int32_t>{stride});
    const int32_t* first = device_copy(seq_first);
    const int32_t* toks = device_copy(seq_tokens);
    float *lse = device_zeros<float>(items), *delta = device_zeros<float>(items);
    auto* dout_ws = device_zeros<cuda::bf16_t>(items * D);
    float *dq = device_zeros<float>(items * D), *dk = device_zeros<float>(T * kv_heads * D),
          *dv = device_zeros<float>(T * kv_heads * D);
    const float scale = 1.0f / std::sqrt(float(D));
    const double pairs = double(B) * double(S) * double(S + 1) / 2.0;
    const double model_flops = 10.0 * double(D) * pairs * double(heads);

    // The dS scratch: a tile for each (query tile, key tile at or before it) of each head.
    const int64_t ds_elems = cuda::attention_ds_elems(B, S, heads);
    const cuda::AttentionDsScratch ds{device_zeros<cuda::bf16_t>(ds_elems), ds_elems};
    struct Variant {
      const char* name;
      cuda::AttentionKernel kernel;
      bool lse_given, keep_ds, dkv_overlap;
    };
    // The variants after the first read the log-sum-exp the first one computed (lse).
    const Variant variants[] = {{"mma_sync", cuda::AttentionKernel::mma_sync, false, false, false},
                                {"wgmma", cuda::AttentionKernel::wgmma, false, false, false},
                                {"wgmma_lse_given", cuda::AttentionKernel::wgmma, true, false, false},
                                {"wgmma_ds_kept", cuda::AttentionKernel::wgmma, true, true, false},
                                {"wgmma_lse_given_dkv_overlap", cuda::AttentionKernel::wgmma, true, false, true},
                                {"wgmma_ds_kept_dkv_overlap", cuda::AttentionKernel::wgmma, true, true, true}};
    std::vector<float> first_bits;
    for (const Variant& variant : variants) {
      const char* name = variant.name;
      if (variant.kernel == cuda::AttentionKernel::wgmma && !cuda::attention_takes_wgmma(D)) continue;
      cuda::set_attention_dkv_overlap(variant.dkv_overlap);
      auto run = [&] {
        cuda::paged_attention_backward_tc(q, out, dout, kv, dslots, first, toks, T, heads, B, S, scale, lse, delta,
                                          dout_ws, dq, dk, dv, nullptr, variant.kernel, variant.lse_given,
                                          variant.keep_ds ? ds : cuda::AttentionDsScratch{});
      };
      run();  // warm-up
      cuda_ok(cudaDeviceSynchronize());
      cudaEvent_t start, stop;
      cudaEventCreate(&start);
      cudaEventCreate(&stop);
      cudaEventRecord(start);
      for (int64_t r = 0; r < reps; ++r) run();
      cudaEventRecord(stop);
      cuda_ok(cudaEventSynchronize(stop));
      float ms = 0;
      cudaEventElapsedTime(&ms, start, stop);
      const double sec = double(ms) / 1e3 / double(reps);
      // The gradients' bits, against the first kernel's.
      std::vector<float> bits(size_t(items * D + 2 * T * kv_heads * D));
      cuda_ok(cudaMemcpy(bits.data(), dq, size_t(items * D) * 4, cudaMemcpyDeviceToHost));
      cuda_ok(cudaMemcpy(bits.data() + items * D, dk, size_t(T * kv_heads * D) * 4, cudaMemcpyDeviceToHost));
      cuda_ok(cudaMemcpy(bits.data() + items * D + T * kv_heads * D, dv, size_t(T * kv_heads * D) * 4,
                         cudaMemcpyDeviceToHost));
      if (first_bits.empty()) first_bits = bits;
      const bool same = std::memcmp(bits.data(), first_bits.data(), bits.size() * 4) == 0;
      std::printf(
          "{\"event\":\"attention_backward\",\"kernel\":\"%s\",\"batch\":%lld,\"seq\":%lld,\"heads\":%lld,"
          "\"kv_heads\":%lld,\"head_dim\":%lld,\"ms\":%.4f,\"model_tflops\":%.1f,\"of_peak\":%.3f,"
          "\"same_bits_as_mma_sync\":%s}\n",
          name, static_cast<long long>(B), static_cast<long long>(S), static_cast<long long>(heads),
          static_cast<long long>(kv_heads), static_cast<long long>(D), sec * 1e3, model_flops / sec / 1e12,
          model_flops / sec / kMatmulPeak, same ? "true" : "false");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_attention_backward_bench: %s\n", e.what());
    return 1;
  }
}
#else
int main() {
  std::fprintf(stderr, "cuda_attention_backward_bench: this build has no CUDA backend\n");
  return 1;
}
#endif
