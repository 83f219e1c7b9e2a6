// lockstep grad: the loss (sum over input sequences of the mean next-token NLL) and its
// gradient with respect to every parameter, as a safetensors file (a gradient-check tool).
// All input sequences form one micro-batch (one packed forward; see parallel/parallel_backward.h), or
// with --num-microbatches M, M contiguous equal micro-batches summed by the pairwise tree.
// Under mpirun with the topology flags the gradient is computed at that topology and rank 0
// writes the same bytes (docs/numerics.md, D4); DP replicas take whole runs of micro-batches.
// Output: `loss` (F32, shape [] -- a scalar) and `grad.<global name>` (F32, the parameter's
// shape) for every parameter. --device cuda runs the GPU trainer's backward
// (model/cuda/cuda_trainer.h; bfloat16 recipe, one GPU), micro-batches by the same tree.
#include <memory>

#include "checkpoint/safetensors.h"
#include "command_registry.h"
#include "core/device_memory.h"
#include "core/error.h"
#include "core/finite.h"
#include "core/jsonl.h"
#include "core/output_path.h"
#include "dist/mpi_communicator.h"
#ifdef LOCKSTEP_CUDA
#include "model/cuda/cuda_trainer.h"
#endif
#include "model/qwen3_moe.h"
#include "model/runner.h"
#include "parallel/parallel_backward.h"
#include "topology_flags.h"
#include "train/grad_accumulate.h"
#include "train/train_memory.h"

