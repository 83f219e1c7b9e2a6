#include "dist/cuda/nccl_communicator.h"
#if defined(LOCKSTEP_CUDA) && defined(LOCKSTEP_NCCL)
#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>

#include "core/error.h"

namespace lockstep::dist {
namespace {

void nccl_check(ncclResult_t rc, const char* what) {
  if (rc == ncclSuccess || rc == ncclInProgress) return;
  fail(what, " failed: ", ncclGetErrorString(rc), " (", ncclGetLastError(nullptr), ")");
}

void cuda_check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) fail(what, " failed: ", cudaGetErrorString(rc));
}

}  // namespace

NcclCommunicator::NcclCommunicator(Communicator& bootstrap, cudaStream_t stream)
    : stream_(stream), rank_(bootstrap.rank()), size_(bootstrap.size()) {
  LS_CHECK(!bootstrap.device_buffers(), "NcclCommunicator: bootstrap must take host buffers");
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank_ == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
  bootstrap.broadcast(&id, sizeof(id), 0);
  nccl_check(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
  if (!stream_) {
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    owns_stream_ = true;
  }
  cuda_check(cudaMalloc(&barrier_word_, sizeof(int)), "cudaMalloc");
}

NcclCommunicator::NcclCommunicator(ncclComm* comm, cudaStream_t stream) : comm_(comm), stream_(stream) {
  nccl_check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
  nccl_check(ncclCommCount(comm_, &size_), "ncclCommCount");
  cuda_check(cudaMalloc(&barrier_word_, sizeof(int)), "cudaMalloc");
}

NcclCommunicator::~NcclCommunicator() {
  if (stream_) cudaStreamSynchronize(stream_);
  if (comm_) ncclCommDestroy(comm_);
  if (barrier_word_) cudaFree(barrier_word_);
  if (owns_stream_) cudaStreamDestroy(stream_);
}

void NcclCommunicator::synchronize() { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

void NcclCommunicator::barrier() {
  // NCCL has no barrier: a one-word all-reduce, then wait for it.
  nccl_check(ncclAllReduce(barrier_word_, barrier_word_, 1, ncclInt32, ncclSum, comm_, stream_),
             "ncclAllReduce(barrier)");
  synchronize();
}

void NcclCommunicator::broadcast(void* buf, size_t bytes, int root) {
  LS_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " out of range [0, ", size_, ")");
  nccl_check(ncclBroadcast(buf, buf, bytes, ncclInt8, root, comm_, stream_), "ncclBroadcast");
}

void NcclCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  nccl_check(ncclAllGather(send, recv, bytes_per_rank, ncclInt8, comm_, stream_), "ncclAllGather");
}

void NcclCommunicator::all_to_all_v(const void* send, std::span<const size_t> send_counts,
                                    std::span<const size_t> send_displs, void* recv,
                                    std::span<const size_t> recv_counts,
                                    std::span<const size_t> recv_displs) {
  const size_t p = static_cast<size_t>(size_);
  LS_CHECK(send_counts.size() == p && send_displs.size() == p && recv_counts.size() == p &&
               recv_displs.size() == p,
           "all_to_all_v: count/displacement lists need ", p, " entries (one per rank)");
  LS_CHECK(send_counts[rank_] == recv_counts[rank_], "all_to_all_v: rank ", rank_, " sends ",
           send_counts[rank_], " bytes to itself but expects ", recv_counts[rank_]);
  const auto* s = static_cast<const uint8_t*>(send);
  auto* r = static_cast<uint8_t*>(recv);
  // The block to self is a device copy; the rest are grouped point-to-point calls.
  if (send_counts[rank_])
    cuda_check(cudaMemcpyAsync(r + recv_displs[rank_], s + send_displs[rank_], send_counts[rank_],
                               cudaMemcpyDeviceToDevice, stream_),
               "cudaMemcpyAsync");
  nccl_check(ncclGroupStart(), "ncclGroupStart");
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    if (send_counts[q]) nccl_check(ncclSend(s + send_displs[q], send_counts[q], ncclInt8, q, comm_, stream_), "ncclSend");
    if (recv_counts[q]) nccl_check(ncclRecv(r + recv_displs[q], recv_counts[q], ncclInt8, q, comm_, stream_), "ncclRecv");
  }
  nccl_check(ncclGroupEnd(), "ncclGroupEnd");
}

void NcclCommunicator::send(const void* buf, size_t bytes, int peer, int) {
  LS_CHECK(peer >= 0 && peer < size_, "send: peer ", peer, " out of range [0, ", size_, ")");
  nccl_check(ncclSend(buf, bytes, ncclInt8, peer, comm_, stream_), "ncclSend");
}

void NcclCommunicator::recv(void* buf, size_t bytes, int peer, int) {
  LS_CHECK(peer >= 0 && peer < size_, "recv: peer ", peer, " out of range [0, ", size_, ")");
  nccl_check(ncclRecv(buf, bytes, ncclInt8, peer, comm_, stream_), "ncclRecv");
}

void NcclCommunicator::send_recv(const void* send_buf, size_t send_bytes, int, void* recv_buf, size_t recv_bytes,
                                 int, int peer) {
  LS_CHECK(peer >= 0 && peer < size_, "send_recv: peer ", peer, " out of range [0, ", size_, ")");
  // One group: NCCL runs both directions together (an ungrouped pair of blocking calls on
  // both peers would deadlock).
  nccl_check(ncclGroupStart(), "ncclGroupStart");
  nccl_check(ncclSend(send_buf, send_bytes, ncclInt8, peer, comm_, stream_), "ncclSend");
  nccl_check(ncclRecv(recv_buf, recv_bytes, ncclInt8, peer, comm_, stream_), "ncclRecv");
  nccl_check(ncclGroupEnd(), "ncclGroupEnd");
}

std::unique_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  ncclComm* child = nullptr;
  nccl_check(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &child, nullptr),
             "ncclCommSplit");
  if (!child) return nullptr;
  return std::unique_ptr<Communicator>(new NcclCommunicator(child, stream_));
}

}  // namespace lockstep::dist
#endif
