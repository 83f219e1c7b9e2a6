// D4: gradients under every topology the backward supports are the bytes of one rank (the
// same backward on a world of one, summed by the pairwise micro-batch tree).
#include <gtest/gtest.h>

#include <mutex>

#include "parallel/parallel_backward.h"
#include "parallel_test_util.h"
#include "train/grad_accumulate.h"

namespace lockstep {
namespace {

using ptest::TopoSpec;

// Upstream of the `grad` loss: d(sum of per-sequence mean NLL) / d logp = -1 / (n - 1).
std::vector<SequenceGradInput> mean_nll_upstream(const std::vector<std::vector<float>>& lp) {
  std::vector<SequenceGradInput> up(lp.size());
  for (size_t i = 0; i < lp.size(); ++i) up[i].dlogp.assign(lp[i].size(), -1.0f / float(lp[i].size()));
  return up;
}

// The golden sequences of length >= 2, cut into `m` micro-batches of whole sequences.
std::vector<std::vector<std::vector<int32_t>>> micro_batches(int m) {
  std::vector<std::vector<int32_t>> seqs;
  for (auto& s : ptest::golden_sequences())
    if (s.size() >= 2) seqs.push_back(s);
  std::vector<std::vector<std::vector<int32_t>>> out(m);
  for (size_t i = 0; i < seqs.size(); ++i) out[i * m / seqs.size()].push_back(seqs[i]);
  return out;
}

GradMap single_rank(const ModelWeights& w, Precision precision,
                    const std::vector<std::vector<std::vector<int32_t>>>& mbs) {
  set_num_threads(1);
  Qwen3Moe model(w.clone(), precision);
  ParallelGrad grad(model);
  return named_tensors(
      grad.step_grads(mbs, false, [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); }));
}

GradMap parallel(const ModelWeights& full, Precision precision, const TopoSpec& spec,
                 const std::vector<std::vector<std::vector<int32_t>>>& mbs,
                 std::vector<std::pair<int, int64_t>>* stage_peaks = nullptr) {
  set_num_threads(1);
  GradMap result;
  std::mutex peaks_mutex;
  dist::run_threads(spec.world, [&](dist::Communicator& comm) {
    Topology topo = Topology::from_world(spec.world, spec.tp, spec.sp, spec.pp, spec.ep, spec.etp);
    topo.validate(full.config, spec.world);
    auto split = pipeline_layer_split(full.config.num_hidden_layers, spec.pp, spec.split);
    ShardLayout layout = ShardLayout::make(full.config, topo, split, comm.rank());
    Qwen3Moe model(comm, layout, slice_local_weights(full, layout), precision);
    ParallelGrad pg(model);
    const int64_t per = int64_t(mbs.size()) / topo.dp, d = layout.coords.dp;
    std::vector<std::vector<std::vector<int32_t>>> mine(mbs.begin() + d * per, mbs.begin() + (d + 1) * per);
    auto local = pg.step_grads(mine, false, [](int64_t, const auto& lp, const auto&) { return mean_nll_upstream(lp); });
    if (stage_peaks) {
      std::lock_guard<std::mutex> lock(peaks_mutex);
      stage_peaks->push_back({layout.coords.pp, pg.peak_in_flight()});
    }
    auto g = gather_full(comm, full.config, layout, local);
    if (comm.rank() == 0) result = std::move(g);
  });
  return result;
}

void expect_same(const GradMap& a, const GradMap& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    ASSERT_TRUE(it != b.end()) << what << ": no " << name;
    ASSERT_EQ(t.numel(), it->second.numel()) << what << ": " << name;
    int64_t first = -1;
    for (int64_t i = 0; i < t.numel() && first < 0; ++i)
      if (std::memcmp(t.data<float>() + i, it->second.data<float>() + i, 4) != 0) first = i;
    EXPECT_EQ(first, -1) << what << ": " << name << " differs first at " << first << ": "
                         << t.data<float>()[std::max<int64_t>(first, 0)] << " vs "
                         << it->second.data<float>()[std::max<int64_t>(first, 0)];
  }
}

struct Case {
  TopoSpec spec;
  int microbatches = 1;
};

class ParallelGradFixture : public ::testing::TestWithParam<Case> {};

TEST_P(ParallelGradFixture, BitwiseEqualToOneRank) {
  const Case c = GetParam();
  ModelWeights w = ModelWeights::load(ptest::fixture_dir(), Precision::float32);
  const auto mbs = micro_batches(c.microbatches);
  const GradMap ref = single_rank(w, Precision::float32, mbs);
  expect_same(ref, parallel(w, Precision::float32, c.spec, mbs), c.spec.name());
}

