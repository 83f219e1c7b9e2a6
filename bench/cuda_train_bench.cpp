// The GPU trainer's step backward (model/cuda/cuda_trainer.h) on Qwen3-30B-A3B shapes with
// random bf16 weights made on the device: forward + backward tokens/s of one micro-batch of B
// sequences of S tokens (mean next-token NLL), and the model FLOPs utilisation against the
// card's measured bf16 matmul ceiling, then the device AdamW step over the runner's weights
// (CudaTrainState: gradients stay on the device). Prints one JSON object per line.
//   cuda_train_bench CONFIG.json [--layers N] [--batch B] [--seq S] [--reps R] [--recompute-num-layers N]
//                    [--grads-only] [--tma-cluster 1|2] [--gemm-cluster 1|2] [--pair-stages 0|1]
//                    [--narrow-dw-blocks 0|1] [--keep-expert-rows 0|1] [--keep-attention-ds 0|1]
//                    [--dkv-overlap 0|1] [--sum-input-parts 0|1] [--expert-output-by-token 0|1]
// --tma-cluster, --gemm-cluster: CTAs a cluster of the TMA outer sums and of the TMA GEMMs (2: a
// pair shares one operand tile by multicast; the same bits).
// --pair-stages, --narrow-dw-blocks, --keep-expert-rows, --keep-attention-ds, --dkv-overlap,
// --sum-input-parts, --expert-output-by-token: the speed settings, each the same bits either
// way (set_outer_sum_input_pair_stages, set_rmsnorm_narrow_dw_blocks, set_keep_expert_input_rows,
// set_keep_attention_ds, set_attention_dkv_overlap, set_outer_sum_input_parts_summed,
// set_expert_output_by_token; docs/cuda.md gives the defaults).
// --grads-only: the step's gradients without the optimizer state (no AdamW masters or moments:
// 12 bytes a parameter fewer), so 8 layers of these shapes fit an 80 GB card.
// Model FLOPs per token: 6 x active parameters (attention, the k experts, the router, lm_head)
// plus causal attention 6 x 2 x (S + 1) / 2 x q_dim per layer (QK^T and PV, forward and
// backward): the usual accounting, recomputation not counted.
#ifdef LOCKSTEP_CUDA
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>

#include "core/error.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/gemm_tma.h"
#include "kernels/cuda/outer_sum_split_tma.h"
#include "model/cuda/cuda_runner.h"
#include "model/cuda/cuda_trainer.h"
#include "train/optimizer.h"

namespace {

using namespace lockstep;

constexpr double kMatmulPeak = 771e12;  // bf16 FLOP/s, measured 8192^3 matmul (notes/cuda-perf.md)

double flops_per_token(const ModelConfig& c, int64_t S) {
  const double H = double(c.hidden_size), qd = double(c.q_dim()), kvd = double(c.kv_dim());
  const double experts = double(c.num_experts_per_tok) * 3.0 * double(c.moe_intermediate_size) * H;
  const double layer = (qd + 2 * kvd) * H + H * qd + experts + double(c.num_experts) * H;
  const double active = double(c.num_hidden_layers) * layer + double(c.vocab_size) * H;
  const double attention = double(c.num_hidden_layers) * 6.0 * 2.0 * double(S + 1) / 2.0 * qd;
  return 6.0 * active + attention;
}

// A 0|1 flag's value (else refused, naming the flag).
bool switch_value(const char* flag, const char* value) {
  LS_CHECK(!std::strcmp(value, "0") || !std::strcmp(value, "1"), flag, " expects 0 or 1, got '", value, "'");
  return value[0] == '1';
}

}  // namespace

