// The rollout engine at a topology: every rank runs the same Engine over a ParallelRunner,
// and the outputs (token ids, log-prob bits, finish reasons) are those of the single-rank
// CPU runner — on threads for TP, SP, PP, EP, ETP, DP and their mix, with chunked prefill,
// and through `mpirun lockstep generate`, byte for byte.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <mutex>
#include <optional>
#include <nlohmann/json.hpp>

#include "parallel/parallel_runner.h"
#include "parallel_test_util.h"
#include "rollout/engine.h"
#include "rollout/replica_split.h"
#include "shell.h"

namespace lockstep {
namespace {

using ptest::TopoSpec;

std::vector<rollout::RequestResult> run_engine(std::unique_ptr<ModelRunner> runner, rollout::EngineOptions options,
                                               const std::vector<rollout::GenerationRequest>& reqs);

// Mixed prompt lengths (1 to 130 tokens), temperature 1, one greedy request, top-k and
// top-p, and (float32) one request whose stop token fires at its third token.
std::vector<rollout::GenerationRequest> mixed_requests() {
  std::vector<rollout::GenerationRequest> reqs;
  const auto seqs = ptest::golden_sequences();
  for (size_t i = 0; i < seqs.size(); ++i) {
    rollout::GenerationRequest q;
    q.prompt = seqs[i];
    q.max_new_tokens = 6 + int64_t(i);
    q.sampling.seed = 1000 + i;
    reqs.push_back(q);
  }
  reqs[1].sampling.temperature = 0.0f;
  reqs[3].sampling.top_k = 20;
  reqs[4].sampling.top_p = 0.9f;
  static const int32_t third_token = [&] {
    set_num_threads(1);
    const Precision p = Precision::float32;
    auto r = run_engine(make_cpu_runner(ModelWeights::load(ptest::fixture_dir(), p), p), {}, {reqs[0]});
    return r.at(0).output_ids.at(2);
  }();
  reqs[0].stop_token_ids = {third_token};
  return reqs;
}

std::vector<rollout::RequestResult> run_engine(std::unique_ptr<ModelRunner> runner, rollout::EngineOptions options,
                                               const std::vector<rollout::GenerationRequest>& reqs) {
  rollout::Engine engine(std::move(runner), options);
  std::vector<rollout::RequestId> ids;
  for (const auto& q : reqs) ids.push_back(engine.add_request(q));
  engine.run_to_completion();
  std::vector<rollout::RequestResult> out;
  for (auto id : ids) out.push_back(engine.take_result(id));
  return out;
}

bool same_results(const std::vector<rollout::RequestResult>& a, const std::vector<rollout::RequestResult>& b,
                  std::string* why) {
  if (a.size() != b.size()) return *why = "result count", false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].output_ids != b[i].output_ids) return *why = "tokens of request " + std::to_string(i), false;
    if (a[i].logprobs.size() != b[i].logprobs.size() ||
        std::memcmp(a[i].logprobs.data(), b[i].logprobs.data(), a[i].logprobs.size() * sizeof(float)) != 0)
      return *why = "log-prob bits of request " + std::to_string(i), false;
    if (a[i].finish_reason != b[i].finish_reason) return *why = "finish reason of request " + std::to_string(i), false;
  }
  return true;
}

ResolvedTopology resolved(const TopoSpec& spec, const ModelConfig& cfg) {
  ResolvedTopology r;
  r.topo = Topology::from_world(spec.world, spec.tp, spec.sp, spec.pp, spec.ep, spec.etp);
  r.topo.validate(cfg, spec.world);
  r.layer_split = pipeline_layer_split(cfg.num_hidden_layers, spec.pp, spec.split);
  return r;
}

// Runs the engine on every rank (threads); checks that all ranks agree and returns rank 0's.
std::vector<rollout::RequestResult> generate_on_threads(const ModelWeights& full, Precision precision,
                                                        const TopoSpec& spec, const rollout::EngineOptions& options,
                                                        const std::vector<rollout::GenerationRequest>& reqs) {
  set_num_threads(1);  // the kernel pool is not reentrant across rank threads
  std::vector<std::vector<rollout::RequestResult>> per_rank(spec.world);
  const ResolvedTopology topo = resolved(spec, full.config);
  dist::run_threads(spec.world, [&](dist::Communicator& comm) {
    per_rank[comm.rank()] = run_engine(make_parallel_runner(comm, topo, full, precision), options, reqs);
  });
  for (int r = 1; r < spec.world; ++r) {
    std::string why;
    EXPECT_TRUE(same_results(per_rank[r], per_rank[0], &why)) << spec.name() << ": rank " << r << " differs: " << why;
  }
  return per_rank[0];
}

struct Case {
  TopoSpec spec;
  Precision precision;
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return info.param.spec.name() + "_" + precision_name(info.param.precision);
}

class GenerateTopology : public ::testing::TestWithParam<Case> {};

