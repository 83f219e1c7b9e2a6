// The communicator: the few byte-moving primitives every parallel form is built from
// (docs/parallel.md). It never adds numbers: reductions are done by the deterministic
// collectives (dist/deterministic_collectives.h) so every topology sums in the same tree.
//
// Backends: MpiCommunicator (host pointers), NcclCommunicator (device pointers, CUDA
// builds with NCCL), SelfCommunicator (one rank, no MPI), ThreadCommunicator (ranks as
// threads of one process, for tests and tools). All calls are collective over the
// communicator unless noted, and every rank must issue them in the same order.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace lockstep::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "mpi", "nccl", "self", "thread"; decorators forward their inner backend's name.
  virtual std::string backend() const = 0;
  // True when buffers passed to this communicator live in device memory (NCCL).
  virtual bool device_buffers() const { return false; }

  virtual void barrier() = 0;
  // root's `bytes` bytes at buf are copied to buf on every rank.
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  // recv[r * bytes_per_rank ...] = rank r's send; recv holds size() * bytes_per_rank bytes.
  // send may not alias recv.
  virtual void all_gather(const void* send, void* recv, size_t bytes_per_rank) = 0;
  // Rank i sends send[send_displs[j] .. + send_counts[j]) to rank j, which stores it at
  // recv[recv_displs[i] .. + recv_counts[i]). All counts and displacements are in bytes and
  // have size() entries; recv_counts[i] on rank j must equal send_counts[j] on rank i.
  virtual void all_to_all_v(const void* send, std::span<const size_t> send_counts,
                            std::span<const size_t> send_displs, void* recv,
                            std::span<const size_t> recv_counts,
                            std::span<const size_t> recv_displs) = 0;
  // Point to point (not collective). A send matches the recv with the same peer and tag;
  // messages between one pair with one tag arrive in order. Blocking.
  virtual void send(const void* buf, size_t bytes, int peer, int tag) = 0;
  virtual void recv(void* buf, size_t bytes, int peer, int tag) = 0;
  // Sends `send_buf` to `peer` and receives `recv_buf` from the same peer at once (not
  // collective): what a pipeline stage does when it passes activations on and takes
  // gradients back; a blocking send then a blocking recv on both sides could deadlock.
  // The default is send then recv, valid where send is buffered (self, thread).
  virtual void send_recv(const void* send_buf, size_t send_bytes, int send_tag, void* recv_buf, size_t recv_bytes,
                         int recv_tag, int peer);
  // Like MPI_Comm_split: ranks with the same color form a new communicator, ordered by
  // (key, old rank). Collective over this communicator. color < 0 means "no group": the
  // caller gets nullptr.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // Typed helpers (counts in elements).
  template <typename T>
  void broadcast_n(T* buf, size_t n, int root) { broadcast(buf, n * sizeof(T), root); }
  template <typename T>
  void all_gather_n(const T* send, T* recv, size_t n_per_rank) {
    all_gather(send, recv, n_per_rank * sizeof(T));
  }
  template <typename T>
  void send_n(const T* buf, size_t n, int peer, int tag) { send(buf, n * sizeof(T), peer, tag); }
  template <typename T>
  void recv_n(T* buf, size_t n, int peer, int tag) { recv(buf, n * sizeof(T), peer, tag); }
  // Equal-sized all-to-all: block j of send (bytes_per_peer bytes) goes to rank j, and
  // block i of recv comes from rank i.
  void all_to_all(const void* send, void* recv, size_t bytes_per_peer);
};

// One rank, no MPI: a plain `lockstep score` runs on this. Collectives are copies.
class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "self"; }
  void barrier() override {}
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
  std::vector<std::vector<uint8_t>> pending_;  // self-sends waiting for their recv
  std::vector<int> pending_tags_;
};

// Byte offsets (exclusive prefix sums) of a list of byte counts.
std::vector<size_t> displacements(std::span<const size_t> counts);

}  // namespace lockstep::dist
