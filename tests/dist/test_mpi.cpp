// Multi-rank tests. MpiLaunch.* (run by ctest) starts `mpirun -np N` on this same binary
// with LOCKSTEP_MPI_WORKER=1 and --gtest_filter=MpiWorker.*; the MpiWorker.* tests skip
// unless that variable is set. One launch per N runs every check, to keep startup cheap.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "dist/mpi_communicator.h"
#include "dist_checks.h"

namespace lockstep {
namespace {

using namespace lockstep::dist;

// ---- launcher ---------------------------------------------------------------------------

std::string run_workers(int np, int& exit_code) {
  namespace fs = std::filesystem;
  const fs::path exe = fs::read_symlink("/proc/self/exe");
  const fs::path log = fs::temp_directory_path() /
                       ("lockstep_dist_np" + std::to_string(np) + "_" + std::to_string(getpid()) + ".log");
  std::ostringstream cmd;
  cmd << "timeout 120 mpirun --oversubscribe --allow-run-as-root --bind-to none -np " << np
      << " -x LOCKSTEP_MPI_WORKER=1 '" << exe.string() << "' --gtest_filter='MpiWorker.*' > '"
      << log.string() << "' 2>&1";
  const int rc = std::system(cmd.str().c_str());
  exit_code = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  std::ifstream in(log);
  std::stringstream ss;
  ss << in.rdbuf();
  fs::remove(log);
  return ss.str();
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
  return n;
}

void launch(int np) {
  if (std::getenv("LOCKSTEP_MPI_WORKER")) GTEST_SKIP() << "inside a worker";
  if (std::system("command -v mpirun > /dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun not found";
  int rc = 0;
  const std::string out = run_workers(np, rc);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(count(out, "[  PASSED  ]"), static_cast<size_t>(np)) << out;
  EXPECT_EQ(count(out, "[  FAILED  ]"), 0u) << out;
  EXPECT_EQ(count(out, "[  SKIPPED ]"), 0u) << out;
}

TEST(MpiLaunch, Ranks2) { launch(2); }
TEST(MpiLaunch, Ranks4) { launch(4); }
TEST(MpiLaunch, Ranks8) { launch(8); }

// ---- worker -----------------------------------------------------------------------------

#define WORKER_ONLY()                                                                   \
  do {                                                                                  \
    if (!std::getenv("LOCKSTEP_MPI_WORKER") || !MpiRuntime::launched_by_mpirun())       \
      GTEST_SKIP() << "runs only under mpirun (see MpiLaunch)";                         \
  } while (0)

TEST(MpiWorker, Primitives) {
  WORKER_ONLY();
  auto comm = world_communicator();
  ASSERT_EQ(comm->backend(), "mpi");
  ASSERT_EQ(comm->size(), MpiRuntime::instance().world_size());
  test::check_primitives(*comm);
}

TEST(MpiWorker, CanonicalCollectives) {
  WORKER_ONLY();
  auto comm = world_communicator();
  test::check_canonical(*comm);
}

TEST(MpiWorker, TopologyGroups) {
  WORKER_ONLY();
  auto comm = world_communicator();
  test::check_topology_groups(*comm);
}

}  // namespace
}  // namespace lockstep
