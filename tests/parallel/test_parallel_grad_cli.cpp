// `lockstep grad` under mpirun with topology flags writes the single-rank bytes (D4).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "parallel_test_util.h"
#include "shell.h"

namespace lockstep {
namespace {

using ptest::shell;

TEST(ParallelGradCli, MpirunGradWritesSingleRankBytes) {
  ptest::ScratchDir dir("grad_cli");
  {
    std::ofstream in(dir / "in.jsonl");
    for (const auto& s : ptest::golden_sequences())
      if (s.size() >= 2) in << nlohmann::json{{"input_ids", s}}.dump() << "\n";
  }
  const std::string base = " grad --model " + ptest::fixture_dir() + " --input " + (dir / "in.jsonl");
  auto r = shell(ptest::lockstep_bin() + base + " --num-microbatches 2 --output " + (dir / "ref.st"));
  ASSERT_EQ(r.status, 0) << r.output;
  const std::string ref = ptest::read_file(dir / "ref.st");
  ASSERT_FALSE(ref.empty());
  // 8 ranks: TP2 + SP + PP2 + EP2 with two data-parallel replicas (one micro-batch each).
  r = shell(ptest::mpirun(8) + base +
            " --num-microbatches 2 --tensor-model-parallel-size 2 --sequence-parallel "
            "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --output " + (dir / "p8.st"));
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(ptest::read_file(dir / "p8.st") == ref) << "TP2+SP+PP2+EP2 (DP2) grad differs from one rank";
  // A topology that does not fit the model is refused before any work.
  r = shell(ptest::mpirun(2) + base + " --tensor-model-parallel-size 2 --expert-model-parallel-size 3 --output " +
            (dir / "bad.st"));
  EXPECT_NE(r.status, 0);
  EXPECT_FALSE(std::filesystem::exists(dir / "bad.st"));
}

}  // namespace
}  // namespace lockstep
