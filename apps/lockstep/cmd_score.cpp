// lockstep score: per-token log-probs of whole sequences (the trainer's forward).
#include <memory>

#include "command_registry.h"
#include "core/device_memory.h"
#include "core/error.h"
#include "core/jsonl.h"
#include "core/output_path.h"
#include "dist/mpi_communicator.h"
#include "model/qwen3_moe.h"
#include "topology_flags.h"
#ifdef LOCKSTEP_CUDA
#include "model/cuda/cuda_runner.h"
#include "model/runner_score.h"
#endif

namespace lockstep::cli {
namespace {

struct ScoreOptions {
  std::string model, input = "-", output = "-", dtype = "float32", device = "cpu";
  int64_t max_batch_tokens = 8192;
  TopologyRequest topology;  // parallel forms (mpirun)
};

int run_score(const ScoreOptions& o) {
  check_output_differs(o.output, {o.input}, "--output");
  Precision precision = precision_from_name(o.dtype);
  LS_CHECK(device_from_name(o.device) == Device::cpu || cuda_available(),
           "--device cuda: no CUDA device is available in this build");
  const Device device = device_from_name(o.device);
  auto world = dist::world_communicator();
  const bool parallel = o.topology.parallel() || world->size() > 1 || is_sharded_checkpoint(o.model);
  LS_CHECK(!parallel || device == Device::cpu,
           "the parallel forms of score run on --device cpu (the GPU forms are not built yet)");
  // The topology is checked against the model before any input or weight is read.
  if (parallel) resolve_topology(o.topology, ModelConfig::load(o.model + "/config.json"), world->size());
  auto records = read_jsonl(o.input);  // read and check all input before any compute
  ModelConfig config = ModelConfig::load(o.model + "/config.json");
  std::vector<std::vector<int32_t>> seqs;
  for (const auto& r : records) {
    seqs.push_back(read_token_ids(r, o.input, "input_ids", config.vocab_size));
    LS_CHECK(!seqs.back().empty(), o.input, ":", r.line, ": input_ids is empty");
    LS_CHECK(int64_t(seqs.back().size()) <= config.max_position_embeddings, o.input, ":", r.line,
             ": sequence of ", seqs.back().size(), " tokens exceeds max_position_embeddings (",
             config.max_position_embeddings, ")");
  }
  std::vector<std::vector<float>> logprobs;
  if (device == Device::cuda) {
#ifdef LOCKSTEP_CUDA
    auto runner = make_runner(Device::cuda, ModelWeights::load(o.model, precision), precision);
    logprobs = runner_score_sequences(*runner, seqs, o.max_batch_tokens);
#endif
  } else if (parallel) {
    logprobs = parallel_score(*world, o.model, config, o.topology, precision, seqs, o.max_batch_tokens);
    if (world->rank() != 0) return 0;  // rank 0 writes the output
  } else {
    Qwen3Moe model(ModelWeights::load(o.model, precision), precision);
    logprobs = score_sequences(model, seqs, o.max_batch_tokens);
  }
  JsonlWriter out(o.output);
  for (const auto& lp : logprobs) out.write_line("{\"logprobs\":" + format_floats(lp.data(), lp.size()) + "}");
  out.close();
  return 0;
}

const bool registered = register_command({"score", "Per-token log-probs of sequences (JSONL in, JSONL out)",
                                           [](CLI::App& sub) {
                                             auto o = std::make_shared<ScoreOptions>();
                                             sub.add_option("--model", o->model, "model directory")->required();
                                             sub.add_option("--input", o->input, "input JSONL ('-' = stdin)");
                                             sub.add_option("--output", o->output, "output JSONL ('-' = stdout)");
                                             sub.add_option("--dtype", o->dtype, "float32 | bfloat16");
                                             sub.add_option("--device", o->device, "cpu | cuda");
                                             sub.add_option("--max-batch-tokens", o->max_batch_tokens,
                                                            "tokens per forward");
                                             add_topology_flags(sub, o->topology);
                                             return std::function<int()>([o] { return run_score(*o); });
                                           }});

}  // namespace
}  // namespace lockstep::cli
