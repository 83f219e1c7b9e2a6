// NCCL backend (CUDA builds with LOCKSTEP_NCCL only). NcclLaunch starts one mpirun rank
// per GPU (at most 8; NCCL refuses two ranks on one GPU, so one GPU tests a 1-rank
// communicator) running NcclWorker.* on this binary.
#if defined(LOCKSTEP_CUDA) && defined(LOCKSTEP_NCCL)
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include "dist/cuda/nccl_communicator.h"
#include "dist/mpi_communicator.h"

namespace lockstep {
namespace {

using namespace lockstep::dist;

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

TEST(NcclLaunch, AllPrimitives) {
  if (std::getenv("LOCKSTEP_NCCL_WORKER")) GTEST_SKIP() << "inside a worker";
  const int gpus = gpu_count();
  if (gpus < 1) GTEST_SKIP() << "no CUDA device";
  const int np = std::min(8, gpus);
  namespace fs = std::filesystem;
  const fs::path exe = fs::read_symlink("/proc/self/exe");
  const fs::path log = fs::temp_directory_path() / ("lockstep_nccl_" + std::to_string(getpid()) + ".log");
  std::ostringstream cmd;
  cmd << "timeout 300 mpirun --oversubscribe --allow-run-as-root --bind-to none -np " << np
      << " -x LOCKSTEP_NCCL_WORKER=1 '" << exe.string() << "' --gtest_filter='NcclWorker.*' > '"
      << log.string() << "' 2>&1";
  const int rc = std::system(cmd.str().c_str());
  std::ifstream in(log);
  std::stringstream out;
  out << in.rdbuf();
  fs::remove(log);
  EXPECT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << out.str();
  EXPECT_EQ(out.str().find("[  FAILED  ]"), std::string::npos) << out.str();
  EXPECT_EQ(out.str().find("[  SKIPPED ]"), std::string::npos) << out.str();
}

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, h.size()) * sizeof(T));
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

TEST(NcclWorker, Primitives) {
  if (!std::getenv("LOCKSTEP_NCCL_WORKER") || !MpiRuntime::launched_by_mpirun())
    GTEST_SKIP() << "runs only under mpirun (see NcclLaunch)";
  auto world = world_communicator();
  const int r = world->rank(), t = world->size();
  ASSERT_EQ(cudaSetDevice(r % gpu_count()), cudaSuccess);
  NcclCommunicator c(*world);
  ASSERT_EQ(c.size(), t);
  ASSERT_EQ(c.rank(), r);
  EXPECT_TRUE(c.device_buffers());
  c.barrier();

  // broadcast from every root
  for (int root = 0; root < t; ++root) {
    int* d = to_device(std::vector<int>(33, r == root ? 5 + root : -1));
    c.broadcast_n(d, 33, root);
    c.synchronize();
    EXPECT_EQ(to_host(d, 33), std::vector<int>(33, 5 + root));
    cudaFree(d);
  }

  // all_gather
  std::vector<int> mine(7);
  for (int j = 0; j < 7; ++j) mine[j] = 100 * r + j;
  int* ds = to_device(mine);
  int* dr = to_device(std::vector<int>(7 * t, 0));
  c.all_gather_n(ds, dr, 7);
  c.synchronize();
  auto all = to_host(dr, 7 * t);
  for (int q = 0; q < t; ++q)
    for (int j = 0; j < 7; ++j) EXPECT_EQ(all[q * 7 + j], 100 * q + j);
  cudaFree(ds);
  cudaFree(dr);

  // uneven all_to_all_v: rank i sends i + 2j + 1 bytes of value 16i + j to rank j
  std::vector<size_t> sc(t), rc(t);
  for (int j = 0; j < t; ++j) sc[j] = r + 2 * j + 1;
  for (int i = 0; i < t; ++i) rc[i] = i + 2 * r + 1;
  auto sd = displacements(sc), rd = displacements(rc);
  std::vector<uint8_t> send(sd.back() + sc.back());
  for (int j = 0; j < t; ++j)
    for (size_t b = 0; b < sc[j]; ++b) send[sd[j] + b] = static_cast<uint8_t>(16 * r + j);
  uint8_t* dsend = to_device(send);
  uint8_t* drecv = to_device(std::vector<uint8_t>(rd.back() + rc.back(), 0xff));
  c.all_to_all_v(dsend, sc, sd, drecv, rc, rd);
  c.synchronize();
  auto recv = to_host(drecv, rd.back() + rc.back());
  for (int i = 0; i < t; ++i)
    for (size_t b = 0; b < rc[i]; ++b) EXPECT_EQ(recv[rd[i] + b], static_cast<uint8_t>(16 * i + r));
  cudaFree(dsend);
  cudaFree(drecv);

  // send/recv between pairs (0,1), (2,3), ...: the even rank sends first
  if ((t % 2 == 0)) {
    const int peer = r ^ 1;
    double* out = to_device(std::vector<double>(5, r + 0.25));
    double* in = to_device(std::vector<double>(5, 0));
    if (r % 2 == 0) {
      c.send_n(out, 5, peer, 0);
      c.recv_n(in, 5, peer, 0);
    } else {
      c.recv_n(in, 5, peer, 0);
      c.send_n(out, 5, peer, 0);
    }
    c.synchronize();
    EXPECT_EQ(to_host(in, 5), std::vector<double>(5, peer + 0.25));
    cudaFree(out);
    cudaFree(in);
  }

  // split by parity, ordered by descending rank
  auto sub = c.split(r % 2, -r);
  ASSERT_NE(sub, nullptr);
  int* dme = to_device(std::vector<int>{r});
  int* dmembers = to_device(std::vector<int>(sub->size(), -1));
  sub->all_gather_n(dme, dmembers, 1);
  c.synchronize();
  auto members = to_host(dmembers, sub->size());
  for (int k = 0; k < sub->size(); ++k) {
    int expect_rank = -1, seen = 0;
    for (int q = t - 1; q >= 0; --q)
      if (q % 2 == r % 2 && seen++ == k) expect_rank = q;
    EXPECT_EQ(members[k], expect_rank);
  }
  cudaFree(dme);
  cudaFree(dmembers);
  c.barrier();
}

}  // namespace
}  // namespace lockstep
#endif
