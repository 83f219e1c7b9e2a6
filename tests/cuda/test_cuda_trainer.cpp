// The GPU trainer's backward (model/cuda/cuda_trainer.h) on the fixture model: gradients
// against the Hugging Face float64 ones within the bound the CPU bfloat16 recipe meets on the
// same data; the trainer's log-probs are the engine's score bits; a step repeated gives the
// same bits.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "../error_of.h"
#include "../model/test_helpers.h"
#include "core/error.h"
#include "cuda_test_util.h"
#include "kernels/canonical.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/backward.h"
#include "kernels/cuda/outer_sum_split_tma.h"
#include "model/cuda/cuda_runner.h"
#include "model/cuda/cuda_trainer.h"
#include "model/qwen3_moe.h"
#include "model/runner_score.h"
#include "parallel/parallel_backward.h"
#include "train/grad_accumulate.h"
#include "train/optimizer.h"

namespace lockstep {
namespace {

using testing::fixture_model_dir;
using testing::golden;
using testing::golden_ids;

std::vector<std::vector<int32_t>> fixture_sequences() {
  return {golden_ids("seq0.input_ids"), golden_ids("seq2.input_ids")};
}

// Per gradient tensor: max |got - float64| / max |float64|.
std::map<std::string, double> errors_vs_golden(ModelWeights& grads) {
  std::map<std::string, double> out;
  for (auto& [name, t] : grads.named()) {
    const Tensor& ref = golden().get("grad." + name);
    EXPECT_EQ(t->shape(), ref.shape()) << name;
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      diff = std::max(diff, std::abs(double(t->data<float>()[i]) - ref.data<double>()[i]));
      scale = std::max(scale, std::abs(ref.data<double>()[i]));
    }
    out[name] = diff / (scale + 1e-30);
  }
  return out;
}

TEST(CudaTrainer, FixtureGradientsWithinTheCpuBfloat16Bound) {
  LS_SKIP_WITHOUT_GPU();
  const auto seqs = fixture_sequences();
  ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  Qwen3Moe cpu_model(weights, Precision::bfloat16);
  ParallelGrad cpu_grad(cpu_model);
  ModelWeights cpu =
      cpu_grad.step_grads({seqs}, false, [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); });
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  std::vector<std::vector<float>> gpu_lp;
  ModelWeights gpu = cuda_step_grads(*runner, seqs, false, [&](int64_t, const auto& lp, const auto&) {
    gpu_lp = lp;
    return mean_nll_upstream(lp);
  });
  const auto cpu_err = errors_vs_golden(cpu), gpu_err = errors_vs_golden(gpu);
  double cpu_worst = 0, gpu_worst = 0;
  for (const auto& [name, e] : cpu_err) cpu_worst = std::max(cpu_worst, e);
  for (const auto& [name, e] : gpu_err) gpu_worst = std::max(gpu_worst, e);
  // Per tensor, the CPU recipe's error sets the bound: bf16 activations put both at the same
  // noise level (0.6% to 100% here, expert tensors whose routing bf16 changes the most), and
  // their roundings fall differently, hence the margin. A wrong gradient is off by ~1.
  if (std::getenv("LOCKSTEP_VERBOSE"))
    for (const auto& [name, e] : gpu_err) std::printf("%-50s cpu %.3g gpu %.3g\n", name.c_str(), cpu_err.at(name), e);
  for (const auto& [name, e] : gpu_err)
    EXPECT_LE(e, 1.5 * cpu_err.at(name) + 0.01) << name << " (cpu " << cpu_err.at(name) << ")";
  std::printf("fixture grads vs float64, worst relative error: cpu bf16 %.3g, gpu %.3g over %zu tensors\n", cpu_worst,
              gpu_worst, gpu_err.size());
  // The loss from the trainer's log-probs, against the reference loss.
  double loss = 0;
  for (const auto& lp : gpu_lp) {
    double nll = 0;
    for (float v : lp) nll -= double(v);
    loss += nll / double(lp.size());
  }
  const double ref_loss = golden().get("grad_loss").data<double>()[0];
  EXPECT_NEAR(loss, ref_loss, 2e-2 * std::abs(ref_loss));
}