namespace lockstep::cli {
namespace {

struct GradOptions {
  std::string model, input = "-", output, dtype = "float32", device = "cpu";
  int64_t num_microbatches = 1;
  int64_t recompute_num_layers = -1;  // --device cuda
  TopologyRequest topology;           // parallel forms (mpirun)
};

// Writes the loss (summed in double in input order, stored as fp32) and the gradients.
int write_grads(const std::string& path, Precision precision, const std::vector<std::vector<float>>& logprobs,
                const std::map<std::string, Tensor>& grads) {
  double loss = 0;
  for (const auto& lp : logprobs) {
    double nll = 0;
    for (float v : lp) nll -= double(v);
    loss += nll / double(lp.size());
  }

  std::map<std::string, Tensor> out;
  Tensor loss_t = Tensor::zeros(Shape{}, DType::f32);
  loss_t.data<float>()[0] = float(loss);
  out.emplace("loss", loss_t);
  for (auto& [name, g] : grads) out.emplace("grad." + name, g);
  for (const auto& [name, t] : out) check_finite(t, "grad (nothing written to " + path + ")", name);
  write_safetensors(path, out,
                    {{"loss", "sum over sequences of mean next-token NLL"}, {"dtype", precision_name(precision)}});
  return 0;
}

// The GPU trainer's gradients of the micro-batches, summed by the pairwise tree; `logprobs`
// gets each sequence's log-probs.
GradMap cuda_grads(const std::string& model_dir, Precision precision,
                   const std::vector<std::vector<std::vector<int32_t>>>& micro_batches,
                   std::vector<std::vector<float>>& logprobs, int64_t recompute_num_layers) {
#ifdef LOCKSTEP_CUDA
  auto runner = make_runner(Device::cuda, ModelWeights::load(model_dir, precision), precision);
  PairwiseGradAccumulator sum(int64_t(micro_batches.size()));
  for (const auto& mb : micro_batches) {
    const ModelWeights g = cuda_step_grads(
        *runner, mb, false,
        [&](int64_t, const auto& lp, const auto&) {
          logprobs.insert(logprobs.end(), lp.begin(), lp.end());
          return mean_nll_upstream(lp);
        },
        recompute_num_layers);
    sum.push(named_tensors(g));
  }
  return sum.finish();
#else
  (void)model_dir, (void)precision, (void)micro_batches, (void)logprobs, (void)recompute_num_layers;
  LS_CHECK(false, "--device cuda: this build has no CUDA backend (configure with -DLOCKSTEP_CUDA=ON)");
  return {};
#endif
}

int run_grad(const GradOptions& o) {
  check_output_differs(o.output, {o.input}, "--output");
  check_output_outside(o.output, o.model, "--output");
  Precision precision = precision_from_name(o.dtype);
  const Device device = device_from_name(o.device);
  auto world = dist::world_communicator();
  if (device == Device::cuda) {
    LS_CHECK(!o.topology.parallel() && world->size() == 1,
             "--device cuda: grad runs on one GPU (the parallel forms run on --device cpu)");
    LS_CHECK(precision == Precision::bfloat16, "--device cuda runs the bfloat16 recipe only (use --dtype bfloat16)");
    LS_CHECK(cuda_available(), "--device cuda: no CUDA device is available");
  }
  check_recompute_num_layers(o.recompute_num_layers, device == Device::cuda);
  const ModelConfig config = ModelConfig::load(o.model + "/config.json");
  // The topology (one rank without the flags) is checked against the model before any
  // input or weight is read.
  const ResolvedTopology topo = resolve_topology(o.topology, config, world->size());
  auto records = read_jsonl(o.input);  // read and check all input before any compute
  LS_CHECK(!records.empty(), o.input, ": no sequences (expected one {\"input_ids\":[...]} per line)");
  std::vector<std::vector<int32_t>> seqs;
  for (const auto& r : records) {
    seqs.push_back(read_token_ids(r, o.input, "input_ids", config.vocab_size));
    LS_CHECK(seqs.back().size() >= 2, o.input, ":", r.line, ": input_ids has ", seqs.back().size(),
             " token(s); the mean next-token NLL needs at least 2");
    LS_CHECK(int64_t(seqs.back().size()) <= config.max_position_embeddings, o.input, ":", r.line, ": sequence of ",
             seqs.back().size(), " tokens exceeds max_position_embeddings (", config.max_position_embeddings, ")");
  }
  LS_CHECK(o.num_microbatches >= 1 && int64_t(seqs.size()) % o.num_microbatches == 0, "--num-microbatches ",
           o.num_microbatches, " must divide the ", seqs.size(), " input sequences");
  const auto ranges = canonical_microbatches(int64_t(seqs.size()), o.num_microbatches);
  std::vector<std::vector<std::vector<int32_t>>> mbs;
  for (auto [b, e] : ranges) mbs.emplace_back(seqs.begin() + b, seqs.begin() + e);

  // loss = sum_s mean_t(-logp): d loss / d logp = -1 / (n_s - 1). The loss is summed in
  // double in input order, then stored as fp32.
  std::vector<std::vector<float>> logprobs(seqs.size());
  std::map<std::string, Tensor> grads;
  if (device == Device::cuda) {
    logprobs.clear();
    grads = cuda_grads(o.model, precision, mbs, logprobs, o.recompute_num_layers);
    return write_grads(o.output, precision, logprobs, grads);
  }
  const Topology& t = topo.topo;
  LS_CHECK(o.num_microbatches % t.dp == 0, "--num-microbatches ", o.num_microbatches,
           " must be a multiple of the data-parallel size ", t.dp, " (each replica takes whole micro-batches)");
  auto src = open_checkpoint_for(o.model, config, t);
  const ShardLayout layout = ShardLayout::make(config, t, topo.layer_split, world->rank());
  Qwen3Moe model(*world, layout, load_local_weights(*src, config, layout, precision), precision);
  ParallelGrad pg(model);
  const int64_t per = o.num_microbatches / t.dp, d = layout.coords.dp;
  std::vector<std::vector<std::vector<int32_t>>> mine(mbs.begin() + d * per, mbs.begin() + (d + 1) * per);
  std::vector<float> my_lp;  // this replica's log-probs, in order (last stage)
  auto local = pg.step_grads(mine, false, [&](int64_t, const auto& lp, const auto&) {
    for (const auto& v : lp) my_lp.insert(my_lp.end(), v.begin(), v.end());
    return mean_nll_upstream(lp);
  });
  grads = gather_full(*world, config, layout, local);
  // The loss's log-probs: each replica's (tp 0, last stage) rank sends its run to rank 0.
  constexpr int kLossTag = 5 << 20;
  if (layout.last_stage && layout.coords.tp == 0 && world->rank() != 0)
    world->send_n(my_lp.data(), my_lp.size(), 0, kLossTag);
  if (world->rank() != 0) return 0;  // rank 0 writes the output
  for (int r = 0; r < t.dp; ++r) {
    const int holder = t.rank_of(0, r, t.pp - 1);
    const int64_t first = ranges[r * per].first, last = ranges[(r + 1) * per - 1].second;
    std::vector<float> flat;
    if (holder == 0) {
      flat = my_lp;
    } else {
      size_t n = 0;
      for (int64_t i = first; i < last; ++i) n += seqs[i].size() - 1;
      flat.resize(n);
      world->recv_n(flat.data(), n, holder, kLossTag);
    }
    size_t at = 0;
    for (int64_t i = first; i < last; ++i) {
      logprobs[i].assign(flat.begin() + at, flat.begin() + at + (seqs[i].size() - 1));
      at += seqs[i].size() - 1;
    }
  }
  return write_grads(o.output, precision, logprobs, grads);
}

const bool registered = register_command(
    {"grad", "Loss (sum of per-sequence mean NLL) and parameter gradients as safetensors", [](CLI::App& sub) {
       auto o = std::make_shared<GradOptions>();
       sub.add_option("--model", o->model, "model directory")->required();
       sub.add_option("--input", o->input, "input JSONL of {\"input_ids\":[...]} ('-' = stdin)");
       sub.add_option("--output", o->output, "output .safetensors")->required();
       sub.add_option("--dtype", o->dtype, "float32 | bfloat16");
       sub.add_option("--device", o->device, "cpu | cuda (one GPU, bfloat16)");
       sub.add_option("--num-microbatches", o->num_microbatches,
                      "cut the input into this many contiguous micro-batches (pairwise gradient tree)");
       sub.add_option("--recompute-num-layers", o->recompute_num_layers,
                      "--device cuda: the first N layers are recomputed in the backward, the rest keep their "
                      "activations (-1 = as few as the free memory allows; the same bits either way)");
       add_topology_flags(sub, o->topology);
       return std::function<int()>([o] { return run_grad(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
