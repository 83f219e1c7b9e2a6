// lockstep init: a random-init Qwen3-MoE as a Hugging Face model directory, from a config.json
// alone. The weights are those `lockstep train --init-config F --model-seed S` starts from, so
// the model sizes that have no checkpoint at hand (a real config with fewer layers, for a load
// test or a benchmark on a GPU) get a directory that `serve`, `score` and `generate` load.
#include <cstdio>
#include <filesystem>
#include <memory>

#include "command_registry.h"
#include "core/error.h"
#include "model/weights.h"
#include "rl/hf_snapshot.h"
#include "tokenizer/tokenizer.h"

namespace lockstep::cli {
namespace {

namespace fs = std::filesystem;

struct InitOptions {
  std::string config, output, dtype = "float32", tokenizer;
  int64_t model_seed = 7;  // train's default, so the two give the same weights
};

int run_init(const InitOptions& o) {
  const Precision precision = precision_from_name(o.dtype);
  const ModelConfig config = ModelConfig::load(o.config);
  // Never replace a directory: --output may be a typo for something that matters.
  LS_CHECK(!fs::exists(o.output), "--output ", o.output, ": already exists (lockstep init writes a new directory)");
  if (!o.tokenizer.empty()) {
    LS_CHECK(Tokenizer::available(o.tokenizer), "--tokenizer ", o.tokenizer, ": no tokenizer.json there");
    const int32_t tokens = Tokenizer::load(o.tokenizer).vocab_size();
    LS_CHECK(tokens <= config.vocab_size, "--tokenizer ", o.tokenizer, ": its ", tokens,
             " token ids do not fit the config's vocab_size ", config.vocab_size);
  }
  const ModelWeights weights = ModelWeights::random(config, uint64_t(o.model_seed), precision);
  int64_t parameters = 0;
  for (const auto& [name, t] : weights.named()) parameters += t->numel();
  rl::write_hf_weights(o.output, weights, precision, o.tokenizer);
  std::fprintf(stderr, "lockstep init: wrote %s (%lld parameters, %s, seed %lld%s)\n", o.output.c_str(),
               static_cast<long long>(parameters), o.dtype.c_str(), static_cast<long long>(o.model_seed),
               o.tokenizer.empty() ? "" : ", with tokenizer");
  return 0;
}

const bool registered = register_command(
    {"init", "Write a random-init model directory from a config.json (no training)", [](CLI::App& sub) {
       auto o = std::make_shared<InitOptions>();
       sub.add_option("--config", o->config, "a Qwen3-MoE config.json")->required();
       sub.add_option("--output", o->output, "the model directory to create (must not exist)")->required();
       sub.add_option("--model-seed", o->model_seed, "random init seed (default 7, as train's)");
       sub.add_option("--dtype", o->dtype, "float32 | bfloat16: the stored weights (bfloat16 halves the files)");
       sub.add_option("--tokenizer", o->tokenizer, "a directory whose tokenizer files are copied in");
       return std::function<int()>([o] { return run_init(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
