// Qwen3-30B-A3B on one GPU with random bf16 weights made on the device: prefill and decode
// throughput of the CUDA runner, each beside its roofline bound (HBM bytes touched or bf16
// FLOPs) measured against the card's ceilings. Prints one JSON object per line, then a table.
//   cuda_bench CONFIG.json [--layers N] [--quick] [--gemm]
// --gemm times the prefill GEMMs in every tile configuration instead.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#ifdef LOCKSTEP_CUDA
#include <chrono>

#include "core/error.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/ops.h"
#include "model/cuda/cuda_runner.h"

namespace {

using namespace lockstep;
using Clock = std::chrono::steady_clock;

constexpr double kCopyBandwidth = 4.2e12;  // bytes/s, measured device-to-device copy (DESIGN.md section 7)
constexpr double kMatmulPeak = 771e12;     // bf16 FLOP/s, measured 8192^3 matmul

struct ModelShape {
  double H, qd, kvd, E, k, I, V, L, D, nq;
  double attn_params() const { return (qd + 2 * kvd) * H + H * qd; }
  double expert_params() const { return 3 * I * H; }
  double active_experts(double tokens) const { return E * (1 - std::pow(1 - k / E, tokens)); }
};

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Batch {
  ForwardBatch fb;
  std::vector<std::vector<int32_t>> tables;
};

// B sequences, each with `pages` pages of 64 positions, numbered consecutively.
std::vector<std::vector<int32_t>> page_tables(int64_t B, int64_t pages) {
  std::vector<std::vector<int32_t>> t(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < pages; ++p) t[size_t(b)].push_back(int32_t(b * pages + p));
  return t;
}

int32_t token_of(int64_t b, int64_t t, int64_t V) { return int32_t((uint64_t(b) * 7919u + uint64_t(t) * 104729u) % uint64_t(V)); }

struct Result {
  std::string name;
  double achieved, bound, peer;
  std::string unit, bound_kind;
};

// The prefill GEMMs alone (16384 tokens of Qwen3-30B-A3B), each tile configuration timed
// with events (median of 5 after a warm-up): which shape to pick for large row counts.
void gemm_configs(const ModelConfig& c) {
  const int64_t T = 16384, H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size;
  const int64_t per = T * c.num_experts_per_tok / E;
  struct Shape {
    const char* name;
    int64_t M, N, K;
    int chunks, groups;
  };
  const Shape shapes[] = {{"qkv", T, c.q_dim() + 2 * c.kv_dim(), H, 1, 1},
                          {"o_proj", T, H, c.q_dim(), 8, 1},
                          {"gate_up", per * E, 2 * I, H, 1, int(E)},
                          {"down", per * E, H, I, 8, int(E)}};
  for (const auto& sh : shapes) {
    auto bf = [](int64_t n) {
      __nv_bfloat16* p = nullptr;
      LS_CHECK(cudaMalloc(&p, size_t(n) * 2) == cudaSuccess, "cudaMalloc");
      cuda::fill_random_bf16(p, n, uint64_t(n), 0.05f, 0.0f, nullptr);
      return p;
    };
    __nv_bfloat16 *A = bf(sh.M * sh.K), *W = bf(sh.groups * sh.N * sh.K), *O = bf(sh.M * sh.N);
    int32_t* rows = nullptr;
    std::vector<int32_t> hr;
    for (int g = 0; g <= sh.groups; ++g) hr.push_back(int32_t(g * (sh.M / sh.groups)));
    LS_CHECK(cudaMalloc(&rows, hr.size() * 4) == cudaSuccess, "cudaMalloc");
    cudaMemcpy(rows, hr.data(), hr.size() * 4, cudaMemcpyHostToDevice);
    cuda::GemmArgs g;
    g.A = A;
    g.lda = sh.K;
    g.W = W;
    g.ldw = sh.K;
    g.w_group_stride = sh.N * sh.K;
    g.M = sh.M;
    g.N = sh.N;
    g.K = sh.K;
    g.chunks = sh.chunks;
    if (sh.groups > 1) {
      g.group_rows = rows;
      g.groups = sh.groups;
    }
    g.out_bf16 = O;
    g.ldo = sh.N;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    for (int config = 2; config < cuda::kGemmConfigs; ++config) {
      std::vector<float> ms;
      cuda::gemm_with_config(g, config, nullptr);
      for (int r = 0; r < 5; ++r) {
        cudaEventRecord(e0);
        cuda::gemm_with_config(g, config, nullptr);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float t = 0;
        cudaEventElapsedTime(&t, e0, e1);
        ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      const double flops = 2.0 * double(sh.M) * double(sh.N) * double(sh.K);
      std::printf("{\"event\":\"gemm\",\"shape\":\"%s\",\"config\":%d,\"ms\":%.4f,\"tflops\":%.1f}\n", sh.name,
                  config, ms[2], flops / (ms[2] * 1e-3) / 1e12);
    }
    LS_CHECK(cudaDeviceSynchronize() == cudaSuccess, "gemm bench failed");
    cudaFree(A);
    cudaFree(W);
    cudaFree(O);
    cudaFree(rows);
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: cuda_bench CONFIG.json [--layers N] [--quick]\n");
    return 2;
  }
  try {
    ModelConfig config = ModelConfig::load(argv[1]);
    bool quick = false, gemm_only = false;
    for (int i = 2; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--layers") && i + 1 < argc) config.num_hidden_layers = std::atoi(argv[++i]);
      else if (!std::strcmp(argv[i], "--quick")) quick = true;
      else if (!std::strcmp(argv[i], "--gemm")) gemm_only = true;
    }
    if (gemm_only) {
      gemm_configs(config);
      return 0;
    }
    const ModelShape s{double(config.hidden_size), double(config.q_dim()), double(config.kv_dim()),
                  double(config.num_experts), double(config.num_experts_per_tok), double(config.moe_intermediate_size),
                  double(config.vocab_size), double(config.num_hidden_layers), double(config.head_dim),
                  double(config.num_attention_heads)};
    auto t0 = Clock::now();
    auto runner = make_cuda_runner_random(config, 1);
    std::printf("{\"event\":\"weights\",\"layers\":%lld,\"seconds\":%.2f}\n", (long long)config.num_hidden_layers,
                seconds_since(t0));
    std::vector<Result> results;

    // Prefill: 8 sequences of 2048 tokens in one step; the last token of each is sampled.
    {
      const int64_t B = quick ? 2 : 8, P = quick ? 512 : 2048, pages = P / 64;
      runner->allocate_kv(B * pages, 64);
      auto tables = page_tables(B, pages);
      ForwardBatch fb;
      std::vector<SampleRequest> reqs;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < P; ++t) {
          fb.tokens.push_back(token_of(b, t, config.vocab_size));
          fb.positions.push_back(int32_t(t));
          fb.page_tables.push_back(tables[size_t(b)].data());
        }
        SampleRequest r;
        r.row = fb.size() - 1;
        r.seed = 1;
        r.stream = uint64_t(b);
        r.position = uint64_t(P);
        reqs.push_back(r);
      }
      runner->forward_sample(fb, reqs);  // warm-up (allocations, module load)
      const int reps = quick ? 1 : 3;
      auto t1 = Clock::now();
      for (int i = 0; i < reps; ++i) runner->forward_sample(fb, reqs);
      const double sec = seconds_since(t1) / reps;
      const double tokens = double(B * P);
      const double matmul = 2 * tokens * s.L * (s.attn_params() + s.E * s.H + s.k * s.expert_params()) + 2 * B * s.V * s.H;
      const double attn = 4 * s.L * s.nq * s.D * B * (double(P) * (P + 1) / 2);
      const double flops = matmul + attn;
      std::printf("{\"event\":\"prefill\",\"batch\":%lld,\"prompt\":%lld,\"seconds\":%.4f,\"tok_s\":%.1f,\"tflops\":%.1f}\n",
                  (long long)B, (long long)P, sec, tokens / sec, flops / sec / 1e12);
      results.push_back({"prefill " + std::to_string(B) + "x" + std::to_string(P), tokens / sec,
                         tokens / (flops / kMatmulPeak), 0, "tok/s", "bf16 FLOPs"});
    }

    // Decode: B sequences, prompt 128, then 128 steps of one token each at temperature 1.
    std::vector<int64_t> batches = quick ? std::vector<int64_t>{1, 64} : std::vector<int64_t>{1, 8, 64, 256};
    for (int64_t B : batches) {
      const int64_t P = 128, N = quick ? 32 : 128, pages = (P + N + 63) / 64;
      runner->allocate_kv(B * pages, 64);
      auto tables = page_tables(B, pages);
      ForwardBatch fb;
      std::vector<SampleRequest> reqs;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < P; ++t) {
          fb.tokens.push_back(token_of(b, t, config.vocab_size));
          fb.positions.push_back(int32_t(t));
          fb.page_tables.push_back(tables[size_t(b)].data());
        }
        SampleRequest r;
        r.row = fb.size() - 1;
        r.temperature = 1.0f;
        r.seed = 7;
        r.stream = uint64_t(b);
        r.position = uint64_t(P);
        reqs.push_back(r);
      }
      auto out = runner->forward_sample(fb, reqs);
      double kv_bytes = 0;
      auto t1 = Clock::now();
      for (int64_t step = 0; step < N; ++step) {
        ForwardBatch d;
        std::vector<SampleRequest> dr;
        for (int64_t b = 0; b < B; ++b) {
          d.tokens.push_back(out[size_t(b)].token);
          d.positions.push_back(int32_t(P + step));
          d.page_tables.push_back(tables[size_t(b)].data());
          SampleRequest r;
          r.row = b;
          r.temperature = 1.0f;
          r.seed = 7;
          r.stream = uint64_t(b);
          r.position = uint64_t(P + step + 1);
          dr.push_back(r);
        }
        out = runner->forward_sample(d, dr);
        kv_bytes += double(B) * double(P + step + 1) * s.L * 2 * s.kvd * 2;
      }
      const double sec = seconds_since(t1);
      const double weight_bytes =
          double(N) * 2 * (s.L * (s.attn_params() + s.E * s.H + s.active_experts(double(B)) * s.expert_params()) + s.V * s.H);
      const double bound_sec = (weight_bytes + kv_bytes) / kCopyBandwidth;
      const double tok_s = double(B * N) / sec;
      std::printf("{\"event\":\"decode\",\"batch\":%lld,\"prompt\":%lld,\"new\":%lld,\"seconds\":%.4f,\"tok_s\":%.1f,"
                  "\"bound_tok_s\":%.1f,\"active_experts\":%.1f,\"hbm_TBps\":%.3f}\n",
                  (long long)B, (long long)P, (long long)N, sec, tok_s, double(B * N) / bound_sec,
                  s.active_experts(double(B)), (weight_bytes + kv_bytes) / sec / 1e12);
      results.push_back({"decode batch " + std::to_string(B), tok_s, double(B * N) / bound_sec, 0, "tok/s", "HBM bytes"});
    }
    std::printf("\n%-22s %12s %12s %9s  %s\n", "benchmark", "achieved", "bound", "fraction", "bound from");
    for (const auto& r : results)
      std::printf("%-22s %12.1f %12.1f %8.1f%%  %s\n", r.name.c_str(), r.achieved, r.bound, 100 * r.achieved / r.bound,
                  r.bound_kind.c_str());
    std::fflush(stdout);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
#else
int main() {
  std::printf("cuda_bench: this build has no CUDA backend (configure with -DLOCKSTEP_CUDA=ON)\n");
  return 0;
}
#endif