TEST(CudaTrainer, LogprobsAreTheEnginesScoreBitsAndStepsRepeatExactly) {
  LS_SKIP_WITHOUT_GPU();
  auto seqs = fixture_sequences();
  seqs.push_back({5, 9, 200, 17, 17, 3, 511, 0, 44});
  ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  runner->allocate_kv(64, 16);
  std::vector<std::vector<float>> lp1, lp2, ent;
  ModelWeights g1 = cuda_step_grads(*runner, seqs, true, [&](int64_t, const auto& lp, const auto& e) {
    lp1 = lp;
    ent = e;
    return mean_nll_upstream(lp);
  });
  // The engine's scoring of the same sequences (other steps, another KV pool).
  const auto scored = runner_score_sequences(*runner, seqs);
  ASSERT_EQ(scored.size(), lp1.size());
  for (size_t i = 0; i < seqs.size(); ++i) {
    ASSERT_EQ(scored[i].size(), lp1[i].size());
    EXPECT_EQ(std::memcmp(scored[i].data(), lp1[i].data(), lp1[i].size() * 4), 0) << "sequence " << i;
    for (float h : ent[i]) EXPECT_TRUE(std::isfinite(h) && h >= 0.0f);
  }
  // The trainer's scoring (its own KV pages, in other steps) has the same bits.
  const auto trainer_scored = cuda_score_sequences(*runner, seqs, 40);
  for (size_t i = 0; i < seqs.size(); ++i)
    EXPECT_EQ(std::memcmp(trainer_scored[i].data(), lp1[i].data(), lp1[i].size() * 4), 0) << "sequence " << i;
  ModelWeights g2 = cuda_step_grads(*runner, seqs, false, [&](int64_t, const auto& lp, const auto&) {
    lp2 = lp;
    return mean_nll_upstream(lp);
  });
  EXPECT_EQ(lp1, lp2);
  auto n1 = g1.named(), n2 = g2.named();
  for (auto& [name, t] : n1)
    EXPECT_EQ(std::memcmp(t->data<float>(), n2.at(name)->data<float>(), size_t(t->numel()) * 4), 0) << name;
}

// A layer not recomputed keeps the forward's intermediates, which the recomputation would
// have rebuilt with the same functions: the gradients have the same bits with every layer
// recomputed, none, the first only, or as many as the memory allows (the default).
TEST(CudaTrainer, GradientsAreTheSameBitsWhateverLayersAreRecomputed) {
  LS_SKIP_WITHOUT_GPU();
  auto seqs = fixture_sequences();
  seqs.push_back({5, 9, 200, 17, 17, 3, 511, 0, 44});
  ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  const auto upstream = [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); };
  const int64_t layers = weights.config.num_hidden_layers;
  ASSERT_GE(layers, 2);
  ModelWeights all = cuda_step_grads(*runner, seqs, false, upstream, layers);
  for (const bool keep_rows : {false, true}) {
    set_keep_expert_input_rows(keep_rows);
    for (const int64_t recompute : {int64_t(0), int64_t(1), kRecomputeAuto, layers}) {
      ModelWeights g = cuda_step_grads(*runner, seqs, false, upstream, recompute);
      auto want = all.named(), got = g.named();
      for (auto& [name, t] : want)
        EXPECT_EQ(std::memcmp(t->data<float>(), got.at(name)->data<float>(), size_t(t->numel()) * 4), 0)
            << name << ", recompute_num_layers " << recompute << ", expert input rows kept " << keep_rows;
    }
  }
  set_keep_expert_input_rows(false);
}

// At 8192 (token, expert) pairs and more the forward places each expert's rows in token
// order, and the backward reads a kept layer's rows where they are instead of gathering them:
// the same bits as recomputing those rows in the backward's order.
TEST(CudaTrainer, KeptExpertRowsReadInPlaceAreTheRecomputedRowsBits) {
  LS_SKIP_WITHOUT_GPU();
  ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  const ModelConfig& c = weights.config;
  std::mt19937_64 rng(21);
  std::vector<std::vector<int32_t>> seqs(10);
  for (auto& seq : seqs)
    for (int t = 0; t < 450; ++t) seq.push_back(int32_t(rng() % uint64_t(c.vocab_size)));
  ASSERT_GE(10 * 450 * c.num_experts_per_tok, 8192);
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  const auto upstream = [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); };
  ModelWeights recomputed = cuda_step_grads(*runner, seqs, false, upstream, c.num_hidden_layers);
  for (const bool keep_rows : {false, true}) {  // the input rows gathered once and read in place too
    set_keep_expert_input_rows(keep_rows);
    ModelWeights kept = cuda_step_grads(*runner, seqs, false, upstream, 0);
    auto want = recomputed.named(), got = kept.named();
    for (auto& [name, t] : want)
      EXPECT_EQ(std::memcmp(t->data<float>(), got.at(name)->data<float>(), size_t(t->numel()) * 4), 0)
          << name << ", expert input rows kept " << keep_rows;
  }
  set_keep_expert_input_rows(false);
}

