// The NCCL backend (device buffers). Compiled only in CUDA builds that define
// LOCKSTEP_NCCL (the build links libnccl; see the dist section of the README/report).
//
// Stream semantics: every call enqueues its work on stream() and returns; later work on
// the same stream sees the result, the host must synchronize() before reading. barrier()
// synchronizes. NCCL has no tags: send/recv between one pair match in issue order and the
// tag is ignored; a rank's sends and recvs that depend on each other (e.g. a ring) must
// be issued inside one group (use all_to_all_v) or in an order that cannot deadlock.
#pragma once
#if defined(LOCKSTEP_CUDA) && defined(LOCKSTEP_NCCL)
#include <cuda_runtime_api.h>

#include "dist/communicator.h"

struct ncclComm;

namespace lockstep::dist {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap` (e.g. the MPI world or one of its groups): rank 0 makes
  // the ncclUniqueId and broadcasts it over bootstrap; this rank joins with its bootstrap
  // rank on the current CUDA device. stream == nullptr: a new non-blocking stream owned
  // by this communicator.
  explicit NcclCommunicator(Communicator& bootstrap, cudaStream_t stream = nullptr);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }
  bool device_buffers() const override { return true; }
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
  // ncclCommSplit; the child shares this communicator's stream.
  std::unique_ptr<Communicator> split(int color, int key) override;

  cudaStream_t stream() const { return stream_; }
  void synchronize();

 private:
  NcclCommunicator(ncclComm* comm, cudaStream_t stream);
  ncclComm* comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  int rank_ = 0;
  int size_ = 1;
  int* barrier_word_ = nullptr;  // device scratch for barrier()
};

}  // namespace lockstep::dist
#endif
