// Rollout engine throughput on the CPU: decode and prefill tokens/s at batch 1, 8 and 64 for
// a small random-weights Qwen3-MoE, each beside its memory-bandwidth bound:
//   bound tok/s = tokens per step * stream bandwidth / bytes touched per step,
// where the bytes are the weights a step reads (attention, router, lm_head, and the experts
// that B tokens touch, E * (1 - (1 - k/E)^B) per layer under uniform routing) plus the K/V it
// reads, and the bandwidth is measured here by a large memcpy ((read + write) bytes / s).
#include <benchmark/benchmark.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/philox.h"
#include "model/runner.h"
#include "rollout/engine.h"

namespace lockstep {
namespace {

using Clock = std::chrono::steady_clock;

ModelConfig bench_config() {
  ModelConfig c;
  c.vocab_size = 4096;
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.moe_intermediate_size = 128;
  c.num_hidden_layers = 4;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 32;
  c.num_experts = 16;
  c.num_experts_per_tok = 4;
  c.max_position_embeddings = 1024;
  return c;
}

const ModelWeights& bench_weights() {
  static const ModelWeights w = ModelWeights::random(bench_config(), 1, Precision::float32);
  return w;
}

double stream_bandwidth() {
  static const double bw = [] {
    const size_t n = size_t(128) << 20;
    std::vector<char> a(n, 1), b(n, 2);
    double best = 1e30;
    for (int rep = 0; rep < 5; ++rep) {
      auto t0 = Clock::now();
      std::memcpy(b.data(), a.data(), n);
      benchmark::DoNotOptimize(b.data());
      best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
      a[rep] = b[n - 1 - rep];
    }
    return 2.0 * double(n) / best;
  }();
  return bw;
}

// Bytes read by one forward step over `tokens` tokens from `batch` sequences of mean context
// `context` (fp32 weights and K/V).
double step_bytes(int64_t tokens, int64_t batch, int64_t context) {
  const ModelConfig c = bench_config();
  const double H = double(c.hidden_size), E = double(c.num_experts), k = double(c.num_experts_per_tok);
  const double attn = 2.0 * H * double(c.q_dim()) + 2.0 * H * double(c.kv_dim());
  const double expert = 3.0 * H * double(c.moe_intermediate_size);
  const double experts_touched = E * (1.0 - std::pow(1.0 - k / E, double(tokens)));
  const double kv = double(batch) * double(context) * 2.0 * double(c.kv_dim());
  const double per_layer = attn + E * H + experts_touched * expert + kv;
  return 4.0 * (double(c.num_hidden_layers) * per_layer + double(c.vocab_size) * H + double(tokens) * H);
}

rollout::Engine make_engine(int64_t batch, int64_t prompt_len, int64_t new_tokens) {
  rollout::EngineOptions o;
  o.kv_pages = batch * ((prompt_len + new_tokens) / 16 + 2);
  o.max_batch_tokens = 8192;
  o.prefill_chunk = 8192;
  o.prefix_cache = false;  // distinct prompts anyway; measure the plain path
  return rollout::Engine(make_cpu_runner(bench_weights().clone(), Precision::float32), o);
}

void add_requests(rollout::Engine& engine, int64_t batch, int64_t prompt_len, int64_t new_tokens) {
  for (int64_t b = 0; b < batch; ++b) {
    rollout::GenerationRequest r;
    for (int64_t t = 0; t < prompt_len; ++t)
      r.prompt.push_back(int32_t(philox_uniform(9, uint64_t(b), uint64_t(t)) * 4096.0f) % 4096);
    r.sampling = {1.0f, 0, 1.0f, uint64_t(b)};
    r.max_new_tokens = new_tokens;
    engine.add_request(r);
  }
}

void BM_Decode(benchmark::State& state) {
  const int64_t batch = state.range(0), prompt_len = 32, new_tokens = 32;
  double seconds = 0, tokens = 0;
  for (auto _ : state) {
    state.PauseTiming();
    rollout::Engine engine = make_engine(batch, prompt_len, new_tokens);
    add_requests(engine, batch, prompt_len, new_tokens);
    engine.step();  // the whole prefill (and first token) in one step
    state.ResumeTiming();
    auto t0 = Clock::now();
    int64_t steps = 0;
    while (engine.has_unfinished()) {
      engine.step();
      ++steps;
    }
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(s);
    seconds += s;
    tokens += double(batch * (new_tokens - 1));
  }
  const double bound = double(batch) * stream_bandwidth() / step_bytes(batch, batch, prompt_len + new_tokens / 2);
  state.counters["tok_per_s"] = tokens / seconds;
  state.counters["bw_bound_tok_per_s"] = bound;
  state.counters["of_bound"] = tokens / seconds / bound;
  state.counters["stream_GBps"] = stream_bandwidth() / 1e9;
}

void BM_Prefill(benchmark::State& state) {
  const int64_t batch = state.range(0), prompt_len = 128;
  double seconds = 0, tokens = 0;
  for (auto _ : state) {
    state.PauseTiming();
    rollout::Engine engine = make_engine(batch, prompt_len, 1);
    add_requests(engine, batch, prompt_len, 1);
    state.ResumeTiming();
    auto t0 = Clock::now();
    engine.run_to_completion();  // max_new_tokens 1: prefill plus the first sample only
    double s = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(s);
    seconds += s;
    tokens += double(batch * prompt_len);
  }
  const int64_t per_step = std::min<int64_t>(batch * prompt_len, 8192);
  const double bound = double(per_step) * stream_bandwidth() / step_bytes(per_step, batch, prompt_len / 2);
  state.counters["tok_per_s"] = tokens / seconds;
  state.counters["bw_bound_tok_per_s"] = bound;
  state.counters["of_bound"] = tokens / seconds / bound;
}

BENCHMARK(BM_Decode)->Arg(1)->Arg(8)->Arg(64)->UseManualTime()->Iterations(2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Prefill)->Arg(1)->Arg(8)->Arg(64)->UseManualTime()->Iterations(2)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace lockstep

BENCHMARK_MAIN();