// A step of several micro-batches runs micro-batch by micro-batch, or layer by layer with one
// gradient buffer and each part's tree folded in place (train_memory.h's MicroBatchOrder): both
// are the pairwise tree over the micro-batches' own gradients, bit for bit. Eight micro-batches
// use every scratch level (leaves 1, 2 and 4 start nodes of levels 0, 1 and 2).
TEST(CudaTrainer, MicroBatchOrdersAreTheTreeOfTheMicroBatchesGradients) {
  LS_SKIP_WITHOUT_GPU();
  const auto fixture = fixture_sequences();
  std::vector<std::vector<std::vector<int32_t>>> micro_batches = {
      {fixture[0]}, {fixture[1]}, {{5, 9, 200, 17, 17, 3, 511, 0, 44}}, {fixture[1], {7, 7, 8}},
      {{1, 2, 3}},  {fixture[0]}, {{300, 301, 302, 303, 304, 305}},     {{9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12}}};
  ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  const auto upstream = [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); };
  for (const size_t count : {size_t(2), size_t(8)}) {
    const std::vector<std::vector<std::vector<int32_t>>> mbs(micro_batches.begin(), micro_batches.begin() + count);
    PairwiseGradAccumulator sum{int64_t(count)};
    for (const auto& mb : mbs) sum.push(named_tensors(cuda_step_grads(*runner, mb, false, upstream)));
    ModelWeights want = weights.zeros_like();
    copy_from_named(want, sum.finish());
    CudaTrainState state(*runner, kRecomputeAuto);
    for (const MicroBatchOrder order : {MicroBatchOrder::batch_major, MicroBatchOrder::layer_major}) {
      state.force_micro_batch_order(order);
      state.compute_grads(mbs, false, upstream);
      EXPECT_EQ(state.micro_batch_order(), order);
      ModelWeights got = state.gradients();
      auto got_named = got.named();
      for (auto& [name, t] : want.named())
        EXPECT_EQ(std::memcmp(t->data<float>(), got_named.at(name)->data<float>(), t->nbytes()), 0)
            << name << ", " << count << " micro-batches, "
            << (order == MicroBatchOrder::layer_major ? "layer-major" : "batch-major");
    }
  }
}

TEST(CudaTrainer, AnExpertWithoutTokensHasZeroGradientsWhateverItsBufferHeld) {
  LS_SKIP_WITHOUT_GPU();
  ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  const auto upstream = [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); };
  // A step over every expert first, so that the next step's buffers likely held gradients.
  cuda_step_grads(*runner, fixture_sequences(), false, upstream);
  const std::vector<std::vector<int32_t>> two_tokens = {{5, 9}};  // at most 4 of 8 experts a layer
  ModelWeights gpu = cuda_step_grads(*runner, two_tokens, false, upstream);
  Qwen3Moe cpu_model(weights, Precision::bfloat16);
  ParallelGrad cpu_grad(cpu_model);
  ModelWeights cpu = cpu_grad.step_grads({two_tokens}, false, upstream);
  int idle = 0;
  for (size_t l = 0; l < cpu.layers.size(); ++l)
    for (size_t e = 0; e < cpu.layers[l].experts.size(); ++e) {
      const auto& want = cpu.layers[l].experts[e];
      const auto& got = gpu.layers[l].experts[e];
      const auto zero = [](const Tensor& t) {
        for (int64_t i = 0; i < t.numel(); ++i)
          if (t.data<float>()[i] != 0.0f) return false;
        return true;
      };
      if (!zero(want.gate) || !zero(want.up) || !zero(want.down)) continue;  // the expert had rows
      ++idle;
      EXPECT_TRUE(zero(got.gate) && zero(got.up) && zero(got.down)) << "layer " << l << " expert " << e;
    }
  EXPECT_GE(idle, 8);
}

