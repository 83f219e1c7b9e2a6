// CPU kernel benchmarks: linear (matmul) forward and backward, paged attention and the MoE
// layer, in GFLOP/s and as a fraction of this machine's measured fp32 peak (a
// throughput-bound, register-resident multiply-then-add loop on all threads of the pool,
// measured first in the same run); the linear also against its memory-bandwidth bound.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/philox.h"
#include "core/thread_pool.h"
#include "core/timer.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/linear_backward.h"
#include "kernels/cpu/moe.h"

namespace lockstep {
namespace {

std::vector<float> random_vector(int64_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = philox_uniform(seed, 0, uint64_t(i)) - 0.5f;
  return v;
}

// Twelve independent accumulators, acc += u * x, as in the inner step of dot(): throughput
// bound (a multiply and an add per lane per accumulator), not latency bound. The barriers keep
// x and u opaque so the products are computed every iteration.
__attribute__((noinline)) float peak_loop(int64_t iters, cpu::v8f x) {
  cpu::v8f a0 = x, a1 = x, a2 = x, a3 = x, a4 = x, a5 = x, a6 = x, a7 = x, a8 = x, a9 = x, a10 = x, a11 = x;
  cpu::v8f u0 = x + 1.0f, u1 = x + 2.0f, u2 = x + 3.0f, u3 = x + 4.0f;
  for (int64_t it = 0; it < iters; ++it) {
    asm volatile("" : "+v"(x));
    a0 += u0 * x, a1 += u1 * x, a2 += u2 * x, a3 += u3 * x, a4 += u0 * u1, a5 += u1 * u2;
    a6 += u2 * u3, a7 += u3 * u0, a8 += x * x, a9 += u0 * u2, a10 += u1 * u3, a11 += x * u0;
    asm volatile("" : "+v"(u0), "+v"(u1), "+v"(u2), "+v"(u3));
  }
  return cpu::reduce_lanes(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11)));
}

// Peak fp32 rate of separate multiply and add on 8-lane vectors (the kernels build with
// -ffp-contract=off and use 8-lane vectors), on all threads of the pool; best of 3.
double measure_peak_gflops() {
  static double peak = [] {
    const int64_t iters = 20'000'000;
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<float> per_thread(cpu_pool().size());
      Timer timer;
      cpu_pool().parallel_for(cpu_pool().size(), 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) per_thread[t] = peak_loop(iters, cpu::v8f{1e-20f, 1e-20f, 1e-20f, 1e-20f,
                                                                                   1e-20f, 1e-20f, 1e-20f, 1e-20f});
      });
      double seconds = timer.seconds();
      benchmark::DoNotOptimize(per_thread.data());
      best = std::max(best, double(cpu_pool().size()) * double(iters) * 12 * 8 * 2 / seconds / 1e9);
    }
    return best;
  }();
  return peak;
}

// Read bandwidth (bytes/s) of all threads of the pool summing a buffer far larger than the
// caches: the bound of a decode-sized linear, which reads every weight once. Best of 3.
double measure_read_bandwidth() {
  static double bw = [] {
    const int64_t n = int64_t(64) << 20;  // floats: 256 MiB
    std::vector<float> a(n, 1.0f);
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<float> sums(cpu_pool().size());
      Timer timer;
      cpu_pool().parallel_for(n / 8, 1 << 16, [&](int64_t b, int64_t e) {
        cpu::v8f acc0 = {0, 0, 0, 0, 0, 0, 0, 0}, acc1 = acc0, acc2 = acc0, acc3 = acc0;
        int64_t i = b;
        for (; i + 4 <= e; i += 4) {
          acc0 += cpu::load8(a.data() + i * 8);
          acc1 += cpu::load8(a.data() + i * 8 + 8);
          acc2 += cpu::load8(a.data() + i * 8 + 16);
          acc3 += cpu::load8(a.data() + i * 8 + 24);
        }
        for (; i < e; ++i) acc0 += cpu::load8(a.data() + i * 8);
        sums[b * int64_t(sums.size()) / (n / 8)] = cpu::reduce_lanes((acc0 + acc1) + (acc2 + acc3));
      });
      double seconds = timer.seconds();
      benchmark::DoNotOptimize(sums.data());
      best = std::max(best, double(n) * 4 / seconds);
    }
    return best;
  }();
  return bw;
}

