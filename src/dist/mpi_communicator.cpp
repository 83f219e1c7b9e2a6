#include "dist/mpi_communicator.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "dist/mpi_handle.h"

namespace lockstep::dist {
namespace {

// MPI counts are int; larger messages are sent in pieces of this many bytes.
constexpr size_t kPiece = size_t{1} << 30;

bool mpi_finalized() {
  int f = 0;
  MPI_Finalized(&f);
  return f != 0;
}

}  // namespace

void mpi_check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail(what, " failed: ", std::string(msg, len));
}

// ---- runtime ----------------------------------------------------------------------------

bool MpiRuntime::launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") ||
         std::getenv("PMIX_RANK");
}

MpiRuntime& MpiRuntime::instance() {
  static MpiRuntime rt;
  return rt;
}

MpiRuntime::MpiRuntime() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized && !launched_by_mpirun()) return;  // single process, no MPI
  if (!initialized) {
    // MULTIPLE so an engine thread and a trainer thread may both communicate.
    mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &thread_level_),
              "MPI_Init_thread");
    owns_init_ = true;
  } else {
    MPI_Query_thread(&thread_level_);
  }
  active_ = true;
  MPI_Comm_size(MPI_COMM_WORLD, &world_size_);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank_);
}

MpiRuntime::~MpiRuntime() {
  if (owns_init_ && !mpi_finalized()) MPI_Finalize();
}

std::unique_ptr<Communicator> MpiRuntime::world() {
  if (!active_) return std::make_unique<SelfCommunicator>();
  auto h = std::make_unique<MpiHandle>();
  mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &h->comm), "MPI_Comm_dup(MPI_COMM_WORLD)");
  return std::make_unique<MpiCommunicator>(std::move(h));
}

std::unique_ptr<Communicator> world_communicator() { return MpiRuntime::instance().world(); }

void MpiRuntime::abort_job_if_parallel(const std::string& message, int exit_code) {
  int initialized = 0, size = 1, rank = 0;
  MPI_Initialized(&initialized);
  if (!initialized || mpi_finalized()) return;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size <= 1) return;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::fprintf(stderr, "lockstep: rank %d of %d: %s\n", rank, size, message.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, exit_code);
}

void MpiRuntime::check_ranks_agree(const std::string& command_line) {
  if (!active_ || world_size_ <= 1) return;
  uint64_t mine = 0xcbf29ce484222325ull;  // FNV-1a 64
  for (unsigned char c : command_line) mine = (mine ^ c) * 0x100000001b3ull;
  uint64_t root = mine;
  mpi_check(MPI_Bcast(&root, 1, MPI_UINT64_T, 0, MPI_COMM_WORLD), "MPI_Bcast(command line)");
  LS_CHECK(root == mine, "this rank was started with another command line than rank 0 (", command_line,
           "); every rank must run the same command with the same flags");
}

// ---- communicator -----------------------------------------------------------------------

MpiCommunicator::MpiCommunicator(std::unique_ptr<MpiHandle> comm) : comm_(std::move(comm)) {
  LS_CHECK(comm_ && comm_->comm != MPI_COMM_NULL, "MpiCommunicator: null MPI communicator");
  // Errors come back as codes and become lockstep::Error instead of aborting the job.
  MPI_Comm_set_errhandler(comm_->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm_->comm, &rank_);
  MPI_Comm_size(comm_->comm, &size_);
}

MpiCommunicator::~MpiCommunicator() {
  if (comm_ && comm_->comm != MPI_COMM_NULL && !mpi_finalized()) MPI_Comm_free(&comm_->comm);
}

void MpiCommunicator::barrier() { mpi_check(MPI_Barrier(comm_->comm), "MPI_Barrier"); }