TEST(CudaTrainer, AStepThatCannotFitIsRefusedBeforeAnyAllocation) {
  LS_SKIP_WITHOUT_GPU();
  // One small layer with a large vocabulary: 400k tokens' fp32 logits alone exceed any GPU.
  ModelConfig c = ModelWeights::load(fixture_model_dir(), Precision::bfloat16).config;
  c.vocab_size = 151936;
  c.num_hidden_layers = 1;
  auto runner = make_cuda_runner_random(c, 3);
  std::vector<std::vector<int32_t>> seqs(800, std::vector<int32_t>(500, 7));
  bool called = false;
  const std::string e = testing::error_of([&] {
    cuda_step_grads(*runner, seqs, false, [&](int64_t, const auto& lp, const auto&) {
      called = true;
      return mean_nll_upstream(lp);
    });
  });
  EXPECT_NE(e.find("400000 tokens needs"), std::string::npos) << e;
  EXPECT_NE(e.find("GiB free"), std::string::npos) << e;
  EXPECT_FALSE(called);
  // The runner is untouched: it still trains a step that fits.
  ModelWeights g = cuda_step_grads(*runner, {{1, 2, 3, 4}}, false,
                                   [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); });
  EXPECT_EQ(g.embed.numel(), c.vocab_size * c.hidden_size);
}

// The gradient norm's chunk partials (rule 11) are the host's lanes bit for bit: chunks shorter
// than a tile, chunks of many tiles, a last partial tile, and a tensor whose chunks start off
// 16-byte boundaries (the 4-byte copies).
TEST(CudaTrainer, SumSquaresChunksAreTheHostLanes) {
  LS_SKIP_WITHOUT_GPU();
  const std::vector<int64_t> sizes = {1, 100, 3 * 4096 + 5, 8 * 6 * 4096 * 4, 8 * 6 * 4096 * 4 + 4 * 13, 300001};
  std::vector<float> all;
  std::vector<int64_t> offsets;
  std::mt19937_64 rng(51);
  std::uniform_real_distribution<float> d(-2.0f, 2.0f);
  for (const int64_t n : sizes) {
    offsets.push_back(int64_t(all.size()) + 1);  // every tensor one float past a 16-byte boundary of its own
    all.resize(all.size() + size_t(n) + 4);
    for (int64_t i = 0; i < n; ++i) all[size_t(offsets.back() + i)] = d(rng);
    all.resize((all.size() + 3) / 4 * 4);
  }
  testing::DeviceVec<float> All(all);
  // The same tensors again from one float earlier: 16-byte aligned starts.
  std::vector<const float*> ptrs;
  for (const int64_t at : offsets) ptrs.push_back(All.get() + at);
  for (const int64_t at : offsets) ptrs.push_back(All.get() + at - 1);
  std::vector<int64_t> numels(sizes);
  numels.insert(numels.end(), sizes.begin(), sizes.end());
  const int64_t count = int64_t(ptrs.size());
  testing::DeviceVec<int64_t> Numels(numels);
  testing::DeviceVec<float> Partials(count * 8);
  std::vector<uint64_t> raw(ptrs.size());
  std::memcpy(raw.data(), ptrs.data(), raw.size() * 8);
  testing::DeviceVec<uint64_t> Ptrs(raw);
  cuda::sum_squares_chunks(reinterpret_cast<const float* const*>(Ptrs.get()), Numels.get(), count, Partials.get(),
                           nullptr);
  const std::vector<float> got = Partials.take();
  for (int64_t t = 0; t < count; ++t) {
    const int64_t n = numels[size_t(t)], chunk = canonical_chunk(n);
    const float* x = all.data() + offsets[size_t(t) % sizes.size()] - (t >= int64_t(sizes.size()) ? 1 : 0);
    for (int c = 0; c < kTMax; ++c) {
      float lanes[kSquaresLanes] = {};
      const int64_t begin = std::min(n, c * chunk), end = std::min(n, (c + 1) * chunk);
      for (int64_t i = begin; i < end; ++i) lanes[(i - begin) % kSquaresLanes] += x[i] * x[i];
      const float want = pairwise_tree(lanes, kSquaresLanes);
      EXPECT_EQ(std::memcmp(&got[size_t(t * 8 + c)], &want, 4), 0)
          << "tensor " << t << " (" << n << " values) chunk " << c << ": " << got[size_t(t * 8 + c)] << " vs " << want;
    }
  }
}

