// lockstep grad: the loss (sum over input sequences of the mean next-token NLL) and its
// gradient with respect to every parameter, as a safetensors file (a gradient-check tool).
// All input sequences form one micro-batch (one packed forward; see train/model_grad.h).
// Output: `loss` (F32, shape [] -- a scalar) and `grad.<global name>` (F32, the parameter's
// shape) for every parameter.
#include <memory>

#include "checkpoint/safetensors.h"
#include "command_registry.h"
#include "core/error.h"
#include "core/jsonl.h"
#include "model/qwen3_moe.h"
#include "train/model_grad.h"

namespace lockstep::cli {
namespace {

struct GradOptions {
  std::string model, input = "-", output, dtype = "float32";
};

int run_grad(const GradOptions& o) {
  Precision precision = precision_from_name(o.dtype);
  auto records = read_jsonl(o.input);  // read and check all input before any compute
  LS_CHECK(!records.empty(), o.input, ": no sequences (expected one {\"input_ids\":[...]} per line)");
  Qwen3Moe model(ModelWeights::load(o.model, precision), precision);
  std::vector<std::vector<int32_t>> seqs;
  for (const auto& r : records) {
    seqs.push_back(read_token_ids(r, o.input, "input_ids", model.config().vocab_size));
    LS_CHECK(seqs.back().size() >= 2, o.input, ":", r.line, ": input_ids has ", seqs.back().size(),
             " token(s); the mean next-token NLL needs at least 2");
    LS_CHECK(int64_t(seqs.back().size()) <= model.config().max_position_embeddings, o.input, ":", r.line,
             ": sequence of ", seqs.back().size(), " tokens exceeds max_position_embeddings (",
             model.config().max_position_embeddings, ")");
  }
  TrainForward fwd = train_forward(model, seqs, false);
  // loss = sum_s mean_t(-logp): d loss / d logp = -1 / (n_s - 1). The loss is summed in
  // double in input order, then stored as fp32.
  std::vector<SequenceGradInput> upstream(seqs.size());
  double loss = 0;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const auto& lp = fwd.logprobs[s];
    double nll = 0;
    for (float v : lp) nll -= double(v);
    loss += nll / double(lp.size());
    upstream[s].dlogp.assign(lp.size(), -1.0f / float(lp.size()));
  }
  std::map<std::string, Tensor> grads;
  backward(model, fwd, upstream, grads);

  std::map<std::string, Tensor> out;
  Tensor loss_t = Tensor::zeros(Shape{}, DType::f32);
  loss_t.data<float>()[0] = float(loss);
  out.emplace("loss", loss_t);
  for (auto& [name, g] : grads) out.emplace("grad." + name, g);
  write_safetensors(o.output, out, {{"loss", "sum over sequences of mean next-token NLL"},
                                    {"dtype", precision_name(precision)}});
  return 0;
}

const bool registered = register_command(
    {"grad", "Loss (sum of per-sequence mean NLL) and parameter gradients as safetensors", [](CLI::App& sub) {
       auto o = std::make_shared<GradOptions>();
       sub.add_option("--model", o->model, "model directory")->required();
       sub.add_option("--input", o->input, "input JSONL of {\"input_ids\":[...]} ('-' = stdin)");
       sub.add_option("--output", o->output, "output .safetensors")->required();
       sub.add_option("--dtype", o->dtype, "float32 | bfloat16");
       return std::function<int()>([o] { return run_grad(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
