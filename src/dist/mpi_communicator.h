// The MPI backend (OpenMPI; host buffers) and the process-wide MPI runtime.
//
// MPI is initialised only when the process was started by a launcher (mpirun/srun set
// OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK), so a plain `lockstep score` never needs
// mpirun: it gets a SelfCommunicator with world size 1.
#pragma once
#include <memory>
#include <string>

#include "dist/communicator.h"

namespace lockstep::dist {

// The only global state of the project: MPI_Init_thread on first use, MPI_Finalize at
// process exit (unless someone else initialised MPI).
class MpiRuntime {
 public:
  static MpiRuntime& instance();

  // True when started under a launcher (and so MPI has been initialised).
  bool active() const { return active_; }
  // The thread level MPI granted (MPI_THREAD_*), or -1 when not active.
  int thread_level() const { return thread_level_; }
  // A new communicator over all processes: MpiCommunicator when active, else
  // SelfCommunicator. Each call returns an independent communicator (MPI_Comm_dup).
  std::unique_ptr<Communicator> world();
  int world_size() const { return world_size_; }
  int world_rank() const { return world_rank_; }

  // Whether the environment says a launcher started us.
  static bool launched_by_mpirun();

  // When this process is one rank of several: prints "lockstep: rank R of N: <message>" and
  // ends the whole job (MPI_Abort), so no other rank waits forever on a failed one. Returns
  // only when the process is alone (or MPI is not running).
  static void abort_job_if_parallel(const std::string& message, int exit_code);

  // Under a launcher: throws on every rank whose `command_line` differs from rank 0's, so
  // ranks started with different flags are refused before any work.
  void check_ranks_agree(const std::string& command_line);

  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

 private:
  MpiRuntime();
  ~MpiRuntime();
  bool active_ = false;
  bool owns_init_ = false;
  int thread_level_ = -1;
  int world_size_ = 1;
  int world_rank_ = 0;
};

// Convenience: MpiRuntime::instance().world().
std::unique_ptr<Communicator> world_communicator();

// Holds an MPI_Comm; defined in dist/mpi_handle.h so users of this header need no mpi.h.
struct MpiHandle;

// An MPI communicator. Owns (frees) the MPI_Comm it is given.
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(std::unique_ptr<MpiHandle> comm);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  void barrier() override;
  void broadcast(void* buf, size_t bytes, int root) override;
  void all_gather(const void* send, void* recv, size_t bytes_per_rank) override;
  void all_to_all_v(const void* send, std::span<const size_t> send_counts,
                    std::span<const size_t> send_displs, void* recv,
                    std::span<const size_t> recv_counts,
                    std::span<const size_t> recv_displs) override;
  void send(const void* buf, size_t bytes, int peer, int tag) override;
  void recv(void* buf, size_t bytes, int peer, int tag) override;
  void send_recv(const void* send_buf, size_t send_bytes, int send_tag, void* recv_buf, size_t recv_bytes,
                 int recv_tag, int peer) override;
  std::unique_ptr<Communicator> split(int color, int key) override;

  // The MPI_Comm, e.g. to bootstrap NCCL on the same ranks.
  const MpiHandle& handle() const { return *comm_; }

 private:
  std::unique_ptr<MpiHandle> comm_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace lockstep::dist
