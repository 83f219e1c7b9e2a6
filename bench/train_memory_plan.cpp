// What fits on one GPU for the GPU trainer (train/train_memory.h): a Markdown table of the
// memory by part for slices of a model, for docs/train.md. Host arithmetic only.
//   train_memory_plan CONFIG.json [--tokens T] [--micro-batches M] [--layers 4,8,12,...] [--layer-major]
// (--layer-major: the step's micro-batches layer by layer, train_memory.h's MicroBatchOrder.)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "train/train_memory.h"

int main(int argc, char** argv) {
  using namespace lockstep;
  try {
    LS_CHECK(argc >= 2,
             "usage: train_memory_plan CONFIG.json [--tokens T] [--micro-batches M] [--layers L,...] [--layer-major]");
    const ModelConfig config = ModelConfig::load(argv[1]);
    int64_t tokens = 8192, micro_batches = 1;
    MicroBatchOrder order = MicroBatchOrder::batch_major;
    std::vector<int64_t> layers = {4, 8, 12, 16, 24, 48};
    for (int i = 2; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--tokens") && i + 1 < argc)
        tokens = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--micro-batches") && i + 1 < argc)
        micro_batches = std::atoll(argv[++i]);
      else if (!std::strcmp(argv[i], "--layer-major"))
        order = MicroBatchOrder::layer_major;
      else if (!std::strcmp(argv[i], "--layers") && i + 1 < argc) {
        layers.clear();
        for (const char* p = argv[++i]; *p;) {
          layers.push_back(std::atoll(p));
          while (*p && *p != ',') ++p;
          if (*p == ',') ++p;
        }
      } else {
        fail("train_memory_plan: unknown argument ", argv[i]);
      }
    }
    const double gb = 1e9;
    std::printf(
        "| layers | parameters | weights | AdamW state | gradients | logits | activations | total GB | H100 80 GB | "
        "H200 141 GB | no recomputation: total GB | H100 | H200 |\n");
    std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|:-:|:-:|---:|:-:|:-:|\n");
    for (int64_t l : layers) {
      ModelConfig c = config;
      c.num_hidden_layers = l;
      const TrainMemory m = cuda_train_memory(c, tokens, micro_batches, kRecomputeAll, order);
      // --recompute-num-layers 0 (a layer-major step recomputes every layer)
      const double kept = cuda_train_memory(c, tokens, micro_batches, 0, order).total();
      std::printf("| %lld | %.2fB | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %s | %s | %.1f | %s | %s |\n",
                  static_cast<long long>(l), trainer_parameter_count(c) / 1e9, m.weights / gb, m.optimizer / gb,
                  (m.gradients + m.tree_levels) / gb, m.logits / gb, m.activations / gb, m.total() / gb,
                  m.total() < 80e9 ? "yes" : "no", m.total() < 141e9 ? "yes" : "no", kept / gb,
                  kept < 80e9 ? "yes" : "no", kept < 141e9 ? "yes" : "no");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_memory_plan: %s\n", e.what());
    return 1;
  }
}