int main(int argc, char** argv) {
  try {
    LS_CHECK(
        argc >= 2,
        "usage: cuda_train_bench CONFIG.json [--layers N] [--batch B] [--seq S] [--reps R] [--recompute-num-layers N] "
        "[--grads-only] [--tma-cluster 1|2] [--gemm-cluster 1|2] [--pair-stages 0|1] [--narrow-dw-blocks 0|1] "
        "[--keep-expert-rows 0|1] [--keep-attention-ds 0|1] [--dkv-overlap 0|1] [--sum-input-parts 0|1] "
        "[--expert-output-by-token 0|1]");
    ModelConfig config = ModelConfig::load(argv[1]);
    int64_t B = 4, S = 2048, reps = 3, recompute = -1;
    bool grads_only = false;
    for (int i = 2; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--layers") && i + 1 < argc)
        config.num_hidden_layers = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--batch") && i + 1 < argc)
        B = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--seq") && i + 1 < argc)
        S = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc)
        reps = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--recompute-num-layers") && i + 1 < argc)
        recompute = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--grads-only"))
        grads_only = true;
      else if (!std::strcmp(argv[i], "--tma-cluster") && i + 1 < argc)
        cuda::set_outer_sum_tma_cluster(std::atoi(argv[++i]));
      else if (!std::strcmp(argv[i], "--gemm-cluster") && i + 1 < argc)
        cuda::set_gemm_tma_cluster(std::atoi(argv[++i]));
      else if (!std::strcmp(argv[i], "--pair-stages") && i + 1 < argc)
        cuda::set_outer_sum_input_pair_stages(switch_value("--pair-stages", argv[++i]));
      else if (!std::strcmp(argv[i], "--narrow-dw-blocks") && i + 1 < argc)
        cuda::set_rmsnorm_narrow_dw_blocks(switch_value("--narrow-dw-blocks", argv[++i]));
      else if (!std::strcmp(argv[i], "--keep-expert-rows") && i + 1 < argc)
        set_keep_expert_input_rows(switch_value("--keep-expert-rows", argv[++i]));
      else if (!std::strcmp(argv[i], "--keep-attention-ds") && i + 1 < argc)
        set_keep_attention_ds(switch_value("--keep-attention-ds", argv[++i]));
      else if (!std::strcmp(argv[i], "--dkv-overlap") && i + 1 < argc)
        cuda::set_attention_dkv_overlap(switch_value("--dkv-overlap", argv[++i]));
      else if (!std::strcmp(argv[i], "--sum-input-parts") && i + 1 < argc)
        cuda::set_outer_sum_input_parts_summed(switch_value("--sum-input-parts", argv[++i]));
      else if (!std::strcmp(argv[i], "--expert-output-by-token") && i + 1 < argc)
        cuda::set_expert_output_by_token(switch_value("--expert-output-by-token", argv[++i]));
      else
        fail("cuda_train_bench: unknown argument ", argv[i]);
    }
    auto runner = make_cuda_runner_random(config, 1);
    std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < S; ++t)
        seqs[size_t(b)].push_back(int32_t((uint64_t(b) * 7919u + uint64_t(t) * 104729u) % uint64_t(config.vocab_size)));
    const auto mean_nll = [](int64_t, const std::vector<std::vector<float>>& lp, const auto&) {
      return mean_nll_upstream(lp);
    };
    // A fresh optimizer state made on the device from the runner's weights; --grads-only keeps
    // none.
    OptimizerConfig oc;
    const auto state = grads_only ? std::make_unique<CudaTrainState>(*runner, recompute)
                                  : std::make_unique<CudaTrainState>(*runner, oc, recompute);
    double sec = 0, adamw_sec = 0;
    for (int64_t r = -1; r < reps; ++r) {  // r = -1: warm-up (allocations, kernel loads)
      const auto t0 = std::chrono::steady_clock::now();
      state->compute_grads({seqs}, false, mean_nll);
      cudaDeviceSynchronize();
      const auto t1 = std::chrono::steady_clock::now();
      if (!grads_only) state->apply(Precision::bfloat16);
      cudaDeviceSynchronize();
      if (r < 0) continue;
      sec += std::chrono::duration<double>(t1 - t0).count() / double(reps);
      adamw_sec += std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count() / double(reps);
    }
    const int64_t recomputed = state->recomputed_layers();
    const double tokens = double(B * S), tok_s = tokens / sec;
    const double mfu = tok_s * flops_per_token(config, S) / kMatmulPeak;
    std::printf(
        "{\"event\":\"lockstep_train_step\",\"layers\":%lld,\"batch\":%lld,\"seq\":%lld,\"seconds\":%.4f,"
        "\"tok_s\":%.1f,\"model_tflops\":%.1f,\"mfu_vs_measured_peak\":%.4f,\"adamw_seconds\":%.4f,"
        "\"recompute_num_layers\":%lld,\"recomputed_layers\":%lld,\"grads_only\":%s,\"tma_cluster\":%d,"
        "\"gemm_cluster\":%d,\"pair_stages\":%d,\"narrow_dw_blocks\":%d,\"keep_expert_rows\":%d,"
        "\"keep_attention_ds\":%d,\"dkv_overlap\":%d}\n",
        static_cast<long long>(config.num_hidden_layers), static_cast<long long>(B), static_cast<long long>(S), sec,
        tok_s, tok_s * flops_per_token(config, S) / 1e12, mfu, adamw_sec, static_cast<long long>(recompute),
        static_cast<long long>(recomputed), grads_only ? "true" : "false", cuda::outer_sum_tma_cluster(),
        cuda::gemm_tma_cluster(), int(cuda::outer_sum_input_pair_stages()), int(cuda::rmsnorm_narrow_dw_blocks()),
        int(keep_expert_input_rows()), int(keep_attention_ds()), int(cuda::attention_dkv_overlap()));
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_train_bench: %s\n", e.what());
    return 1;
  }
}
#else
#include <cstdio>
int main() {
  std::fprintf(stderr, "cuda_train_bench: this build has no CUDA backend\n");
  return 1;
}
#endif
