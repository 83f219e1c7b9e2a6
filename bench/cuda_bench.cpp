// Qwen3-30B-A3B on one GPU with random bf16 weights made on the device: prefill and decode
// throughput of the CUDA runner, each beside its roofline bound (HBM bytes touched or bf16
// FLOPs) measured against the card's ceilings. Prints one JSON object per line, then a table.
//   cuda_bench CONFIG.json [--layers N] [--quick] [--gemm [--gemm-tokens T]] [--decode-kernels]
//              [--no-prefill] [--batches 1,8,...]
// --gemm times the prefill GEMMs (or those of a step of T tokens) in every tile configuration
// instead; --decode-kernels each
// decode-step kernel (every GEMM tile configuration, the small ops) in graphs at 1, 8, 64 tokens
// (--only SHAPE: that GEMM shape at one token alone, for ncu); with --gemm, --only SHAPE and
// --gemm-config C time one shape and one configuration.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef LOCKSTEP_CUDA
#include <chrono>

#include "core/error.h"
#include "kernels/cuda/decode_layers.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/gemm_tma.h"
#include "kernels/cuda/ops.h"
#include "model/cuda/cuda_runner.h"

namespace {

using namespace lockstep;
using Clock = std::chrono::steady_clock;

constexpr double kCopyBandwidth = 4.2e12;  // bytes/s, measured device-to-device copy (notes/cuda-perf.md)
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

// The GEMMs of one forward step alone (T tokens of Qwen3-30B-A3B: 16384, the prefill step, by
// default), each tile configuration timed with events (median of 5 after a warm-up): which
// shape to pick for a row count. only / only_config: one shape and one configuration (for
// ncu), when set.
void gemm_configs(const ModelConfig& c, const std::string& only, int only_config, int64_t T) {
  const int64_t H = c.hidden_size, E = c.num_experts, I = c.moe_intermediate_size;
  const int64_t per = T * c.num_experts_per_tok / E;
  struct Shape {
    const char* name;
    int64_t M, N, K;
    int chunks, groups;
    bool gathered;  // A rows gathered from T token rows (as the model's gate_up)
    bool f32_out = false;  // fp32 output (the trainer's logits)
  };
  const Shape shapes[] = {{"qkv", T, c.q_dim() + 2 * c.kv_dim(), H, 1, 1, false},
                          {"o_proj", T, H, c.q_dim(), 8, 1, false},
                          {"router", T, E, H, 1, 1, false},  // bf16 out here, fp32 in the model
                          {"gate_up", per * E, 2 * I, H, 1, int(E), true},
                          {"down", per * E, H, I, 8, int(E), false},
                          // down without the tree (not a model GEMM): what the row form's folds cost
                          {"down_column", per * E, H, I, 1, int(E), false},
                          // the trainer's logits: every token, fp32 out (5 GB at 8192 tokens)
                          {"lm_head", T, c.vocab_size, H, 1, 1, false, true}};
  for (const auto& sh : shapes) {
    if (!only.empty() && only != sh.name) continue;
    auto bf = [](int64_t n) {
      __nv_bfloat16* p = nullptr;
      LS_CHECK(cudaMalloc(&p, size_t(n) * 2) == cudaSuccess, "cudaMalloc");
      cuda::fill_random_bf16(p, n, uint64_t(n), 0.05f, 0.0f, nullptr);
      return p;
    };
    __nv_bfloat16 *A = bf((sh.gathered ? T : sh.M) * sh.K), *W = bf(sh.groups * sh.N * sh.K);
    __nv_bfloat16* O = sh.f32_out ? nullptr : bf(sh.M * sh.N);
    float* O32 = nullptr;
    if (sh.f32_out) LS_CHECK(cudaMalloc(&O32, size_t(sh.M * sh.N) * 4) == cudaSuccess, "cudaMalloc");
    int32_t *rows = nullptr, *gather = nullptr;
    if (sh.gathered) {  // row r reads token r * 7919 mod T: scattered, as routing makes it
      std::vector<int32_t> hg(size_t(sh.M));
      for (int64_t r = 0; r < sh.M; ++r) hg[size_t(r)] = int32_t(r * 7919 % T);
      LS_CHECK(cudaMalloc(&gather, hg.size() * 4) == cudaSuccess, "cudaMalloc");
      cudaMemcpy(gather, hg.data(), hg.size() * 4, cudaMemcpyHostToDevice);
    }
    std::vector<int32_t> hr;
    for (int g = 0; g <= sh.groups; ++g) hr.push_back(int32_t(g * (sh.M / sh.groups)));
    LS_CHECK(cudaMalloc(&rows, hr.size() * 4) == cudaSuccess, "cudaMalloc");
    cudaMemcpy(rows, hr.data(), hr.size() * 4, cudaMemcpyHostToDevice);
    cuda::GemmArgs g;
    g.A = A;
    g.lda = sh.K;
    g.a_gather = gather;
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
    if (sh.f32_out) g.out_kind = cuda::GemmOut::f32, g.out_f32 = O32;
    g.ldo = sh.N;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    // The TMA configurations (wgmma 4-6) also in clusters of two CTAs (an operand multicast).
    for (int run = T >= 4096 ? 2 : 0; run < cuda::kGemmConfigs + 3; ++run) {  // 16-row tiles: small T
      const int config = run < cuda::kGemmConfigs ? run : cuda::kGemmMmaConfigs + 4 + (run - cuda::kGemmConfigs);
      const int cluster = run < cuda::kGemmConfigs ? 1 : 2;
      if (only_config >= 0 && config != only_config) continue;
      cuda::set_gemm_tma_cluster(cluster);
      const cuda::GemmArgs& gv = g;
      std::vector<float> ms;
      cuda::gemm_with_config(gv, config, nullptr);
      for (int r = 0; r < 5; ++r) {
        cudaEventRecord(e0);
        cuda::gemm_with_config(gv, config, nullptr);
        cudaEventRecord(e1);
        cudaEventSynchronize(e1);
        float t = 0;
        cudaEventElapsedTime(&t, e0, e1);
        ms.push_back(t);
      }
      cuda::set_gemm_tma_cluster(1);
      std::sort(ms.begin(), ms.end());
      const double flops = 2.0 * double(sh.M) * double(sh.N) * double(sh.K);
      std::printf(
          "{\"event\":\"gemm\",\"shape\":\"%s\",\"tokens\":%lld,\"config\":%d,\"cluster\":%d,\"ms\":%.4f,"
          "\"tflops\":%.1f}\n",
          sh.name, (long long)T, config, cluster, ms[2], flops / (ms[2] * 1e-3) / 1e12);
    }
    LS_CHECK(cudaDeviceSynchronize() == cudaSuccess, "gemm bench failed");
    cudaFree(A);
    cudaFree(W);
    cudaFree(O);
    cudaFree(O32);
    cudaFree(rows);
    cudaFree(gather);
  }
  std::fflush(stdout);
}

// Times `body(rep)` as replays of a CUDA graph of `reps` calls (microseconds per call, median of
// 5 replays after a warm-up): in-graph time, launch gaps included, as in a decode step.
template <typename Body>
double graph_us(int reps, Body body) {
  cudaStream_t s;
  LS_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess, "stream");
  body(0, s);  // eager warm-up (attributes, module load)
  LS_CHECK(cudaStreamSynchronize(s) == cudaSuccess, "warm-up failed");
  cudaGraph_t g;
  cudaGraphExec_t exec;
  LS_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess, "capture");
  for (int r = 0; r < reps; ++r) body(r, s);
  LS_CHECK(cudaStreamEndCapture(s, &g) == cudaSuccess, "capture end");
  LS_CHECK(cudaGraphInstantiate(&exec, g, 0) == cudaSuccess, "instantiate");
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> ms;
  cudaGraphLaunch(exec, s);
  for (int i = 0; i < 5; ++i) {
    cudaEventRecord(e0, s);
    cudaGraphLaunch(exec, s);
    cudaEventRecord(e1, s);
    cudaEventSynchronize(e1);
    float t = 0;
    cudaEventElapsedTime(&t, e0, e1);
    ms.push_back(t);
  }
  LS_CHECK(cudaStreamSynchronize(s) == cudaSuccess, "graph replay failed");
  std::sort(ms.begin(), ms.end());
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(g);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaStreamDestroy(s);
  return ms[2] * 1e3 / reps;
}