void finish(benchmark::State& state, double flops_per_iter, double seconds, int64_t iters) {
  double gflops = flops_per_iter * double(iters) / seconds / 1e9;
  state.counters["GFLOP/s"] = gflops;
  state.counters["peak_GFLOP/s"] = measure_peak_gflops();
  state.counters["of_peak"] = gflops / measure_peak_gflops();
}

// Linear: tokens x hidden -> outputs (Qwen3-30B-A3B attention projection widths, scaled).
// bound_GFLOP/s = min(peak, flops / (weight bytes / read bandwidth)): at T = 1 the weights
// are read once for 2 flops per weight, so memory bandwidth is the bound.
void BM_Linear(benchmark::State& state) {
  const int64_t T = state.range(0), N = state.range(1), K = state.range(2);
  auto x = random_vector(T * K, 1), w = random_vector(N * K, 2);
  std::vector<float> y(T * N);
  measure_peak_gflops();
  const double bw = measure_read_bandwidth();
  Timer timer;
  int64_t iters = 0;
  for (auto _ : state) {
    cpu::linear(x.data(), w.data(), y.data(), T, N, K);
    benchmark::DoNotOptimize(y.data());
    ++iters;
  }
  const double flops = 2.0 * T * N * K;
  finish(state, flops, timer.seconds(), iters);
  const double bound = std::min(measure_peak_gflops(), flops / (4.0 * N * K / bw) / 1e9);
  state.counters["bound_GFLOP/s"] = bound;
  state.counters["of_bound"] = state.counters["GFLOP/s"] / bound;
  state.counters["read_GB/s"] = bw / 1e9;
}
BENCHMARK(BM_Linear)->Args({1, 2048, 2048})->Args({16, 2048, 2048})->Args({128, 2048, 2048})->UseRealTime();

void BM_LinearRowCanonical(benchmark::State& state) {
  const int64_t T = state.range(0), N = state.range(1), K = state.range(2);
  auto x = random_vector(T * K, 1), w = random_vector(N * K, 2);
  std::vector<float> y(T * N);
  measure_peak_gflops();
  Timer timer;
  int64_t iters = 0;
  for (auto _ : state) {
    cpu::linear_row(x.data(), w.data(), y.data(), T, N, K);
    benchmark::DoNotOptimize(y.data());
    ++iters;
  }
  finish(state, 2.0 * T * N * K, timer.seconds(), iters);
}
BENCHMARK(BM_LinearRowCanonical)->Args({16, 2048, 4096})->Args({128, 2048, 768})->UseRealTime();

// Backward linear: dW (canonical token-chunk tree) and dx (canonical over N).
void BM_LinearWeightGrad(benchmark::State& state) {
  const int64_t T = state.range(0), N = state.range(1), K = state.range(2);
  auto dy = random_vector(T * N, 1), x = random_vector(T * K, 2);
  std::vector<float> dW(N * K);
  const cpu::TokenChunks chunks = cpu::token_chunks(T);
  measure_peak_gflops();
  Timer timer;
  int64_t iters = 0;
  for (auto _ : state) {
    cpu::linear_weight_grad(dy.data(), x.data(), dW.data(), N, K, chunks);
    benchmark::DoNotOptimize(dW.data());
    ++iters;
  }
  finish(state, 2.0 * T * N * K, timer.seconds(), iters);
}
BENCHMARK(BM_LinearWeightGrad)->Args({128, 2048, 2048})->Args({512, 1024, 1024})->UseRealTime();

