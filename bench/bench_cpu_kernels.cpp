// CPU kernel benchmarks: linear (matmul), paged attention and the MoE layer, in GFLOP/s and
// as a fraction of this machine's measured fp32 peak (a register-resident multiply-add loop
// on all threads of the pool, measured first in the same run).
#include <benchmark/benchmark.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "core/philox.h"
#include "core/thread_pool.h"
#include "core/timer.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/dot.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/moe.h"

namespace lockstep {
namespace {

std::vector<float> random_vector(int64_t n, uint64_t seed) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = philox_uniform(seed, 0, uint64_t(i)) - 0.5f;
  return v;
}

// Peak fp32 rate of separate multiply and add (the kernels build with -ffp-contract=off).
double measure_peak_gflops() {
  static double peak = [] {
    const int64_t iters = 20'000'000;
    std::vector<double> per_thread(cpu_pool().size());
    Timer timer;
    cpu_pool().parallel_for(cpu_pool().size(), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        cpu::v8f acc[8], x = {1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f};
        for (int i = 0; i < 8; ++i) acc[i] = x * float(i);
        for (int64_t it = 0; it < iters / 8; ++it)
          for (int i = 0; i < 8; ++i) acc[i] = acc[i] * x + x;
        float s = 0;
        for (int i = 0; i < 8; ++i) s += cpu::reduce_lanes(acc[i]);
        per_thread[t] = s;
      }
    });
    double seconds = timer.seconds();
    benchmark::DoNotOptimize(per_thread.data());
    return double(cpu_pool().size()) * double(iters) * 8 * 8 * 2 / seconds / 1e9;
  }();
  return peak;
}

void report(benchmark::State& state, double flops_per_iter) {
  double peak = measure_peak_gflops();
  state.counters["GFLOP/s"] = benchmark::Counter(flops_per_iter / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_GFLOP/s"] = peak;
}

void finish(benchmark::State& state, double flops_per_iter, double seconds, int64_t iters) {
  double gflops = flops_per_iter * double(iters) / seconds / 1e9;
  state.counters["GFLOP/s"] = gflops;
  state.counters["peak_GFLOP/s"] = measure_peak_gflops();
  state.counters["of_peak"] = gflops / measure_peak_gflops();
}

// Linear: tokens x hidden -> outputs (Qwen3-30B-A3B attention projection widths, scaled).
void BM_Linear(benchmark::State& state) {
  const int64_t T = state.range(0), N = state.range(1), K = state.range(2);
  auto x = random_vector(T * K, 1), w = random_vector(N * K, 2);
  std::vector<float> y(T * N);
  measure_peak_gflops();
  Timer timer;
  int64_t iters = 0;
  for (auto _ : state) {
    cpu::linear(x.data(), w.data(), y.data(), T, N, K);
    benchmark::DoNotOptimize(y.data());
    ++iters;
  }
  finish(state, 2.0 * T * N * K, timer.seconds(), iters);
}
BENCHMARK(BM_Linear)->Args({1, 2048, 2048})->Args({16, 2048, 2048})->Args({128, 1024, 2048})->UseRealTime();

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