TEST(CudaTrainer, DeviceAdamWStepIsTheHostStepBitForBit) {
  LS_SKIP_WITHOUT_GPU();
  const auto seqs = fixture_sequences();
  const ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  OptimizerConfig oc;
  oc.lr = 1e-2;
  oc.weight_decay = 0.1;
  oc.clip_grad = 0.5;  // the fixture's norm is larger: the clipped path
  AdamW host(oc, weights);
  ModelWeights host_weights = weights.clone();
  CudaTrainState device(*runner, oc, host);
  const auto upstream = [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); };
  for (int step = 0; step < 2; ++step) {
    // The host step from the same gradients: two micro-batches summed by the same tree.
    PairwiseGradAccumulator sum(2);
    sum.push(named_tensors(cuda_step_grads(*runner, {seqs[0]}, false, upstream)));
    sum.push(named_tensors(cuda_step_grads(*runner, {seqs[1]}, false, upstream)));
    ModelWeights grads = weights.zeros_like();
    copy_from_named(grads, sum.finish());
    const OptimizerStepResult want = host.step(grads, host_weights, Precision::bfloat16);
    device.compute_grads({{seqs[0]}, {seqs[1]}}, false, upstream);
    const OptimizerStepResult got = device.apply(Precision::bfloat16);
    EXPECT_EQ(std::memcmp(&got.grad_norm, &want.grad_norm, 4), 0) << got.grad_norm << " vs " << want.grad_norm;
    EXPECT_TRUE(got.clipped && want.clipped);
    ModelWeights now = runner->export_weights();
    auto got_w = now.named();
    for (auto& [name, t] : host_weights.named())
      EXPECT_EQ(std::memcmp(t->data<float>(), got_w.at(name)->data<float>(), t->nbytes()), 0)
          << "step " << step << " " << name;
  }
  const AdamW back = device.download(weights);
  EXPECT_EQ(back.steps_taken(), 2);
  auto a = named_tensors(back.master()), b = named_tensors(host.master());
  auto va = named_tensors(back.exp_avg_sq()), vb = named_tensors(host.exp_avg_sq());
  for (auto& [name, t] : b) {
    EXPECT_EQ(std::memcmp(t.data<float>(), a.at(name).data<float>(), t.nbytes()), 0) << "master " << name;
    EXPECT_EQ(std::memcmp(vb.at(name).data<float>(), va.at(name).data<float>(), t.nbytes()), 0) << "v " << name;
  }
}

// The fresh state made on the device is a fresh host AdamW's, uploaded: the masters the
// weights, the moments zero, no step taken (so the host-step test above covers its steps).
TEST(CudaTrainer, AFreshDeviceStateIsAFreshHostOptimizersState) {
  LS_SKIP_WITHOUT_GPU();
  const ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  OptimizerConfig oc;
  const AdamW host(oc, weights);
  const AdamW back = CudaTrainState(*runner, oc).download(weights);
  EXPECT_EQ(back.steps_taken(), 0);
  const std::pair<const ModelWeights*, const ModelWeights*> parts[] = {
      {&back.master(), &host.master()}, {&back.exp_avg(), &host.exp_avg()}, {&back.exp_avg_sq(), &host.exp_avg_sq()}};
  for (const auto& [got, want] : parts) {
    auto got_named = named_tensors(*got);
    for (auto& [name, t] : named_tensors(*want)) {
      ASSERT_TRUE(got_named.count(name)) << name;
      EXPECT_EQ(std::memcmp(t.data<float>(), got_named.at(name).data<float>(), t.nbytes()), 0) << name;
    }
  }
}

