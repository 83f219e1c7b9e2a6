// D3: log-probs under every topology are the bits of one rank (fixture model and a 4-layer
// random model for uneven pipeline splits), in both precision recipes.
#include <gtest/gtest.h>

#include "parallel_test_util.h"

namespace lockstep {
namespace {

using ptest::TopoSpec;

struct Case {
  TopoSpec spec;
  Precision precision;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.spec.name() << "_" << precision_name(c.precision); }

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return info.param.spec.name() + "_" + precision_name(info.param.precision);
}

const std::vector<std::vector<float>>& reference(Precision p) {
  static std::vector<std::vector<float>> ref[2];
  auto& r = ref[p == Precision::bfloat16];
  if (r.empty()) {
    set_num_threads(1);
    Qwen3Moe model(ModelWeights::load(ptest::fixture_dir(), p), p);
    r = score_sequences(model, ptest::golden_sequences());
  }
  return r;
}

class FixtureTopology : public ::testing::TestWithParam<Case> {};

TEST_P(FixtureTopology, ScoreBitsEqualSingleRank) {
  const Case& c = GetParam();
  ModelWeights full = ModelWeights::load(ptest::fixture_dir(), c.precision);
  auto got = ptest::score_on_threads(full, c.precision, c.spec, ptest::golden_sequences());
  const auto& want = reference(c.precision);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(got[i].size(), want[i].size()) << "sequence " << i;
    for (size_t t = 0; t < want[i].size(); ++t)
      ASSERT_EQ(std::memcmp(&got[i][t], &want[i][t], 4), 0)
          << "sequence " << i << " token " << t << ": " << got[i][t] << " vs " << want[i][t];
  }
}

std::vector<Case> fixture_cases() {
  std::vector<TopoSpec> specs = {
      {.world = 2, .tp = 2},
      {.world = 4, .tp = 4},
      {.world = 2, .tp = 2, .sp = true},
      {.world = 4, .tp = 4, .sp = true},
      {.world = 2, .pp = 2},
      {.world = 2, .ep = 2},
      {.world = 4, .ep = 4},
      {.world = 2, .ep = 1, .etp = 2},
      {.world = 4, .tp = 2, .ep = 2, .sp = true},
      {.world = 8, .tp = 2, .pp = 2, .ep = 2, .sp = true},
      {.world = 4, .ep = 2, .etp = 2},
      {.world = 2},  // DP2
      {.world = 4, .tp = 2, .ep = 4},  // DP2 x TP2 with EP across replicas
  };
  std::vector<Case> cases;
  for (Precision p : {Precision::float32, Precision::bfloat16})
    for (const auto& s : specs) cases.push_back({s, p});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(D3, FixtureTopology, ::testing::ValuesIn(fixture_cases()), case_name);

// Uneven pipeline splits need more layers than the fixture's two.
TEST(RandomModelTopology, UnevenPipelineSplits) {
  ModelConfig cfg = ModelConfig::load(ptest::fixture_dir() + "/config.json");
  cfg.num_hidden_layers = 4;
  cfg.mlp_only_layers = {2};  // one dense layer: TP splits its intermediate dim
  for (Precision p : {Precision::float32, Precision::bfloat16}) {
    ModelWeights full = ModelWeights::random(cfg, 7, p);
    auto seqs = ptest::golden_sequences();
    set_num_threads(1);
    Qwen3Moe single(full.clone(), p);
    auto want = score_sequences(single, seqs);
    for (TopoSpec spec : {TopoSpec{.world = 2, .pp = 2, .split = std::vector<int64_t>{1, 3}},
                          TopoSpec{.world = 2, .pp = 2, .split = std::vector<int64_t>{3, 1}},
                          TopoSpec{.world = 4, .tp = 2, .pp = 2, .sp = true, .split = std::vector<int64_t>{1, 3}},
                          TopoSpec{.world = 4, .tp = 4, .sp = true}}) {
      auto got = ptest::score_on_threads(full, p, spec, seqs);
      EXPECT_TRUE(ptest::same_bits(got, want)) << spec.name() << " " << precision_name(p);
    }
  }
}

// Small token budgets: several steps per replica, replicas with different step counts
// (the EP all-to-all spans replicas, so empty steps must keep them in lockstep).
TEST(RandomModelTopology, ManyStepsAndUnevenReplicas) {
  ModelWeights full = ModelWeights::load(ptest::fixture_dir(), Precision::float32);
  auto seqs = ptest::golden_sequences();
  set_num_threads(1);
  Qwen3Moe single(full.clone(), Precision::float32);
  auto want = score_sequences(single, seqs);
  auto got = ptest::score_on_threads(full, Precision::float32, {.world = 4, .ep = 4}, seqs, 40);
  EXPECT_TRUE(ptest::same_bits(got, want));
}

// Under PP the forward is pipelined: the golden sequences (one step's worth of tokens)
// go through the stages in several steps, and the bits stay those of one rank.
TEST(RandomModelTopology, PipelinedScoringCutsStepsWithSameBits) {
  ModelWeights full = ModelWeights::load(ptest::fixture_dir(), Precision::float32);
  const auto seqs = ptest::golden_sequences();
  set_num_threads(1);
  Qwen3Moe single(full.clone(), Precision::float32);
  const auto want = score_sequences(single, seqs);
  std::vector<std::vector<float>> got;
  std::vector<int64_t> steps(2, 0);
  dist::run_threads(2, [&](dist::Communicator& comm) {
    Topology topo = Topology::from_world(2, 1, false, 2, 1, 1);
    topo.validate(full.config, 2);
    const ShardLayout layout =
        ShardLayout::make(full.config, topo, pipeline_layer_split(full.config.num_hidden_layers, 2), comm.rank());
    Qwen3Moe model(comm, layout, slice_local_weights(full, layout), Precision::float32);
    auto r = model.score(seqs);
    steps[comm.rank()] = model.last_score_steps();
    if (comm.rank() == 0) got = std::move(r);
  });
  EXPECT_TRUE(ptest::same_bits(got, want));
  EXPECT_GE(steps[0], 4);  // 5 sequences, 237 tokens: one step without PP
  EXPECT_EQ(steps[0], steps[1]);
}

}  // namespace
}  // namespace lockstep