// The decode-step kernels of one layer at T tokens (1, 8, 64), each alone in a graph of 40 calls with the
// weights rotating through a 4 GB pool (no L2 reuse, as across the 48 layers): every GEMM tile
// configuration on every decode GEMM shape, and the small ops.
void decode_kernels(const ModelConfig& c, const std::string& only) {
  const int64_t H = c.hidden_size, E = c.num_experts, kx = c.num_experts_per_tok, I = c.moe_intermediate_size;
  const int64_t V = c.vocab_size, pool_n = int64_t(2) << 30;  // 2 Gi bf16 values
  __nv_bfloat16* pool = nullptr;
  LS_CHECK(cudaMalloc(&pool, size_t(pool_n) * 2) == cudaSuccess, "cudaMalloc pool");
  cuda::fill_random_bf16(pool, pool_n, 5, 0.05f, 0.0f, nullptr);
  auto bf = [](int64_t n) {
    __nv_bfloat16* p = nullptr;
    LS_CHECK(cudaMalloc(&p, size_t(n) * 2) == cudaSuccess, "cudaMalloc");
    cuda::fill_random_bf16(p, n, uint64_t(n) + 11, 0.5f, 0.0f, nullptr);
    return p;
  };
  auto f32 = [](int64_t n) {
    float* p = nullptr;
    LS_CHECK(cudaMalloc(&p, size_t(n) * 4) == cudaSuccess, "cudaMalloc");
    cuda::fill_random_f32(p, n, uint64_t(n) + 13, 1.0f, 0.0f, nullptr);
    return p;
  };
  auto i32 = [](const std::vector<int32_t>& h) {
    int32_t* p = nullptr;
    LS_CHECK(cudaMalloc(&p, std::max<size_t>(h.size(), 1) * 4) == cudaSuccess, "cudaMalloc");
    cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice);
    return p;
  };
  const int reps = 40;
  for (int64_t T : {int64_t(1), int64_t(8), int64_t(64)}) {
    if (!only.empty() && T != 1) break;
    __nv_bfloat16 *act = bf(T * 4096), *out = bf(T * kx * 4096);
    float* out32 = f32(T * std::max<int64_t>(V, E));
    float* split = f32(8 * T * kx * H);
    // T*k (token, slot) rows spread over the experts round robin (8 experts of one row at one
    // token, 64 of one row at eight, all 128 with four rows at 64).
    std::vector<int32_t> rows{0}, gather;
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t r = e; r < T * kx; r += E) gather.push_back(int32_t(r / kx));
      rows.push_back(int32_t(gather.size()));
    }
    int32_t *d_rows = i32(rows), *d_gather = i32(gather);
    struct Shape {
      const char* name;
      int64_t N, K;
      int chunks;
      bool grouped, f32out;
    };
    const Shape shapes[] = {{"qkv", c.q_dim() + 2 * c.kv_dim(), H, 1, false, false},
                            {"o_proj", H, c.q_dim(), 8, false, false},
                            {"router", E, H, 1, false, true},
                            {"gate_up", 2 * I, H, 1, true, false},
                            {"down", H, I, 8, true, false},
                            {"lm_head", V, H, 1, false, true}};
    for (const auto& sh : shapes) {
      if (!only.empty() && only != sh.name) continue;
      const int64_t wn = sh.N * sh.K * (sh.grouped ? E : 1);
      const int64_t slots = std::max<int64_t>(1, (pool_n - wn) / ((wn + 4095) / 4096 * 4096));
      const double bytes = 2.0 * double(sh.N * sh.K) * double(sh.grouped ? T * kx : 1);
      auto args = [&](int r) {
        cuda::GemmArgs g;
        g.A = act;
        g.lda = sh.K;
        g.W = pool + (int64_t(r) % slots) * ((wn + 4095) / 4096 * 4096);
        g.ldw = sh.K;
        g.M = sh.grouped ? T * kx : T;
        g.N = sh.N;
        g.K = sh.K;
        g.chunks = sh.chunks;
        if (sh.grouped) {
          g.group_rows = d_rows;
          g.groups = int(E);
          g.a_gather = d_gather;
          g.w_group_stride = sh.N * sh.K;
          g.rows_hint = std::max<int64_t>(1, T * kx / E);
        }
        if (sh.f32out) g.out_f32 = out32, g.out_kind = cuda::GemmOut::f32;
        else g.out_bf16 = out, g.out_kind = cuda::GemmOut::bf16;
        g.ldo = sh.N;
        return g;
      };
      auto report = [&](const char* variant, double us) {
        std::printf(
            "{\"event\":\"decode_gemm\",\"T\":%lld,\"shape\":\"%s\",\"variant\":\"%s\",\"us\":%.2f,\"TBps\":%.3f}\n",
            (long long)T, sh.name, variant, us, bytes / (us * 1e-6) / 1e12);
      };
      report("default", graph_us(reps, [&](int r, cudaStream_t s) {
               auto g = args(r);
               if (sh.chunks == 8) g.split_workspace = split, g.split_workspace_floats = 8 * T * kx * H;
               cuda::gemm(g, s);
             }));
      for (int config = 0; config < cuda::kGemmConfigs; ++config)
        for (bool sp : {false, true}) {
          if (sp && sh.chunks != 8) continue;
          if (sh.name == std::string("lm_head") && config == 6) continue;
          const double us = graph_us(reps, [&](int r, cudaStream_t s) {
            auto g = args(r);
            if (sp) g.split_workspace = split, g.split_workspace_floats = 8 * T * kx * H;
            cuda::gemm_with_config(g, config, s);
          });
          report((std::string(sp ? "split" : "cfg") + std::to_string(config)).c_str(), us);
        }
    }
    if (!only.empty()) break;
    // The small ops at T tokens.
    float *w = f32(4096), *logits = f32(T * E), *ew = f32(T * kx);
    int32_t *ids = i32(std::vector<int32_t>(size_t(T * kx), 0)), *counts = i32(std::vector<int32_t>(size_t(E), 0));
    int32_t *grows = i32(std::vector<int32_t>(size_t(E + 1), 0)), *gat = i32(std::vector<int32_t>(size_t(T * kx), 0));
    int32_t* sca = i32(std::vector<int32_t>(size_t(T * kx), 0));
    __nv_bfloat16 *x = bf(T * H), *h = bf(T * H), *gu = bf(T * kx * 2 * I), *y = bf(T * kx * H);
    auto op = [&](const char* name, double us) {
      std::printf("{\"event\":\"decode_op\",\"T\":%lld,\"op\":\"%s\",\"us\":%.2f}\n", (long long)T, name, us);
    };
    op("rmsnorm", graph_us(reps, [&](int, cudaStream_t s) { cuda::rmsnorm(x, w, h, T, H, 1e-6f, s); }));
    op("route_topk", graph_us(reps, [&](int, cudaStream_t s) {
         cuda::route_topk(logits, ids, ew, T, E, kx, c.norm_topk_prob, s);
       }));
    op("assign_experts", graph_us(reps, [&](int, cudaStream_t s) {
         cuda::assign_experts(ids, T, kx, E, counts, grows, gat, sca, s);
       }));
    op("swiglu", graph_us(reps, [&](int, cudaStream_t s) { cuda::swiglu(gu, out, T * kx, I, s); }));
    op("combine", graph_us(reps, [&](int, cudaStream_t s) {
         cuda::combine_experts_residual(ids, ew, y, x, T, H, kx, s);
       }));
    op("route_and_assign", graph_us(reps, [&](int, cudaStream_t s) {
         cuda::route_and_assign(logits, ids, ew, T, E, kx, c.norm_topk_prob, counts, grows, gat, sca, s);
       }));
    std::vector<cuda::DeviceSampleParams> prm(size_t(T), cuda::DeviceSampleParams{1.0f, 0.37f, -1});
    cuda::DeviceSampleParams* d_prm = nullptr;
    cudaMalloc(&d_prm, prm.size() * sizeof(prm[0]));
    cudaMemcpy(d_prm, prm.data(), prm.size() * sizeof(prm[0]), cudaMemcpyHostToDevice);
    int32_t* tok = i32(std::vector<int32_t>(size_t(T), 0));
    float* lp = f32(T);
    float* sws = f32(cuda::sample_workspace_floats(T));
    op("sample_rows_V", graph_us(10, [&](int, cudaStream_t s) {
         cuda::sample_rows(out32, d_prm, tok, lp, T, V, sws, s);
       }));
    op("log_softmax_gather_V", graph_us(10, [&](int, cudaStream_t s) {
         cuda::log_softmax_gather(out32, tok, lp, T, V, s);
       }));
    LS_CHECK(cudaDeviceSynchronize() == cudaSuccess, "decode kernel bench failed");
  }
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: cuda_bench CONFIG.json [--layers N] [--quick] [--trace]\n");
    return 2;
  }
  try {
    ModelConfig config = ModelConfig::load(argv[1]);
    bool quick = false, gemm_only = false, decode_only = false, no_prefill = false, trace = false;
    std::vector<int64_t> batch_list;
    std::string only;  // --decode-kernels: one GEMM shape at one token; --gemm: one shape (for ncu)
    int only_config = -1;  // --gemm: one configuration
    int64_t gemm_tokens = 16384;  // --gemm: the step's tokens
    for (int i = 2; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--layers") && i + 1 < argc) config.num_hidden_layers = std::atoi(argv[++i]);
      else if (!std::strcmp(argv[i], "--quick")) quick = true;
      else if (!std::strcmp(argv[i], "--gemm")) gemm_only = true;
      else if (!std::strcmp(argv[i], "--decode-kernels")) decode_only = true;
      else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
      else if (!std::strcmp(argv[i], "--no-prefill")) no_prefill = true;
      else if (!std::strcmp(argv[i], "--trace"))
        trace = true;  // the one-launch decode's phases
      else if (!std::strcmp(argv[i], "--gemm-config") && i + 1 < argc) only_config = std::atoi(argv[++i]);
      else if (!std::strcmp(argv[i], "--gemm-tokens") && i + 1 < argc)
        gemm_tokens = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--batches") && i + 1 < argc)
        for (const char* q = argv[++i]; *q;) {
          batch_list.push_back(std::strtoll(q, nullptr, 10));
          while (*q && *q != ',') ++q;
          if (*q == ',') ++q;
        }
    }
    if (gemm_only) {
      LS_CHECK(gemm_tokens >= 1 && gemm_tokens % 16 == 0, "--gemm-tokens: a positive multiple of 16, got ",
               gemm_tokens);
      gemm_configs(config, only, only_config, gemm_tokens);
      return 0;
    }
    if (decode_only) {
      decode_kernels(config, only);
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
    if (!no_prefill) {
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
    if (!batch_list.empty()) batches = batch_list;
    // The trace (a store per point and layer) is on for every step; the report shows the last.
    if (trace) cuda::decode_layers_trace(true);
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
      uint64_t tokens_hash = 1469598103934665603ull;  // FNV-1a of the sampled tokens: equal runs, equal bits
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
        for (const auto& o : out) tokens_hash = (tokens_hash ^ uint64_t(uint32_t(o.token))) * 1099511628211ull;
        kv_bytes += double(B) * double(P + step + 1) * s.L * 2 * s.kvd * 2;
      }
      const double sec = seconds_since(t1);
      const double weight_bytes =
          double(N) * 2 * (s.L * (s.attn_params() + s.E * s.H + s.active_experts(double(B)) * s.expert_params()) + s.V * s.H);
      const double bound_sec = (weight_bytes + kv_bytes) / kCopyBandwidth;
      const double tok_s = double(B * N) / sec;
      std::printf(
          "{\"event\":\"decode\",\"batch\":%lld,\"prompt\":%lld,\"new\":%lld,\"seconds\":%.4f,\"tok_s\":%.1f,"
          "\"bound_tok_s\":%.1f,\"active_experts\":%.1f,\"hbm_TBps\":%.3f,\"tokens_hash\":\"%016llx\"}\n",
          (long long)B, (long long)P, (long long)N, sec, tok_s, double(B * N) / bound_sec, s.active_experts(double(B)),
          (weight_bytes + kv_bytes) / sec / 1e12, (unsigned long long)tokens_hash);
      results.push_back({"decode batch " + std::to_string(B), tok_s, double(B * N) / bound_sec, 0, "tok/s", "HBM bytes"});
      if (trace && B == 1) std::printf("%s", cuda::decode_layers_trace_report().c_str());  // the last step's
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
