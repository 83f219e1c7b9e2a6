// The trainer's gradient GEMMs alone (kernels/cuda/backward.h) at Qwen3-30B-A3B shapes of a
// 4 x 2048-token step: the fp32-g path (outer_sum_chunked_tc) and each tile of the split path
// (outer_sum_split_tc), milliseconds (median of 5 after a warm-up) and TFLOP/s of MMAs (hi and
// lo: 4 S I K), each split result checked bit for bit against the fp32 path's, and the split
// itself (ms, GB/s), and the hi half alone (the lm_head's); then the experts' grouped d down
// and d act, d gate and the gate's part of d x (128 experts, top-8, I 768; d up and the up's
// part are the gate's shapes again).
// Random inputs made on the device. One JSON line per (GEMM, variant).
//   cuda_outer_sum_bench [--tokens T] [--vocab V] [--hidden H] [--q-dim Q] [--kv-dim KV] [--only TEXT]
// --only runs the GEMMs whose name holds TEXT ("experts": the grouped ones, for a profiler).
#ifdef LOCKSTEP_CUDA
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "core/device_memory.h"
#include "core/error.h"
#include "cuda_timing.h"
#include "kernels/cpu/reduce_backward.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/ops.h"
#include "kernels/cuda/outer_sum_split_tma.h"