void MpiCommunicator::broadcast(void* buf, size_t bytes, int root) {
  LS_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " out of range [0, ", size_, ")");
  auto* p = static_cast<uint8_t*>(buf);
  for (size_t off = 0; off < bytes; off += kPiece) {
    int n = static_cast<int>(std::min(kPiece, bytes - off));
    mpi_check(MPI_Bcast(p + off, n, MPI_BYTE, root, comm_->comm), "MPI_Bcast");
  }
}

void MpiCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  if (bytes_per_rank <= kPiece) {
    int n = static_cast<int>(bytes_per_rank);
    mpi_check(MPI_Allgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_->comm), "MPI_Allgather");
    return;
  }
  // Rare (> 1 GiB per rank): gather piece by piece through a staging buffer.
  std::vector<uint8_t> tmp(kPiece * size_);
  const auto* s = static_cast<const uint8_t*>(send);
  auto* r = static_cast<uint8_t*>(recv);
  for (size_t off = 0; off < bytes_per_rank; off += kPiece) {
    size_t len = std::min(kPiece, bytes_per_rank - off);
    int n = static_cast<int>(len);
    mpi_check(MPI_Allgather(s + off, n, MPI_BYTE, tmp.data(), n, MPI_BYTE, comm_->comm),
              "MPI_Allgather");
    for (int q = 0; q < size_; ++q) std::memcpy(r + q * bytes_per_rank + off, tmp.data() + q * len, len);
  }
}

void MpiCommunicator::all_to_all_v(const void* send, std::span<const size_t> send_counts,
                                   std::span<const size_t> send_displs, void* recv,
                                   std::span<const size_t> recv_counts,
                                   std::span<const size_t> recv_displs) {
  const size_t p = static_cast<size_t>(size_);
  LS_CHECK(send_counts.size() == p && send_displs.size() == p && recv_counts.size() == p &&
               recv_displs.size() == p,
           "all_to_all_v: count/displacement lists need ", p, " entries (one per rank)");
  bool fits = true;
  for (size_t i = 0; i < p; ++i)
    fits = fits && send_counts[i] <= INT_MAX && send_displs[i] <= INT_MAX &&
           recv_counts[i] <= INT_MAX && recv_displs[i] <= INT_MAX;
  if (fits) {
    std::vector<int> sc(p), sd(p), rc(p), rd(p);
    for (size_t i = 0; i < p; ++i) {
      sc[i] = static_cast<int>(send_counts[i]);
      sd[i] = static_cast<int>(send_displs[i]);
      rc[i] = static_cast<int>(recv_counts[i]);
      rd[i] = static_cast<int>(recv_displs[i]);
    }
    mpi_check(MPI_Alltoallv(send, sc.data(), sd.data(), MPI_BYTE, recv, rc.data(), rd.data(),
                            MPI_BYTE, comm_->comm),
              "MPI_Alltoallv");
    return;
  }
  // Offsets past 2 GiB: nonblocking point-to-point in pieces (same bytes, same result).
  constexpr int kTag = 0x4c53;  // reserved for this exchange; user tags are separate calls
  std::vector<MPI_Request> reqs;
  const auto* s = static_cast<const uint8_t*>(send);
  auto* r = static_cast<uint8_t*>(recv);
  for (int q = 0; q < size_; ++q) {
    for (size_t off = 0; off < recv_counts[q]; off += kPiece) {
      int n = static_cast<int>(std::min(kPiece, recv_counts[q] - off));
      reqs.emplace_back();
      mpi_check(MPI_Irecv(r + recv_displs[q] + off, n, MPI_BYTE, q, kTag, comm_->comm, &reqs.back()),
                "MPI_Irecv");
    }
  }
  for (int q = 0; q < size_; ++q) {
    for (size_t off = 0; off < send_counts[q]; off += kPiece) {
      int n = static_cast<int>(std::min(kPiece, send_counts[q] - off));
      reqs.emplace_back();
      mpi_check(MPI_Isend(s + send_displs[q] + off, n, MPI_BYTE, q, kTag, comm_->comm, &reqs.back()),
                "MPI_Isend");
    }
  }
  mpi_check(MPI_Waitall(static_cast<int>(reqs.size()), reqs.data(), MPI_STATUSES_IGNORE),
            "MPI_Waitall");
}