TEST_P(GenerateTopology, OutputsEqualSingleRank) {
  const Case& c = GetParam();
  const ModelWeights full = ModelWeights::load(ptest::fixture_dir(), c.precision);
  const auto reqs = mixed_requests();
  // Whole prompts in one step, and chunked prefill mixed with decode.
  rollout::EngineOptions whole, chunked;
  chunked.max_batch_tokens = 40;
  chunked.prefill_chunk = 13;
  chunked.page_size = 8;
  for (const auto& options : {whole, chunked}) {
    set_num_threads(1);
    const auto want = run_engine(make_cpu_runner(full.clone(), c.precision), options, reqs);
    const auto got = generate_on_threads(full, c.precision, c.spec, options, reqs);
    for (const auto& r : want) ASSERT_FALSE(r.output_ids.empty());
    if (c.precision == Precision::float32) {
      EXPECT_EQ(want[0].finish_reason, rollout::FinishReason::stop);
    }
    std::string why;
    EXPECT_TRUE(same_results(got, want, &why)) << c.spec.name() << " prefill_chunk " << options.prefill_chunk << ": "
                                                << why;
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const TopoSpec& s : {TopoSpec{.world = 2, .tp = 2}, TopoSpec{.world = 2, .tp = 2, .sp = true},
                            TopoSpec{.world = 2, .pp = 2}, TopoSpec{.world = 2, .ep = 2},  // DP2 x EP2
                            TopoSpec{.world = 2, .tp = 2, .ep = 2},
                            TopoSpec{.world = 4, .tp = 4, .sp = true},
                            TopoSpec{.world = 4, .ep = 2, .etp = 2},
                            TopoSpec{.world = 8, .tp = 2, .pp = 2, .ep = 2, .sp = true}})
    out.push_back({s, Precision::float32});
  out.push_back({TopoSpec{.world = 4, .tp = 2, .pp = 2, .ep = 2, .sp = true}, Precision::bfloat16});
  return out;
}

INSTANTIATE_TEST_SUITE_P(D5, GenerateTopology, ::testing::ValuesIn(cases()), case_name);

// forward_logprobs (NaN where no target) and a weight swap by load_weights, then
// export_weights gathers the full weights back on every rank.
TEST(ParallelRunner, LogprobsAndWeightsRoundTrip) {
  const Precision p = Precision::float32;
  const ModelWeights full = ModelWeights::load(ptest::fixture_dir(), p);
  const ModelWeights other = ModelWeights::random(full.config, 11, p);
  const auto seq = ptest::golden_sequences()[0];
  std::vector<int32_t> table = {0, 1, 2};
  ForwardBatch batch;
  std::vector<int32_t> targets;
  for (size_t t = 0; t < seq.size(); ++t) {
    batch.tokens.push_back(seq[t]);
    batch.positions.push_back(int32_t(t));
    batch.page_tables.push_back(table.data());
    targets.push_back(t + 1 < seq.size() && t % 3 != 1 ? seq[t + 1] : -1);
  }
  set_num_threads(1);
  auto single = make_cpu_runner(full.clone(), p);
  single->load_weights(other);
  single->allocate_kv(3, 16);
  const std::vector<float> want = single->forward_logprobs(batch, targets);

  const TopoSpec spec{.world = 4, .tp = 2, .pp = 2, .sp = true};
  const ResolvedTopology topo = resolved(spec, full.config);
  std::vector<std::vector<float>> got(spec.world);
  std::vector<int> exported_equal(spec.world, 0);
  dist::run_threads(spec.world, [&](dist::Communicator& comm) {
    auto runner = make_parallel_runner(comm, topo, full, p);
    runner->load_weights(other);
    runner->allocate_kv(3, 16);
    got[comm.rank()] = runner->forward_logprobs(batch, targets);
    const ModelWeights back = runner->export_weights();
    bool equal = true;
    const auto want_named = other.named();
    for (const auto& [name, t] : back.named())
      equal = equal && std::memcmp(t->data<float>(), want_named.at(name)->data<float>(), t->numel() * 4) == 0;
    exported_equal[comm.rank()] = equal;
  });
  for (int r = 0; r < spec.world; ++r) {
    ASSERT_EQ(got[r].size(), want.size());
    for (size_t t = 0; t < want.size(); ++t) {
      if (std::isnan(want[t])) {
        EXPECT_TRUE(std::isnan(got[r][t])) << "rank " << r << " token " << t;
        continue;
      }
      EXPECT_EQ(std::memcmp(&got[r][t], &want[t], 4), 0) << "rank " << r << " token " << t;
    }
    EXPECT_TRUE(exported_equal[r]) << "rank " << r;
  }
}

