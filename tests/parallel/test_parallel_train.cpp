// `lockstep train` at a topology (docs/numerics.md, D4): metrics bitwise equal to one rank, the
// true-on-policy check exact at every step, and resume at another topology bit for bit.
#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/thread_pool.h"
#include "dist/thread_communicator.h"
#include "rl/train_config.h"
#include "rl/trainer.h"
#include "shell.h"

namespace lockstep {
namespace {

using ptest::mpirun;
using ptest::ScratchDir;
using ptest::shell;

// Short runs with a non-zero gradient on every RL step (entropy bonus, KL to the reference)
// even when no answer is rewarded yet.
std::string train_args(int64_t steps) {
  return " train --num-rollout " + std::to_string(steps) +
         " --sft-warmup-steps 2 --rollout-batch-size 4 --n-samples-per-prompt 4 --global-batch-size 16"
         " --num-microbatches 4 --entropy-coef 0.01 --kl-loss-coef 0.1 --progress=false";
}

// metrics.jsonl without perf/* (timings), one compact line per record.
std::vector<std::string> metrics_without_perf(const std::string& dir) {
  std::istringstream in(ptest::read_file(dir + "/metrics.jsonl"));
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line), kept = nlohmann::json::object();
    for (auto& [k, v] : j.items())
      if (k.rfind("perf/", 0) != 0) kept[k] = v;
    out.push_back(kept.dump());
  }
  return out;
}

void expect_exact_on_policy(const std::string& dir, int64_t steps) {
  std::istringstream in(ptest::read_file(dir + "/metrics.jsonl"));
  std::string line;
  int64_t seen = 0;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (!j.contains("step")) continue;
    ++seen;
    EXPECT_EQ(j["train/train_rollout_logprob_abs_diff"].get<double>(), 0.0) << line;
    EXPECT_NE(j["train/grad_norm"].get<double>(), 0.0) << line;  // the step trained something
  }
  EXPECT_EQ(seen, steps);
}

TEST(ParallelTrain, Tp2SpPp2Ep2On8RanksEqualsOneRank) {
  ScratchDir dir("train8");
  const std::string one = (dir.path / "one").string(), eight = (dir.path / "eight").string();
  auto r = shell(ptest::lockstep_bin() + train_args(3) + " --num-threads 1 --output-dir " + one);
  ASSERT_EQ(r.status, 0) << r.output;
  r = shell(mpirun(8) + train_args(3) +
            " --tensor-model-parallel-size 2 --sequence-parallel --pipeline-model-parallel-size 2"
            " --expert-model-parallel-size 2 --output-dir " +
            eight);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto a = metrics_without_perf(one), b = metrics_without_perf(eight);
  ASSERT_EQ(a.size(), 5u);  // 2 SFT + 3 RL records
  EXPECT_EQ(a, b);
  expect_exact_on_policy(eight, 3);
}

// The rollout engine at its own topology (docs/parallel.md): trainer TP2+PP2+EP2, engine
// EP4 on the same 8 ranks, weights streamed in small buckets and resharded; the metrics equal
// one rank's and the trainer's log-probs equal the engine's at every step.
TEST(ParallelTrain, Tp2Pp2Ep2TrainerWithEp4EngineOn8RanksEqualsOneRank) {
  ScratchDir dir("train8_ep4_engine");
  const std::string one = (dir.path / "one").string(), eight = (dir.path / "eight").string();
  auto r = shell(ptest::lockstep_bin() + train_args(3) + " --num-threads 1 --output-dir " + one);
  ASSERT_EQ(r.status, 0) << r.output;
  r = shell(mpirun(8) + train_args(3) +
            " --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2"
            " --rollout-expert-model-parallel-size 4 --weight-sync-bucket-mb 0.05 --output-dir " +
            eight);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto a = metrics_without_perf(one), b = metrics_without_perf(eight);
  ASSERT_EQ(a.size(), 5u);
  EXPECT_EQ(a, b);
  expect_exact_on_policy(eight, 3);
}

// An engine whose DP replicas are independent (TP2 x DP2 on 4 ranks) splits each step's
// rollouts between its replicas; the trainer (PP2 x TP2) still sees the single-rank samples.
TEST(ParallelTrain, EngineReplicasSplitTheRolloutsAndEqualOneRank) {
  ScratchDir dir("train4_engine_replicas");
  const std::string one = (dir.path / "one").string(), four = (dir.path / "four").string();
  auto r = shell(ptest::lockstep_bin() + train_args(3) + " --num-threads 1 --output-dir " + one);
  ASSERT_EQ(r.status, 0) << r.output;
  r = shell(mpirun(4) + train_args(3) +
            " --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --rollout-tensor-model-parallel-size 2"
            " --output-dir " +
            four);
  ASSERT_EQ(r.status, 0) << r.output;
  const auto a = metrics_without_perf(one), b = metrics_without_perf(four);
  ASSERT_EQ(a.size(), 5u);
  EXPECT_EQ(a, b);
  expect_exact_on_policy(four, 3);
}

