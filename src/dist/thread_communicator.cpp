#include "dist/thread_communicator.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

#include "core/error.h"

namespace lockstep::dist {

// What each rank publishes for the current collective; read by peers between the two
// barriers of the collective, so pointers stay valid while they are read.
struct Slot {
  const void* ptr = nullptr;
  const size_t* counts = nullptr;
  const size_t* displs = nullptr;
  int color = 0;
  int key = 0;
  std::shared_ptr<ThreadGroupState> child;
};

struct ThreadGroupState {
  explicit ThreadGroupState(int n, std::shared_ptr<std::atomic<bool>> abort_flag)
      : size(n), slots(n), abort(std::move(abort_flag)) {}
  const int size;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  std::vector<Slot> slots;
  std::map<std::tuple<int, int, int>, std::deque<std::vector<uint8_t>>> mailbox;  // (src, dst, tag)
  std::shared_ptr<std::atomic<bool>> abort;  // shared by every group of one run_threads

  // Waits on cv until pred holds; polls the abort flag so a failed rank never hangs the rest.
  template <typename Pred>
  void wait(std::unique_lock<std::mutex>& lk, Pred pred) {
    while (!pred()) {
      if (abort->load()) fail("thread communicator: another rank failed");
      cv.wait_for(lk, std::chrono::milliseconds(20));
    }
  }

  void barrier() {
    std::unique_lock lk(mu);
    const uint64_t gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    wait(lk, [&] { return generation != gen; });
  }
};

ThreadCommunicator::ThreadCommunicator(std::shared_ptr<ThreadGroupState> state, int rank)
    : state_(std::move(state)), rank_(rank) {}
ThreadCommunicator::~ThreadCommunicator() = default;

int ThreadCommunicator::size() const { return state_->size; }

void ThreadCommunicator::barrier() { state_->barrier(); }

void ThreadCommunicator::broadcast(void* buf, size_t bytes, int root) {
  LS_CHECK(root >= 0 && root < size(), "broadcast: root ", root, " out of range [0, ", size(), ")");
  state_->slots[rank_].ptr = buf;
  state_->barrier();
  if (rank_ != root && bytes) std::memcpy(buf, state_->slots[root].ptr, bytes);
  state_->barrier();
}

void ThreadCommunicator::all_gather(const void* send, void* recv, size_t bytes_per_rank) {
  state_->slots[rank_].ptr = send;
  state_->barrier();
  for (int q = 0; q < size(); ++q)
    if (bytes_per_rank)
      std::memcpy(static_cast<uint8_t*>(recv) + q * bytes_per_rank, state_->slots[q].ptr, bytes_per_rank);
  state_->barrier();
}

void ThreadCommunicator::all_to_all_v(const void* send, std::span<const size_t> send_counts,
                                      std::span<const size_t> send_displs, void* recv,
                                      std::span<const size_t> recv_counts,
                                      std::span<const size_t> recv_displs) {
  const size_t p = static_cast<size_t>(size());
  LS_CHECK(send_counts.size() == p && send_displs.size() == p && recv_counts.size() == p &&
               recv_displs.size() == p,
           "all_to_all_v: count/displacement lists need ", p, " entries (one per rank)");
  Slot& mine = state_->slots[rank_];
  mine.ptr = send;
  mine.counts = send_counts.data();
  mine.displs = send_displs.data();
  state_->barrier();
  std::string error;
  for (int q = 0; q < size(); ++q) {
    const Slot& s = state_->slots[q];
    if (s.counts[rank_] != recv_counts[q]) {
      error = detail::concat("all_to_all_v: rank ", q, " sends ", s.counts[rank_], " bytes to rank ",
                             rank_, ", which expects ", recv_counts[q]);
      break;
    }
    if (recv_counts[q])
      std::memcpy(static_cast<uint8_t*>(recv) + recv_displs[q],
                  static_cast<const uint8_t*>(s.ptr) + s.displs[rank_], recv_counts[q]);
  }
  state_->barrier();  // peers' buffers stay alive until everyone has read them
  if (!error.empty()) fail(error);
}

void ThreadCommunicator::send(const void* buf, size_t bytes, int peer, int tag) {
  LS_CHECK(peer >= 0 && peer < size(), "send: peer ", peer, " out of range [0, ", size(), ")");
  const auto* p = static_cast<const uint8_t*>(buf);
  std::lock_guard lk(state_->mu);
  state_->mailbox[{rank_, peer, tag}].emplace_back(p, p + bytes);
  state_->cv.notify_all();
}

void ThreadCommunicator::recv(void* buf, size_t bytes, int peer, int tag) {
  LS_CHECK(peer >= 0 && peer < size(), "recv: peer ", peer, " out of range [0, ", size(), ")");
  std::unique_lock lk(state_->mu);
  auto& box = state_->mailbox[{peer, rank_, tag}];
  state_->wait(lk, [&] { return !box.empty(); });
  std::vector<uint8_t> msg = std::move(box.front());
  box.pop_front();
  LS_CHECK(msg.size() == bytes, "recv from rank ", peer, " tag ", tag, ": expected ", bytes,
           " bytes, got ", msg.size());
  if (bytes) std::memcpy(buf, msg.data(), bytes);
}

std::unique_ptr<Communicator> ThreadCommunicator::split(int color, int key) {
  Slot& mine = state_->slots[rank_];
  mine.color = color;
  mine.key = key;
  mine.child.reset();
  state_->barrier();
  std::vector<std::pair<int, int>> members;  // (key, old rank) of my color
  if (color >= 0)
    for (int q = 0; q < size(); ++q)
      if (state_->slots[q].color == color) members.emplace_back(state_->slots[q].key, q);
  std::sort(members.begin(), members.end());
  const bool leader = !members.empty() && members.front().second == rank_;
  if (leader) mine.child = std::make_shared<ThreadGroupState>(static_cast<int>(members.size()), state_->abort);
  state_->barrier();  // leaders have published the new groups
  std::unique_ptr<Communicator> out;
  if (!members.empty()) {
    auto child = state_->slots[members.front().second].child;
    int new_rank = 0;
    while (members[new_rank].second != rank_) ++new_rank;
    out = std::make_unique<ThreadCommunicator>(std::move(child), new_rank);
  }
  state_->barrier();  // everyone holds its group before slots are reused
  return out;
}

void run_threads(int size, const std::function<void(Communicator&)>& fn) {
  LS_CHECK(size >= 1, "run_threads: size ", size, " must be >= 1");
  auto abort = std::make_shared<std::atomic<bool>>(false);
  auto state = std::make_shared<ThreadGroupState>(size, abort);
  std::mutex err_mu;
  std::exception_ptr first;
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        ThreadCommunicator comm(state, r);
        fn(comm);
      } catch (...) {
        std::lock_guard lk(err_mu);
        // The first failure is the cause; later ones are usually "another rank failed".
        if (!first && !abort->load()) first = std::current_exception();
        abort->store(true);
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace lockstep::dist
