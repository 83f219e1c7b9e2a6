// A decorator that counts the bytes this rank hands to its peers, per primitive, then
// forwards to the wrapped communicator. Used to measure the volume the collectives
// actually move (bench_comm_volume) and to test that volume.
//
// Counted as the logical payload leaving this rank: all_gather (T-1) x bytes_per_rank,
// all_to_all_v the sum of send_counts to other ranks, send its bytes, broadcast the
// buffer size on the root. Self-copies are not traffic and are not counted.
#pragma once
#include <cstdint>

#include "dist/communicator.h"

namespace lockstep::dist {

struct CommVolume {
  uint64_t all_gather = 0;
  uint64_t all_to_all = 0;
  uint64_t broadcast = 0;
  uint64_t send = 0;
  uint64_t calls = 0;  // collective and point-to-point calls, barrier excluded
  uint64_t total() const { return all_gather + all_to_all + broadcast + send; }
};

class CountingCommunicator final : public Communicator {
 public:
  explicit CountingCommunicator(std::unique_ptr<Communicator> inner);
  // Non-owning: `inner` must outlive this object.
  explicit CountingCommunicator(Communicator& inner);

  const CommVolume& volume() const { return volume_; }
  void reset() { volume_ = {}; }

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend() const override { return inner_->backend(); }
  bool device_buffers() const override { return inner_->device_buffers(); }
  void barrier() override { inner_->barrier(); }
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
  // The child is counted separately (wrap it again to count it).
  std::unique_ptr<Communicator> split(int color, int key) override { return inner_->split(color, key); }

 private:
  std::unique_ptr<Communicator> owned_;
  Communicator* inner_;
  CommVolume volume_;
};

}  // namespace lockstep::dist