// A checkpoint's optimizer state without a host copy: the device state writes the file that
// its host download would write (bytes), and a state read from that file tensor by tensor is
// the state that wrote it (its own file again, and the next step's weights, bits).
TEST(CudaTrainer, DeviceStateFileIsTheHostStatesFile) {
  LS_SKIP_WITHOUT_GPU();
  namespace fs = std::filesystem;
  const auto seqs = fixture_sequences();
  const ModelWeights weights = ModelWeights::load(fixture_model_dir(), Precision::bfloat16);
  OptimizerConfig oc;
  oc.lr = 1e-2;
  const auto upstream = [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); };
  const std::string dir = (fs::temp_directory_path() / ("ls_cuda_state_" + std::to_string(::getpid()))).string();
  fs::create_directories(dir);
  const auto bytes = [](const std::string& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  auto runner = make_cuda_runner(weights, Precision::bfloat16);
  CudaTrainState device(*runner, oc);
  device.compute_grads({{seqs[0]}, {seqs[1]}}, false, upstream);
  device.apply(Precision::bfloat16);
  const ModelWeights after_one = runner->export_weights();
  device.save_optimizer(dir + "/device.safetensors", weights);
  device.download(weights).save(dir + "/host.safetensors");
  EXPECT_EQ(bytes(dir + "/device.safetensors"), bytes(dir + "/host.safetensors"));
  device.compute_grads({{seqs[0]}, {seqs[1]}}, false, upstream);
  device.apply(Precision::bfloat16);
  const ModelWeights want = runner->export_weights();

  auto resumed_runner = make_cuda_runner(after_one, Precision::bfloat16);
  CudaTrainState resumed(*resumed_runner, oc, dir + "/device.safetensors", weights);
  resumed.save_optimizer(dir + "/again.safetensors", weights);
  EXPECT_EQ(bytes(dir + "/device.safetensors"), bytes(dir + "/again.safetensors"));
  resumed.compute_grads({{seqs[0]}, {seqs[1]}}, false, upstream);
  resumed.apply(Precision::bfloat16);
  const ModelWeights got = resumed_runner->export_weights();
  auto got_named = got.named();
  for (auto& [name, t] : want.named())
    EXPECT_EQ(std::memcmp(t->data<float>(), got_named.at(name)->data<float>(), t->nbytes()), 0) << name;
  fs::remove_all(dir);
}

// The speed settings that are off by default give the same gradients, bit for bit, one at a
// time and all together, with every layer kept and every layer recomputed: on a model with
// Qwen3-30B-A3B's head size and expert width (head_dim 128: the warpgroup-MMA attention
// backward; I 768: the experts' chunks of 96 on the TMA outer sums) and sequences with partial
// tiles.
TEST(CudaTrainer, SpeedSettingsGiveTheSameGradients) {
  LS_SKIP_WITHOUT_GPU();
  ModelConfig c = ModelConfig::load(fixture_model_dir() + "/config.json");
  c.hidden_size = 256, c.head_dim = 128, c.num_attention_heads = 4, c.num_key_value_heads = 2;
  c.moe_intermediate_size = 768, c.max_position_embeddings = 1024;
  auto runner = make_cuda_runner_random(c, 23);
  std::mt19937_64 rng(24);
  std::vector<std::vector<int32_t>> seqs;
  // Lengths whose dS tiles (4 sequences of up to 5 tiles: 60 a head) fit the scratch of their
  // 867 tokens (105 a head), so the kept-dS path runs.
  for (const int len : {300, 77, 290, 200}) {
    seqs.emplace_back();
    for (int t = 0; t < len; ++t) seqs.back().push_back(int32_t(rng() % uint64_t(c.vocab_size)));
  }
  const auto upstream = [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); };
  struct Setting {
    const char* name;
    void (*set)(bool);
  };
  const Setting settings[] = {{"pair stages", cuda::set_outer_sum_input_pair_stages},
                              {"narrow dw blocks", cuda::set_rmsnorm_narrow_dw_blocks},
                              {"expert input rows kept", set_keep_expert_input_rows},
                              {"attention dS kept", set_keep_attention_ds},
                              {"attention dkv overlap", cuda::set_attention_dkv_overlap},
                              {"expert input parts summed", cuda::set_outer_sum_input_parts_summed},
                              {"expert output by token", cuda::set_expert_output_by_token}};
  const auto set_all = [&](bool on) {
    for (const Setting& setting : settings) setting.set(on);
  };
  for (const int64_t recompute : {int64_t(0), c.num_hidden_layers}) {
    set_all(false);
    const ModelWeights want = cuda_step_grads(*runner, seqs, false, upstream, recompute);
    const auto check = [&](const std::string& what) {
      const ModelWeights got = cuda_step_grads(*runner, seqs, false, upstream, recompute);
      const auto got_named = got.named();
      for (auto& [name, t] : want.named())
        EXPECT_EQ(std::memcmp(t->data<float>(), got_named.at(name)->data<float>(), t->nbytes()), 0)
            << name << ", " << what << ", recompute_num_layers " << recompute;
    };
    for (const Setting& setting : settings) {
      setting.set(true);
      check(setting.name);
      setting.set(false);
    }
    set_all(true);
    check("all on");
  }
  set_all(false);
}

}  // namespace
}  // namespace lockstep