namespace {

using namespace lockstep;

void check(cudaError_t e, const char* what) { LS_CHECK(e == cudaSuccess, what, ": ", cudaGetErrorString(e)); }
#define CHECK_CUDA(expr) check((expr), #expr)

struct Buffer {
  std::shared_ptr<void> mem;
  int64_t bytes;
  explicit Buffer(int64_t n) : mem(device_alloc(Device::cuda, size_t(n))), bytes(n) {}
  template <typename T>
  T* as() const {
    return static_cast<T*>(mem.get());
  }
};

using bench::cuda_median_ms;

std::vector<char> download(const Buffer& b, int64_t bytes) {
  std::vector<char> out(size_t(bytes), 0);
  CHECK_CUDA(cudaDeviceSynchronize());
  device_copy(Device::cpu, out.data(), Device::cuda, b.mem.get(), size_t(bytes));
  return out;
}

// One gradient GEMM: out [I, K] = tree over bounds of sum_s g(i, s) m[s, k], g at (g_row, g_col).
struct Gemm {
  std::string name;
  int64_t S, I, K, g_row, g_col;
  cuda::ChunkBounds bounds;
};

void run(const Gemm& gm) {
  const int64_t g_elems = gm.S * gm.I;
  Buffer g(g_elems * 4), split(g_elems * 4), m(gm.S * gm.K * 2), out(gm.I * gm.K * 4), ref(gm.I * gm.K * 4);
  Buffer workspace(cuda::outer_sum_split_workspace_floats() * 4);
  cuda::fill_random_f32(g.as<float>(), g_elems, 1, 0.01f, 0.0f, nullptr);
  cuda::fill_random_bf16(m.as<cuda::bf16_t>(), gm.S * gm.K, 2, 1.0f, 0.0f, nullptr);
  CHECK_CUDA(cudaMemcpy(split.mem.get(), g.mem.get(), size_t(g_elems) * 4, cudaMemcpyDeviceToDevice));
  cuda::split_hi_lo(split.as<float>(), g_elems, nullptr);
  const double tflop = 4.0 * double(gm.S) * double(gm.I) * double(gm.K) / 1e12;
  const auto report = [&](const char* variant, double ms, const char* bits) {
    std::printf(
        "{\"gemm\":\"%s\",\"S\":%lld,\"I\":%lld,\"K\":%lld,\"variant\":\"%s\",\"ms\":%.3f,\"tflops\":%.1f,\"bits\":\"%"
        "s\"}\n",
        gm.name.c_str(), (long long)gm.S, (long long)gm.I, (long long)gm.K, variant, ms, tflop / (ms / 1e3), bits);
    std::fflush(stdout);
  };
  const double ms_ref = cuda_median_ms([&] {
    cuda::outer_sum_chunked_tc(g.as<float>(), gm.g_row, gm.g_col, m.as<cuda::bf16_t>(), gm.K, gm.bounds,
                               ref.as<float>(), gm.I, nullptr);
  });
  report("fp32 g (outer_sum_tc)", ms_ref, "reference");
  const auto want = download(ref, gm.I * gm.K * 4);
  const double ms_split = cuda_median_ms([&] {
    CHECK_CUDA(cudaMemcpyAsync(split.mem.get(), g.mem.get(), size_t(g_elems) * 4, cudaMemcpyDeviceToDevice));
    cuda::split_hi_lo(split.as<float>(), g_elems, nullptr);
  });
  // The split moves bytes, not MMAs: the copy and the split each read and write g once.
  std::printf("{\"gemm\":\"%s\",\"variant\":\"split_hi_lo (+ a copy)\",\"ms\":%.3f,\"gb_s\":%.0f}\n", gm.name.c_str(),
              ms_split, 4.0 * 4.0 * double(g_elems) / (ms_split / 1e3) / 1e9);
  const struct {
    const char* name;
    cuda::SplitTile tile;
  } tiles[] = {{"split 128x128", cuda::SplitTile::k128x128},
               {"split 128x256", cuda::SplitTile::k128x256},
               {"split 256x128", cuda::SplitTile::k256x128},
               {"split wgmma 128x256", cuda::SplitTile::wgmma128x256}};
  for (const auto& t : tiles) {
    const auto* gs = split.as<const cuda::bf16_t>();
    const double ms = cuda_median_ms([&] {
      cuda::outer_sum_split_tc(gs, gm.g_row, gm.g_col, m.as<cuda::bf16_t>(), gm.K, gm.bounds, out.as<float>(), gm.I,
                               nullptr, workspace.as<float>(), t.tile);
    });
    const bool same = download(out, gm.I * gm.K * 4) == want;
    report(t.name, ms, same ? "same" : "DIFFER");
  }
  // g rounded to bf16 (GradientOperand::bf16, packed by pack_bf16_rows): half the MMAs (2 S I
  // K); the wgmma tile's bits checked against the 128 x 128 mma.sync tile's.
  std::vector<char> hi_bits;
  const int64_t pitch = gm.g_row == 1 ? gm.g_col : gm.g_row;
  CHECK_CUDA(cudaMemcpy(split.mem.get(), g.mem.get(), size_t(g_elems) * 4, cudaMemcpyDeviceToDevice));
  const double ms_pack =
      cuda_median_ms([&] { cuda::pack_bf16_rows(split.as<float>(), g_elems / pitch, pitch, nullptr); });
  std::printf("{\"gemm\":\"%s\",\"variant\":\"pack_bf16_rows\",\"ms\":%.3f,\"gb_s\":%.0f}\n", gm.name.c_str(), ms_pack,
              6.0 * double(g_elems) / (ms_pack / 1e3) / 1e9);
  CHECK_CUDA(cudaMemcpy(split.mem.get(), g.mem.get(), size_t(g_elems) * 4, cudaMemcpyDeviceToDevice));
  cuda::pack_bf16_rows(split.as<float>(), g_elems / pitch, pitch, nullptr);
  struct Variant {
    cuda::SplitTile tile;
    int cluster;  // CTAs a cluster of the TMA tiles (set_outer_sum_tma_cluster)
    const char* name;
  };
  for (const Variant v :
       {Variant{cuda::SplitTile::k128x128, 1, "128x128"}, Variant{cuda::SplitTile::wgmma128x256, 1, "wgmma 128x256"},
        Variant{cuda::SplitTile::tma128x256, 1, "TMA 128x256"}, Variant{cuda::SplitTile::tma128x128, 1, "TMA 128x128"},
        Variant{cuda::SplitTile::tma128x256, 2, "TMA 128x256, clusters of 2"},
        Variant{cuda::SplitTile::tma128x128, 2, "TMA 128x128, clusters of 2"}}) {
    const auto* gs = split.as<const cuda::bf16_t>();
    cuda::set_outer_sum_tma_cluster(v.cluster);
    const double ms = cuda_median_ms([&] {
      cuda::outer_sum_split_tc(gs, gm.g_row, gm.g_col, m.as<cuda::bf16_t>(), gm.K, gm.bounds, out.as<float>(), gm.I,
                               nullptr, workspace.as<float>(), v.tile, cuda::GradientOperand::bf16);
    });
    cuda::set_outer_sum_tma_cluster(1);
    const auto got = download(out, gm.I * gm.K * 4);
    const bool first = hi_bits.empty();
    if (first) hi_bits = got;
    std::printf("{\"gemm\":\"%s\",\"variant\":\"bf16 g, %s\",\"ms\":%.3f,\"tflops\":%.1f,\"bits\":\"%s\"}\n",
                gm.name.c_str(), v.name, ms, tflop / 2 / (ms / 1e3),
                first            ? "reference"
                : got == hi_bits ? "same"
                                 : "DIFFER");
    std::fflush(stdout);
  }
  // The experts' 128 x 128 wgmma tile (chunks in pairs, the pending tree on chip) as one group.
  const cuda::SplitOuterSumGroup one{split.as<const cuda::bf16_t>(), m.as<cuda::bf16_t>(), out.as<float>(), gm.I,
                                     gm.bounds};
  const double ms_pairs = cuda_median_ms([&] {
    cuda::outer_sum_split_grouped_wgmma(&one, 1, gm.I, gm.g_row, gm.g_col, gm.K, nullptr, cuda::GradientOperand::bf16);
  });
  const bool same = download(out, gm.I * gm.K * 4) == hi_bits;
  std::printf(
      "{\"gemm\":\"%s\",\"variant\":\"bf16 g, wgmma 128x128 pairs\",\"ms\":%.3f,\"tflops\":%.1f,\"bits\":\"%s\"}\n",
      gm.name.c_str(), ms_pairs, tflop / 2 / (ms_pairs / 1e3), same ? "same" : "DIFFER");
  std::fflush(stdout);
}

// The experts' gradient launches of a layer, grouped over E experts of n = T k / E rows each
// (evenly spread tokens: the chunk bounds of a real routing): d down (weight gradient,
// [H, I] an expert) and d act (input gradient, [n, I] an expert, summed over H); with H and I
// swapped, d gate (or d up: [I, H] an expert) and the gate's part of d x (summed over I).
void run_experts(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, const char* weight_name,
                 const char* input_name) {
  const int64_t n = T * k / E, rows = n * E;
  Buffer dy(rows * H * 4), split(rows * H * 4), act(rows * I * 2), down(E * H * I * 2);
  Buffer out(std::max(E * H * I, rows * I) * 4), ref(std::max(E * H * I, rows * I) * 4);
  Buffer workspace(cuda::outer_sum_split_workspace_floats() * 4);
  cuda::fill_random_f32(dy.as<float>(), rows * H, 3, 0.01f, 0.0f, nullptr);
  cuda::fill_random_bf16(act.as<cuda::bf16_t>(), rows * I, 4, 1.0f, 0.0f, nullptr);
  cuda::fill_random_bf16(down.as<cuda::bf16_t>(), E * H * I, 5, 0.05f, 0.0f, nullptr);
  CHECK_CUDA(cudaMemcpy(split.mem.get(), dy.mem.get(), size_t(rows * H) * 4, cudaMemcpyDeviceToDevice));
  cuda::split_hi_lo(split.as<float>(), rows * H, nullptr);
  const auto* split_g = split.as<const cuda::bf16_t>();
  Buffer packed(rows * H * 4);
  CHECK_CUDA(cudaMemcpy(packed.mem.get(), dy.mem.get(), size_t(rows * H) * 4, cudaMemcpyDeviceToDevice));
  cuda::pack_bf16_rows(packed.as<float>(), rows, H, nullptr);
  for (const bool weight : {true, false}) {
    std::vector<cuda::OuterSumGroup> plain;
    std::vector<cuda::SplitOuterSumGroup> halves, packed_groups;
    for (int64_t e = 0; e < E; ++e) {
      std::vector<int32_t> tokens(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) tokens[size_t(i)] = int32_t((i * T + e) / n);
      const cuda::ChunkBounds b =
          weight ? cuda::chunk_bounds(cpu::token_chunks_of(tokens.data(), n, T)) : cuda::token_chunk_bounds(H);
      const int64_t first = e * n;
      const float* g = dy.as<float>() + first * H;
      const cuda::bf16_t* m = weight ? act.as<cuda::bf16_t>() + first * I : down.as<cuda::bf16_t>() + e * H * I;
      float* o = weight ? out.as<float>() + e * H * I : out.as<float>() + first * I;
      float* r = weight ? ref.as<float>() + e * H * I : ref.as<float>() + first * I;
      plain.push_back({g, m, r, weight ? H : n, b});
      halves.push_back({split_g + 2 * first * H, m, o, weight ? H : n, b});
      packed_groups.push_back({packed.as<const cuda::bf16_t>() + 2 * first * H, m, o, weight ? H : n, b});
    }
    Buffer packed_d(int64_t(packed_groups.size() * sizeof(packed_groups[0])));
    device_copy(Device::cuda, packed_d.mem.get(), Device::cpu, packed_groups.data(),
                packed_groups.size() * sizeof(packed_groups[0]));
    Buffer plain_d(int64_t(plain.size() * sizeof(plain[0]))), halves_d(int64_t(halves.size() * sizeof(halves[0])));
    device_copy(Device::cuda, plain_d.mem.get(), Device::cpu, plain.data(), plain.size() * sizeof(plain[0]));
    device_copy(Device::cuda, halves_d.mem.get(), Device::cpu, halves.data(), halves.size() * sizeof(halves[0]));
    const int64_t max_I = weight ? H : n, g_row = weight ? 1 : H, g_col = weight ? H : 1;
    const int64_t outputs = weight ? E * H * I : rows * I;
    const double tflop = 4.0 * double(rows) * double(H) * double(I) / 1e12;
    const char* name = weight ? weight_name : input_name;
    const auto report = [&](const char* variant, double ms, const char* bits) {
      std::printf(
          "{\"gemm\":\"%s\",\"experts\":%lld,\"rows\":%lld,\"variant\":\"%s\",\"ms\":%.3f,"
          "\"tflops\":%.1f,\"bits\":\"%s\"}\n",
          name, (long long)E, (long long)n, variant, ms, tflop / (ms / 1e3), bits);
      std::fflush(stdout);
    };
    report("fp32 g (outer_sum_tc)", cuda_median_ms([&] {
             cuda::outer_sum_grouped_tc(plain_d.as<cuda::OuterSumGroup>(), int(E), max_I, g_row, g_col, I, nullptr);
           }),
           "reference");
    const auto want = download(ref, outputs * 4);
    const struct {
      const char* name;
      cuda::SplitTile tile;
    } tiles[] = {{"split 128x128", cuda::SplitTile::k128x128}, {"split 128x256", cuda::SplitTile::k128x256}};
    for (const auto& t : tiles) {
      const double ms = cuda_median_ms([&] {
        cuda::outer_sum_split_grouped_tc(halves_d.as<cuda::SplitOuterSumGroup>(), int(E), max_I, g_row, g_col, I,
                                         nullptr, workspace.as<float>(), t.tile);
      });
      report(t.name, ms, download(out, outputs * 4) == want ? "same" : "DIFFER");
    }
    const double ms = cuda_median_ms(
        [&] { cuda::outer_sum_split_grouped_wgmma(halves.data(), int(E), max_I, g_row, g_col, I, nullptr); });
    report("split wgmma 128x128", ms, download(out, outputs * 4) == want ? "same" : "DIFFER");
    // dy rounded to bf16 (packed rows, the trainer's): half the MMAs; the tiles against each other.
    std::vector<char> bf16_bits;
    for (const auto& t : tiles) {
      const double ms_bf16 = cuda_median_ms([&] {
        cuda::outer_sum_split_grouped_tc(packed_d.as<cuda::SplitOuterSumGroup>(), int(E), max_I, g_row, g_col, I,
                                         nullptr, workspace.as<float>(), t.tile, cuda::GradientOperand::bf16);
      });
      const auto got = download(out, outputs * 4);
      const bool first = bf16_bits.empty();
      if (first) bf16_bits = got;
      const std::string variant = std::string("bf16 g, ") + (t.name + 6);
      std::printf(
          "{\"gemm\":\"%s\",\"experts\":%lld,\"rows\":%lld,\"variant\":\"%s\",\"ms\":%.3f,\"tflops\":%.1f,"
          "\"bits\":\"%s\"}\n",
          name, (long long)E, (long long)n, variant.c_str(), ms_bf16, tflop / 2 / (ms_bf16 / 1e3),
          first              ? "reference"
          : got == bf16_bits ? "same"
                             : "DIFFER");
      std::fflush(stdout);
    }
    const double ms_wgmma = cuda_median_ms([&] {
      cuda::outer_sum_split_grouped_wgmma(packed_groups.data(), int(E), max_I, g_row, g_col, I, nullptr,
                                          cuda::GradientOperand::bf16);
    });
    std::printf(
        "{\"gemm\":\"%s\",\"experts\":%lld,\"rows\":%lld,\"variant\":\"bf16 g, wgmma 128x128\",\"ms\":%.3f,"
        "\"tflops\":%.1f,\"bits\":\"%s\"}\n",
        name, (long long)E, (long long)n, ms_wgmma, tflop / 2 / (ms_wgmma / 1e3),
        download(out, outputs * 4) == bf16_bits ? "same" : "DIFFER");
    std::fflush(stdout);
    // The TMA tiles, the groups as rows of dy and of act (weight) or of every expert's w (input).
    cuda::SplitSpans spans;
    spans.g[0] = packed.as<const cuda::bf16_t>(), spans.g_rows[0] = rows;
    spans.m[0] = weight ? act.as<cuda::bf16_t>() : down.as<cuda::bf16_t>(), spans.m_rows[0] = weight ? rows : E * H;
    for (const auto [columns, cluster] : {std::pair{128, 1}, std::pair{256, 1}, std::pair{128, 2}, std::pair{256, 2}}) {
      cuda::set_outer_sum_tma_cluster(cluster);
      const double ms_tma = cuda_median_ms([&] {
        for (int64_t p = 0; p < E; p += cuda::kMaxWgmmaGroups)
          cuda::outer_sum_split_tma_grouped(packed_groups.data() + p,
                                            int(std::min<int64_t>(E - p, cuda::kMaxWgmmaGroups)), max_I, weight, H, I,
                                            spans, workspace.as<float>(), nullptr, columns);
      });
      cuda::set_outer_sum_tma_cluster(1);
      std::printf(
          "{\"gemm\":\"%s\",\"experts\":%lld,\"rows\":%lld,\"variant\":\"bf16 g, TMA 128x%d, clusters of %d\","
          "\"ms\":%.3f,\"tflops\":%.1f,\"bits\":\"%s\"}\n",
          name, (long long)E, (long long)n, columns, cluster, ms_tma, tflop / 2 / (ms_tma / 1e3),
          download(out, outputs * 4) == bf16_bits ? "same" : "DIFFER");
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    int64_t T = 8192, V = 151936, H = 2048, Q = 4096, KV = 512;
    std::string only;
    for (int i = 1; i < argc; i += 2) {
      const std::string flag = argv[i];
      if (i + 1 >= argc) fail("flag ", flag, " needs a value");
      const int64_t v = std::atoll(argv[i + 1]);
      if (flag == "--only")
        only = argv[i + 1];
      else if (flag == "--tokens")
        T = v;
      else if (flag == "--vocab")
        V = v;
      else if (flag == "--hidden")
        H = v;
      else if (flag == "--q-dim")
        Q = v;
      else if (flag == "--kv-dim")
        KV = v;
      else
        fail("unknown flag ", flag, " (--tokens, --vocab, --hidden, --q-dim, --kv-dim, --only)");
    }
    const cuda::ChunkBounds tokens = cuda::token_chunk_bounds(T);
    // Weight gradients: g = dy [T, N] (rows the summed tokens); input gradients: g = dy read
    // as [T rows, N summed].
    const auto wanted = [&](const std::string& name) { return name.find(only) != std::string::npos; };
    for (const Gemm& g :
         {Gemm{"lm_head dW", T, V, H, 1, V, tokens}, Gemm{"lm_head dx", V, T, H, V, 1, cuda::token_chunk_bounds(V)},
          Gemm{"q_proj dW", T, Q, H, 1, Q, tokens}, Gemm{"q_proj dx", Q, T, H, Q, 1, cuda::token_chunk_bounds(Q)},
          Gemm{"o_proj dW", T, H, Q, 1, H, tokens}, Gemm{"k_proj dx", KV, T, H, KV, 1, cuda::token_chunk_bounds(KV)}})
      if (wanted(g.name)) run(g);
    if (wanted("experts d down, d act")) run_experts(T, 8, 128, H, 768, "experts d down", "experts d act");
    if (wanted("experts d gate, d x")) run_experts(T, 8, 128, 768, H, "experts d gate", "experts d x (gate part)");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_outer_sum_bench: %s\n", e.what());
    return 1;
  }
}
#else
#include <cstdio>
int main() {
  std::fprintf(stderr, "cuda_outer_sum_bench: this build has no CUDA backend\n");
  return 1;
}
#endif