INSTANTIATE_TEST_SUITE_P(
    Topologies, ParallelGradFixture,
    ::testing::Values(Case{{1}}, Case{{2, 2}}, Case{{4, 4}}, Case{{2, 2, 1, 1, 1, true}}, Case{{2, 1, 2}},
                      Case{{2, 2, 1, 2}}, Case{{2, 1, 1, 2}, 2}, Case{{4, 4, 1, 4}}, Case{{4, 1, 1, 4}, 4},
                      Case{{2, 2, 1, 2, 1, true}}, Case{{8, 2, 2, 2, 1, true}, 2}, Case{{4, 4, 1, 2, 2}},
                      Case{{4, 2, 1, 2, 2}, 2}, Case{{2, 1, 1, 1}, 2}, Case{{4, 2, 1, 1, 2, true}, 2}),
    [](const auto& info) { return info.param.spec.name() + "_mb" + std::to_string(info.param.microbatches); });

TEST(ParallelGrad, UnevenPipelineOnFourLayersInBf16) {
  ModelConfig cfg = ModelWeights::load(ptest::fixture_dir(), Precision::float32).config;
  cfg.num_hidden_layers = 4;
  ModelWeights w = ModelWeights::random(cfg, 7, Precision::bfloat16);
  const auto mbs = micro_batches(2);
  const GradMap ref = single_rank(w, Precision::bfloat16, mbs);
  TopoSpec spec{2, 1, 2};
  spec.split = std::vector<int64_t>{1, 3};
  expect_same(ref, parallel(w, Precision::bfloat16, spec, mbs), spec.name());
  TopoSpec mixed{8, 2, 2, 2, 1, true};
  expect_same(ref, parallel(w, Precision::bfloat16, mixed, mbs), mixed.name());
}

// The 1F1B pipeline schedule: gradients equal one rank's whether J is below, at or above
// a stage's warm-up depth, and stage s holds at most min(J, pp - s) micro-batches'
// activations (forward-all-then-backward-all would hold J; one at a time, 1).
TEST(ParallelGrad, OneFOneBScheduleOnFourStages) {
  ModelConfig cfg = ModelWeights::load(ptest::fixture_dir(), Precision::float32).config;
  cfg.num_hidden_layers = 4;
  ModelWeights w = ModelWeights::random(cfg, 11, Precision::float32);
  struct PipelineCase {
    TopoSpec spec;
    int microbatches;
  };
  TopoSpec uneven{2, 1, 2};
  uneven.split = std::vector<int64_t>{3, 1};
  const std::vector<PipelineCase> cases = {
      {{4, 1, 4}, 1}, {{4, 1, 4}, 2}, {{4, 1, 4}, 4}, {uneven, 4}, {{4, 2, 2, 1, 1, true}, 4}};
  for (const auto& c : cases) {
    const auto mbs = micro_batches(c.microbatches);
    const std::string what = c.spec.name() + "_mb" + std::to_string(c.microbatches);
    std::vector<std::pair<int, int64_t>> peaks;
    expect_same(single_rank(w, Precision::float32, mbs), parallel(w, Precision::float32, c.spec, mbs, &peaks), what);
    ASSERT_EQ(int(peaks.size()), c.spec.world) << what;
    for (const auto& [stage, peak] : peaks)
      EXPECT_EQ(peak, std::min<int64_t>(c.microbatches, c.spec.pp - stage)) << what << " stage " << stage;
  }
}

}  // namespace
}  // namespace lockstep

namespace lockstep {
namespace {

// Tied embeddings (pipeline size 1): the embedding's gradient is its lookup part plus its
// lm_head part, in that order: the untied model whose lm_head equals the embedding has the
// two parts as separate gradients, so their fp32 sum is the tied gradient bit for bit, on
// one rank and under TP/SP (one micro-batch: over several, each micro-batch's sum joins the
// micro-batch tree).
TEST(ParallelGrad, TiedEmbeddingsAreLookupPlusHead) {
  ModelConfig cfg = ModelWeights::load(ptest::fixture_dir(), Precision::float32).config;
  cfg.tie_word_embeddings = false;
  ModelWeights untied = ModelWeights::random(cfg, 5, Precision::float32);
  untied.lm_head = untied.embed.clone();
  cfg.tie_word_embeddings = true;
  ModelWeights tied = untied.clone();
  tied.config = cfg;
  tied.lm_head = tied.embed;
  const auto mbs = micro_batches(1);
  const GradMap parts = single_rank(untied, Precision::float32, mbs);
  GradMap want = parts;
  want.erase("lm_head.weight");
  Tensor sum = parts.at("model.embed_tokens.weight").clone();
  const Tensor& head = parts.at("lm_head.weight");
  for (int64_t i = 0; i < sum.numel(); ++i) sum.data<float>()[i] += head.data<float>()[i];
  want["model.embed_tokens.weight"] = sum;
  expect_same(want, single_rank(tied, Precision::float32, mbs), "one rank");
  expect_same(want, parallel(tied, Precision::float32, TopoSpec{2, 2}, mbs), "tp2");
  expect_same(want, parallel(tied, Precision::float32, TopoSpec{2, 2, 1, 1, 1, true}, mbs), "tp2_sp");
}

}  // namespace
}  // namespace lockstep
