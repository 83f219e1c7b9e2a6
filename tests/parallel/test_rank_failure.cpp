// A failure on one MPI rank ends the whole job with that rank's message (the other ranks
// used to wait in a collective forever), and ranks started with different flags are refused.
// Every mpirun here is bounded by `timeout`: a hang fails the test instead of CI.
#include <gtest/gtest.h>

#include <fstream>

#include "shell.h"

namespace lockstep {
namespace {

using ptest::shell;

const std::string kModel = std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe";
const std::string kMpirun = "timeout 60 mpirun --oversubscribe --allow-run-as-root -x LOCKSTEP_NUM_THREADS=1 ";

TEST(RankFailure, ARankThatFailsAloneEndsTheJobWithItsMessage) {
  ptest::ScratchDir dir("rank_failure");
  const std::string base = dir.path.string();
  std::filesystem::create_directories(base + "/r0");
  std::filesystem::create_directories(base + "/r1");
  std::ofstream(base + "/r0/in.jsonl") << "{\"input_ids\": [1, 2, 3]}\n";
  std::ofstream(base + "/r1/in.jsonl") << "{\"input_ids\": [1, 2, 99999]}\n";  // only rank 1 reads this
  // The same command line on both ranks, each in its own directory.
  for (const char* command : {"score", "grad --output g.safetensors"}) {
    const auto r =
        shell(kMpirun + "-np 2 sh -c 'cd " + base + "/r$OMPI_COMM_WORLD_RANK && exec " + ptest::lockstep_bin() + " " +
              command + " --model " + kModel + " --input in.jsonl --tensor-model-parallel-size 2'");
    EXPECT_NE(r.status, 0) << r.output;
    EXPECT_NE(r.status, 124) << "the job hung:\n" << r.output;
    EXPECT_NE(r.output.find("lockstep: rank 1 of 2: error: in.jsonl:1: input_ids[2] = 99999 is out of range"),
              std::string::npos)
        << r.output;
  }
}

TEST(RankFailure, RanksStartedWithDifferentFlagsAreRefused) {
  const std::string score = ptest::lockstep_bin() + " score --model " + kModel + " --input /dev/null";
  const auto r = shell(kMpirun + "-np 1 " + score + " : -np 1 " + score + " --dtype bfloat16");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.status, 124) << "the job hung:\n" << r.output;
  EXPECT_NE(r.output.find("rank 1 of 2: error: this rank was started with another command line than rank 0"),
            std::string::npos)
      << r.output;
}

}  // namespace
}  // namespace lockstep
