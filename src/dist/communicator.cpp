#include "dist/communicator.h"

#include <cstring>

#include "core/error.h"

namespace lockstep::dist {

void Communicator::all_to_all(const void* send, void* recv, size_t bytes_per_peer) {
  std::vector<size_t> counts(size(), bytes_per_peer);
  std::vector<size_t> displs = displacements(counts);
  all_to_all_v(send, counts, displs, recv, counts, displs);
}

std::vector<size_t> displacements(std::span<const size_t> counts) {
  std::vector<size_t> d(counts.size());
  size_t off = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    d[i] = off;
    off += counts[i];
  }
  return d;
}

void SelfCommunicator::broadcast(void*, size_t, int root) {
  LS_CHECK(root == 0, "broadcast: root ", root, " out of range for a 1-rank communicator");
}

void SelfCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  if (bytes_per_rank) std::memcpy(recv, send, bytes_per_rank);
}

void SelfCommunicator::all_to_all_v(const void* send, std::span<const size_t> send_counts,
                                    std::span<const size_t> send_displs, void* recv,
                                    std::span<const size_t> recv_counts,
                                    std::span<const size_t> recv_displs) {
  LS_CHECK(send_counts.size() == 1 && send_displs.size() == 1 && recv_counts.size() == 1 &&
               recv_displs.size() == 1,
           "all_to_all_v: count/displacement lists need 1 entry on a 1-rank communicator");
  LS_CHECK(send_counts[0] == recv_counts[0], "all_to_all_v: rank 0 sends ", send_counts[0],
           " bytes to itself but expects ", recv_counts[0]);
  if (send_counts[0])
    std::memcpy(static_cast<uint8_t*>(recv) + recv_displs[0],
                static_cast<const uint8_t*>(send) + send_displs[0], send_counts[0]);
}

void SelfCommunicator::send(const void* buf, size_t bytes, int peer, int tag) {
  LS_CHECK(peer == 0, "send: peer ", peer, " out of range for a 1-rank communicator");
  const auto* p = static_cast<const uint8_t*>(buf);
  pending_.emplace_back(p, p + bytes);
  pending_tags_.push_back(tag);
}

void SelfCommunicator::recv(void* buf, size_t bytes, int peer, int tag) {
  LS_CHECK(peer == 0, "recv: peer ", peer, " out of range for a 1-rank communicator");
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (pending_tags_[i] != tag) continue;
    LS_CHECK(pending_[i].size() == bytes, "recv: expected ", bytes, " bytes with tag ", tag,
             ", the matching send has ", pending_[i].size());
    if (bytes) std::memcpy(buf, pending_[i].data(), bytes);
    pending_.erase(pending_.begin() + i);
    pending_tags_.erase(pending_tags_.begin() + i);
    return;
  }
  fail("recv: no pending self-send with tag ", tag, " (a 1-rank recv would block forever)");
}

void Communicator::send_recv(const void* send_buf, size_t send_bytes, int send_tag, void* recv_buf,
                             size_t recv_bytes, int recv_tag, int peer) {
  send(send_buf, send_bytes, peer, send_tag);
  recv(recv_buf, recv_bytes, peer, recv_tag);
}

std::unique_ptr<Communicator> SelfCommunicator::split(int color, int) {
  if (color < 0) return nullptr;
  return std::make_unique<SelfCommunicator>();
}

}  // namespace lockstep::dist