void MpiCommunicator::send(const void* buf, size_t bytes, int peer, int tag) {
  LS_CHECK(peer >= 0 && peer < size_, "send: peer ", peer, " out of range [0, ", size_, ")");
  const auto* p = static_cast<const uint8_t*>(buf);
  size_t off = 0;
  do {  // a zero-byte message is still one message
    int n = static_cast<int>(std::min(kPiece, bytes - off));
    mpi_check(MPI_Send(p + off, n, MPI_BYTE, peer, tag, comm_->comm), "MPI_Send");
    off += static_cast<size_t>(n);
  } while (off < bytes);
}

void MpiCommunicator::send_recv(const void* send_buf, size_t send_bytes, int send_tag, void* recv_buf,
                                size_t recv_bytes, int recv_tag, int peer) {
  LS_CHECK(peer >= 0 && peer < size_, "send_recv: peer ", peer, " out of range [0, ", size_, ")");
  // Every piece posted at once, then one wait: neither side's send waits for the other's recv.
  std::vector<MPI_Request> requests;
  std::vector<int> recv_pieces;
  const auto* s = static_cast<const uint8_t*>(send_buf);
  auto* r = static_cast<uint8_t*>(recv_buf);
  size_t off = 0;
  do {
    const int n = static_cast<int>(std::min(kPiece, recv_bytes - off));
    requests.emplace_back();
    mpi_check(MPI_Irecv(r + off, n, MPI_BYTE, peer, recv_tag, comm_->comm, &requests.back()), "MPI_Irecv");
    recv_pieces.push_back(n);
    off += static_cast<size_t>(n);
  } while (off < recv_bytes);
  off = 0;
  do {
    const int n = static_cast<int>(std::min(kPiece, send_bytes - off));
    requests.emplace_back();
    mpi_check(MPI_Isend(s + off, n, MPI_BYTE, peer, send_tag, comm_->comm, &requests.back()), "MPI_Isend");
    off += static_cast<size_t>(n);
  } while (off < send_bytes);
  std::vector<MPI_Status> statuses(requests.size());
  mpi_check(MPI_Waitall(int(requests.size()), requests.data(), statuses.data()), "MPI_Waitall");
  for (size_t i = 0; i < recv_pieces.size(); ++i) {
    int got = 0;
    MPI_Get_count(&statuses[i], MPI_BYTE, &got);
    LS_CHECK(got == recv_pieces[i], "send_recv from rank ", peer, " tag ", recv_tag, ": expected ", recv_pieces[i],
             " bytes, got ", got);
  }
}

void MpiCommunicator::recv(void* buf, size_t bytes, int peer, int tag) {
  LS_CHECK(peer >= 0 && peer < size_, "recv: peer ", peer, " out of range [0, ", size_, ")");
  auto* p = static_cast<uint8_t*>(buf);
  size_t off = 0;
  do {
    int n = static_cast<int>(std::min(kPiece, bytes - off));
    MPI_Status st;
    mpi_check(MPI_Recv(p + off, n, MPI_BYTE, peer, tag, comm_->comm, &st), "MPI_Recv");
    int got = 0;
    MPI_Get_count(&st, MPI_BYTE, &got);
    LS_CHECK(got == n, "recv from rank ", peer, " tag ", tag, ": expected ", n, " bytes, got ", got);
    off += static_cast<size_t>(n);
  } while (off < bytes);
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  auto h = std::make_unique<MpiHandle>();
  mpi_check(MPI_Comm_split(comm_->comm, color < 0 ? MPI_UNDEFINED : color, key, &h->comm),
            "MPI_Comm_split");
  if (h->comm == MPI_COMM_NULL) return nullptr;
  return std::make_unique<MpiCommunicator>(std::move(h));
}

}  // namespace lockstep::dist