// --audit-weight-sync with the engine at another topology than the trainer (ranks as
// threads): trainer EP2, engine TP2 (every sync's streamed trainer fingerprints against the
// engine's gathered weights), and trainer TP2 with a single-rank engine on every rank.
TEST(ParallelTrain, AuditWeightSyncAtAnEngineTopologyOtherThanTheTrainers) {
  ScratchDir dir("train_audit_engine");
  set_num_threads(1);
  rl::TrainConfig c;
  for (auto [k, v] : {std::pair{"num-rollout", "2"}, {"sft-warmup-steps", "2"}, {"rollout-batch-size", "4"},
                      {"n-samples-per-prompt", "4"}, {"global-batch-size", "16"}, {"num-microbatches", "4"},
                      {"entropy-coef", "0.01"}, {"progress", "false"}, {"audit-weight-sync", "true"},
                      {"weight-sync-bucket-mb", "0.01"}})
    rl::apply_flag(c, k, v);
  c.output_dir = (dir.path / "one").string();
  rl::run_training(c);
  rl::TrainConfig p = c;
  p.output_dir = (dir.path / "ep2_tp2").string();
  p.expert_model_parallel_size = 2;
  p.rollout_tensor_model_parallel_size = 2;
  dist::run_threads(2, [&](dist::Communicator& comm) { rl::run_training(p, &comm); });
  EXPECT_EQ(metrics_without_perf(c.output_dir), metrics_without_perf(p.output_dir));
  expect_exact_on_policy(p.output_dir, 2);
  rl::TrainConfig q = c;
  q.output_dir = (dir.path / "tp2_single").string();
  q.tensor_model_parallel_size = 2;
  dist::run_threads(2, [&](dist::Communicator& comm) { rl::run_training(q, &comm); });
  EXPECT_EQ(metrics_without_perf(c.output_dir), metrics_without_perf(q.output_dir));
}

TEST(ParallelTrain, RefusesABadRolloutTopologyBeforeAnyWorkNamingTheRolloutKey) {
  ScratchDir dir("train_bad_rollout");
  const std::string out = (dir.path / "o").string();
  auto r = shell(mpirun(2) + train_args(1) + " --rollout-expert-model-parallel-size 3 --output-dir " + out);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("rollout-expert-model-parallel-size"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(out + "/metrics.jsonl"));
  rl::TrainConfig c;
  c.rollout_tensor_model_parallel_size = 2;
  try {
    rl::run_training(c);  // no ranks
    ADD_FAILURE() << "a rollout topology without ranks was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--rollout-"), std::string::npos) << e.what();
  }
}

// A checkpoint written by one topology continues under another: the final checkpoint and
// the metrics equal an uninterrupted single-rank run's.
TEST(ParallelTrain, ResumeAtAnotherTopologyContinuesBitForBit) {
  ScratchDir dir("train_resume");
  const std::string base = dir.path.string();
  const std::string dtype = " --dtype bfloat16";
  auto r = shell(ptest::lockstep_bin() + train_args(4) + dtype + " --num-threads 1 --output-dir " + base +
                 "/u --save " + base + "/ck_u");
  ASSERT_EQ(r.status, 0) << r.output;
  r = shell(mpirun(2) + train_args(4) + dtype + " --tensor-model-parallel-size 2 --debug-stop-after 2 --output-dir " +
            base + "/v --save " + base + "/ck_v");
  ASSERT_EQ(r.status, 0) << r.output;
  r = shell(mpirun(4) + train_args(4) + dtype +
            " --pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --tensor-model-parallel-size 2"
            " --resume --output-dir " +
            base + "/v --save " + base + "/ck_v");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_EQ(metrics_without_perf(base + "/u"), metrics_without_perf(base + "/v"));
  expect_exact_on_policy(base + "/v", 4);
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "ref_model.safetensors", "trainer_state.json",
                        "train_config.toml"}) {
    const std::string a = ptest::read_file(base + "/ck_u/iter_0000004/" + f);
    EXPECT_FALSE(a.empty()) << f;
    EXPECT_TRUE(a == ptest::read_file(base + "/ck_v/iter_0000004/" + f)) << f << " differs";
  }
}

// Ranks as threads: EP2 (2 ranks, DP2 of the dense part) in-process, against one rank.
TEST(ParallelTrain, Ep2OnThreadsEqualsOneRank) {
  ScratchDir dir("train_threads");
  set_num_threads(1);
  rl::TrainConfig c;
  for (auto [k, v] : {std::pair{"num-rollout", "2"}, {"sft-warmup-steps", "2"}, {"rollout-batch-size", "4"},
                      {"n-samples-per-prompt", "4"}, {"global-batch-size", "16"}, {"num-microbatches", "4"},
                      {"entropy-coef", "0.01"}, {"progress", "false"}})
    rl::apply_flag(c, k, v);
  c.output_dir = (dir.path / "one").string();
  rl::run_training(c);
  rl::TrainConfig p = c;
  p.output_dir = (dir.path / "ep2").string();
  p.expert_model_parallel_size = 2;
  dist::run_threads(2, [&](dist::Communicator& comm) { rl::run_training(p, &comm); });
  EXPECT_EQ(metrics_without_perf(c.output_dir), metrics_without_perf(p.output_dir));
  expect_exact_on_policy(p.output_dir, 2);
}

TEST(ParallelTrain, RefusesABadTopologyBeforeAnyWork) {
  ScratchDir dir("train_bad");
  const std::string out = (dir.path / "o").string();
  auto r = shell(mpirun(2) + train_args(1) + " --tensor-model-parallel-size 3 --output-dir " + out);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("tensor"), std::string::npos) << r.output;
  EXPECT_FALSE(std::filesystem::exists(out + "/metrics.jsonl"));
  rl::TrainConfig c;
  c.tensor_model_parallel_size = 2;
  EXPECT_THROW(rl::run_training(c), Error);  // no ranks: the flags need mpirun
}

}  // namespace
}  // namespace lockstep
