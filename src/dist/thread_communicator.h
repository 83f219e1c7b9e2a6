// Ranks as threads of one process: the same collectives as MPI, by memcpy between
// threads. For tests of parallel code without mpirun, and for tools that model a
// topology in one process (e.g. bench_comm_volume). Host buffers only.
#pragma once
#include <functional>
#include <memory>

#include "dist/communicator.h"

namespace lockstep::dist {

struct ThreadGroupState;  // shared by the ranks of one thread communicator

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<ThreadGroupState> state, int rank);
  ~ThreadCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override;
  std::string backend() const override { return "thread"; }
  void barrier() override;
  void broadcast(void* buf, size_t bytes, int root) override;
  void all_gather(const void* send, void* recv, size_t bytes_per_rank) override;
  void all_to_all_v(const void* send, std::span<const size_t> send_counts,
                    std::span<const size_t> send_displs, void* recv,
                    std::span<const size_t> recv_counts,
                    std::span<const size_t> recv_displs) override;
  void send(const void* buf, size_t bytes, int peer, int tag) override;
  void recv(void* buf, size_t bytes, int peer, int tag) override;
  std::unique_ptr<Communicator> split(int color, int key) override;

 private:
  std::shared_ptr<ThreadGroupState> state_;
  int rank_;
};

// Runs fn(comm) on `size` threads, each with its rank's communicator, and joins them.
// If a rank throws, the others are woken (their pending collective throws) and the first
// rank's exception is rethrown here.
void run_threads(int size, const std::function<void(Communicator&)>& fn);

}  // namespace lockstep::dist