void BM_LinearInputGrad(benchmark::State& state) {
  const int64_t T = state.range(0), N = state.range(1), K = state.range(2);
  auto dy = random_vector(T * N, 1), w = random_vector(N * K, 2);
  std::vector<float> dx(T * K);
  measure_peak_gflops();
  Timer timer;
  int64_t iters = 0;
  for (auto _ : state) {
    cpu::linear_input_grad(dy.data(), w.data(), dx.data(), T, N, K);
    benchmark::DoNotOptimize(dx.data());
    ++iters;
  }
  finish(state, 2.0 * T * N * K, timer.seconds(), iters);
}
BENCHMARK(BM_LinearInputGrad)->Args({128, 2048, 2048})->Args({512, 1024, 1024})->UseRealTime();

// Causal prefill attention over a paged cache: seq tokens, 32 heads of 128 over 4 KV heads.
void BM_PagedAttentionPrefill(benchmark::State& state) {
  const int64_t T = state.range(0), heads = 32, kv_heads = 4, d = 128, page = 16;
  const int64_t pages = (T + page - 1) / page;
  auto q = random_vector(T * heads * d, 3);
  auto kc = random_vector(pages * page * kv_heads * d, 4), vc = random_vector(pages * page * kv_heads * d, 5);
  PagedKvLayer kv{kc.data(), vc.data(), pages, page, kv_heads, d};
  std::vector<int32_t> table(pages), pos(T);
  std::iota(table.begin(), table.end(), 0);
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<const int32_t*> tables(T, table.data());
  TokenSlots slots{pos.data(), tables.data()};
  std::vector<float> out(T * heads * d);
  measure_peak_gflops();
  Timer timer;
  int64_t iters = 0;
  for (auto _ : state) {
    cpu::paged_attention(q.data(), out.data(), kv, slots, T, heads, 0.088f);
    benchmark::DoNotOptimize(out.data());
    ++iters;
  }
  // q.k and p.v over the causal triangle: 2 * 2 * d per (query, key) pair per head.
  double pairs = double(T) * double(T + 1) / 2;
  finish(state, 4.0 * d * heads * pairs, timer.seconds(), iters);
}
BENCHMARK(BM_PagedAttentionPrefill)->Arg(256)->Arg(1024)->UseRealTime();

// One MoE layer at Qwen3-30B-A3B proportions scaled down 4x (hidden 512, 32 experts of 192, top 4).
void BM_MoeLayer(benchmark::State& state) {
  const int64_t T = state.range(0), H = 512, I = 192, E = 32, k = 4;
  auto x = random_vector(T * H, 6), router = random_vector(E * H, 7);
  std::vector<std::vector<float>> g, u, dn;
  std::vector<const float*> gp, up, dp;
  for (int64_t e = 0; e < E; ++e) {
    g.push_back(random_vector(I * H, 100 + e));
    u.push_back(random_vector(I * H, 200 + e));
    dn.push_back(random_vector(H * I, 300 + e));
  }
  for (int64_t e = 0; e < E; ++e) {
    gp.push_back(g[e].data());
    up.push_back(u[e].data());
    dp.push_back(dn[e].data());
  }
  std::vector<float> out(T * H);
  measure_peak_gflops();
  Timer timer;
  int64_t iters = 0;
  for (auto _ : state) {
    cpu::moe_forward(x.data(), router.data(), gp.data(), up.data(), dp.data(), out.data(), T, H, I, E, k, true, false);
    benchmark::DoNotOptimize(out.data());
    ++iters;
  }
  finish(state, 2.0 * T * (E * H + k * 3 * H * I), timer.seconds(), iters);
}
BENCHMARK(BM_MoeLayer)->Arg(1)->Arg(64)->Arg(512)->UseRealTime();

}  // namespace
}  // namespace lockstep

BENCHMARK_MAIN();