// Independent DP replicas: each runs only its share of the requests (i % replicas), the
// outcomes are gathered to every rank, and they are the single-rank bits. Where expert
// parallelism spans the replicas they run in lockstep instead (one replica).
TEST(ParallelRunner, IndependentReplicasSplitTheRequests) {
  const Precision p = Precision::float32;
  const ModelWeights full = ModelWeights::load(ptest::fixture_dir(), p);
  const auto reqs = mixed_requests();
  set_num_threads(1);
  const auto want = run_engine(make_cpu_runner(full.clone(), p), {}, reqs);
  std::vector<std::optional<rollout::GenerationRequest>> to_run(reqs.begin(), reqs.end());
  to_run[2].reset();  // a skipped entry has no outcome
  struct SplitCase {
    TopoSpec spec;
    int replicas;
  };
  for (const auto& c : {SplitCase{{.world = 4, .tp = 2}, 2}, SplitCase{{.world = 8, .tp = 2, .pp = 2, .ep = 2, .sp = true}, 2},
                        SplitCase{{.world = 4, .tp = 1}, 4}, SplitCase{{.world = 2, .ep = 2}, 1}}) {
    const ResolvedTopology topo = resolved(c.spec, full.config);
    std::vector<std::vector<rollout::RequestOutcome>> per_rank(c.spec.world);
    std::vector<int> replicas(c.spec.world), ran(c.spec.world);
    dist::run_threads(c.spec.world, [&](dist::Communicator& comm) {
      auto runner = make_parallel_runner(comm, topo, full, p);
      ParallelRunner* pr = runner.get();
      replicas[comm.rank()] = pr->replicas();
      rollout::Engine engine(std::move(runner), {});
      per_rank[comm.rank()] = rollout::run_on_replicas(
          engine, to_run, pr->replicas(), pr->replica(),
          [pr](const std::string& blob) { return pr->gather_from_replicas(blob); });
      ran[comm.rank()] = int(engine.stats().requests);
    });
    for (int r = 0; r < c.spec.world; ++r) {
      EXPECT_EQ(replicas[r], c.replicas) << c.spec.name();
      // Replica d adds the requests i with i % replicas == d (request 2 is skipped).
      int share = 0;
      for (size_t i = 0; i < to_run.size(); ++i)
        share += to_run[i] && int(i) % c.replicas == (c.replicas > 1 ? topo.topo.coords(r).dp : 0);
      EXPECT_EQ(ran[r], share) << c.spec.name() << " rank " << r;
      ASSERT_EQ(per_rank[r].size(), reqs.size());
      for (size_t i = 0; i < reqs.size(); ++i) {
        if (!to_run[i]) continue;
        EXPECT_TRUE(per_rank[r][i].error.empty());
        std::string why;
        EXPECT_TRUE(same_results({per_rank[r][i].result}, {want[i]}, &why))
            << c.spec.name() << " rank " << r << " request " << i << ": " << why;
      }
    }
  }
}

// The command line: mpirun generate at TP2+SP+PP2+EP2 prints the single-rank bytes, and a
// topology that does not fit the model is refused before any work.
TEST(ParallelGenerateCli, MpirunMatchesSingleRankBytes) {
  ptest::ScratchDir dir("generate");
  {
    std::ofstream in(dir / "in.jsonl");
    const auto seqs = ptest::golden_sequences();
    for (size_t i = 0; i < seqs.size(); ++i)
      in << nlohmann::json{{"input_ids", seqs[i]}, {"max_new_tokens", 4 + i}}.dump() << "\n";
  }
  const std::string args = " generate --model " + ptest::fixture_dir() + " --input " + (dir / "in.jsonl") +
                           " --max-new-tokens 8 --seed 5 --prefill-chunk 24 --max-batch-tokens 64";
  auto ref = ptest::shell(ptest::lockstep_bin() + args + " --output " + (dir / "ref.jsonl"));
  ASSERT_EQ(ref.status, 0) << ref.output;
  auto par = ptest::shell(ptest::mpirun(4) + args + " --output " + (dir / "par.jsonl") +
                          " --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2"
                          " --expert-model-parallel-size 2");
  ASSERT_EQ(par.status, 0) << par.output;
  const std::string want = ptest::read_file(dir / "ref.jsonl");
  EXPECT_FALSE(want.empty());
  EXPECT_EQ(ptest::read_file(dir / "par.jsonl"), want);

  // Independent DP replicas (TP2 x DP2: the expert groups stay inside a replica) split the
  // requests between them and still print the single-rank bytes.
  auto split = ptest::shell(ptest::mpirun(4) + args + " --output " + (dir / "split.jsonl") +
                            " --tensor-model-parallel-size 2");
  ASSERT_EQ(split.status, 0) << split.output;
  EXPECT_EQ(ptest::read_file(dir / "split.jsonl"), want);

  // TP 3 is not a canonical split: refused before any work, and no output written.
  auto bad = ptest::shell(ptest::lockstep_bin() + args + " --output " + (dir / "bad.jsonl") +
                          " --tensor-model-parallel-size 3");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("tensor"), std::string::npos) << bad.output;
  EXPECT_FALSE(std::filesystem::exists(dir / "bad.jsonl"));
}

}  // namespace
}  // namespace lockstep
