#include "dist/counting_communicator.h"

namespace lockstep::dist {

CountingCommunicator::CountingCommunicator(std::unique_ptr<Communicator> inner)
    : owned_(std::move(inner)), inner_(owned_.get()) {}

CountingCommunicator::CountingCommunicator(Communicator& inner) : inner_(&inner) {}

void CountingCommunicator::broadcast(void* buf, size_t bytes, int root) {
  if (rank() == root && size() > 1) volume_.broadcast += bytes;
  ++volume_.calls;
  inner_->broadcast(buf, bytes, root);
}

void CountingCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  volume_.all_gather += static_cast<uint64_t>(size() - 1) * bytes_per_rank;
  ++volume_.calls;
  inner_->all_gather(send, recv, bytes_per_rank);
}

void CountingCommunicator::all_to_all_v(const void* send, std::span<const size_t> send_counts,
                                        std::span<const size_t> send_displs, void* recv,
                                        std::span<const size_t> recv_counts,
                                        std::span<const size_t> recv_displs) {
  for (size_t q = 0; q < send_counts.size(); ++q)
    if (static_cast<int>(q) != rank()) volume_.all_to_all += send_counts[q];
  ++volume_.calls;
  inner_->all_to_all_v(send, send_counts, send_displs, recv, recv_counts, recv_displs);
}

void CountingCommunicator::send(const void* buf, size_t bytes, int peer, int tag) {
  if (peer != rank()) volume_.send += bytes;
  ++volume_.calls;
  inner_->send(buf, bytes, peer, tag);
}

void CountingCommunicator::send_recv(const void* send_buf, size_t send_bytes, int send_tag, void* recv_buf,
                                     size_t recv_bytes, int recv_tag, int peer) {
  if (peer != rank()) volume_.send += send_bytes;
  inner_->send_recv(send_buf, send_bytes, send_tag, recv_buf, recv_bytes, recv_tag, peer);
}

void CountingCommunicator::recv(void* buf, size_t bytes, int peer, int tag) {
  ++volume_.calls;
  inner_->recv(buf, bytes, peer, tag);
}

}  // namespace lockstep::dist
