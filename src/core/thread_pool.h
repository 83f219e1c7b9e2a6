// A fixed pool of worker threads with a static-partition parallel_for.
// Work is split into contiguous ranges; every kernel computes each output element by a
// fixed procedure, so results never depend on the number of threads.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lockstep {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return num_threads_; }
  // Calls fn(begin, end) over [0, n) cut into at most size() contiguous ranges of at least
  // `grain` items; blocks until all are done. Not reentrant (fn must not call it), but safe
  // from several threads at once: callers take turns (thread ranks share one pool).
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker(int index);

  int num_threads_;
  std::vector<std::thread> threads_;
  std::mutex caller_mu_;  // one job at a time: the workers hold one job's state
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int job_parts_ = 0;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stop_ = false;
};

// The pool the CPU kernels use. Its size comes from LOCKSTEP_NUM_THREADS or the number of
// cores; set_num_threads replaces it (tests use this to show thread-count invariance).
ThreadPool& cpu_pool();
void set_num_threads(int n);

}  // namespace lockstep
