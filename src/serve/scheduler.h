// The rollout engine behind the HTTP server: one scheduler thread owns the Engine (which is
// single-threaded) and runs it continuously, so requests from many connections are batched
// together. HTTP threads talk to it only through this class: submit a request's choices and
// get a Ticket to wait on, cancel, pause/resume, update weights, read metrics.
//
// Admission: at most max_running sequences (choices) are in the engine at once; the rest
// wait here, and a request is refused (Overloaded) when running + waiting + its n choices
// would exceed max_running + max_queued. Draining refuses new requests and lets the
// admitted ones finish. Tokens are the engine's, bit for bit: the scheduler adds no
// numerics, only decides when a request enters the engine (which never changes its bits).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "model/runner.h"
#include "rollout/engine.h"

namespace lockstep::serve {

// What one choice produced so far.
struct ChoiceState {
  std::vector<int32_t> output_ids;
  std::vector<float> logprobs;
  std::vector<std::vector<TopLogprob>> top_logprobs;  // per token, when the request asked for them
  int64_t weight_version = -1;  // of its tokens (all the same); the version at its end when it has none
  rollout::FinishReason finish_reason = rollout::FinishReason::none;
  std::string error;  // set when the engine refused the choice after it was accepted
};

// A submitted request's choices as they grow; shared by the scheduler thread (writer) and
// the HTTP thread (reader).
class Ticket {
 public:
  explicit Ticket(size_t n) : choices_(n) {}
  struct Snapshot {
    std::vector<ChoiceState> choices;
    uint64_t generation = 0;  // bumps on every change
    bool done = false;        // every choice finished
  };
  // Waits until the generation differs from `seen` or `timeout` passes; returns the state.
  Snapshot wait(uint64_t seen, std::chrono::milliseconds timeout);
  bool cancelled() const { return cancelled_; }

 private:
  friend class Scheduler;
  // `version`: the engine's weight version now, reported by a choice that ends without tokens.
  void append(size_t choice, const rollout::StepOutput& out, int64_t version);
  void fail(size_t choice, const std::string& error, int64_t version);

  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<ChoiceState> choices_;
  uint64_t generation_ = 0;
  size_t finished_ = 0;
  std::atomic<bool> cancelled_{false};
};

// Thrown by submit when the server cannot take the request now.
struct Overloaded : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ShuttingDown : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct SchedulerOptions {
  int64_t max_running = 64;  // sequences in the engine at once
  int64_t max_queued = 256;  // sequences waiting beyond those
};

struct SchedulerMetrics {
  int64_t requests_accepted = 0, requests_rejected = 0, requests_cancelled = 0;
  int64_t finished_stop = 0, finished_length = 0, finished_abort = 0;
  int64_t prompt_tokens = 0, generation_tokens = 0;
  int64_t running = 0, queued = 0;  // sequences
  int64_t kv_pages_in_use = 0, kv_pages_total = 0;
  int64_t engine_steps = 0, prefix_hit_tokens = 0, preemptions = 0;
  int64_t weight_version = 0;
  bool paused = false;
  double generation_tokens_per_s = 0.0;  // over the last few seconds
};

class Scheduler {
 public:
  Scheduler(std::unique_ptr<ModelRunner> runner, rollout::EngineOptions engine_options, SchedulerOptions options);
  ~Scheduler();  // aborts whatever runs and joins the thread

  // Validates every choice (throws lockstep::Error naming the field), then queues them all.
  // Throws Overloaded or ShuttingDown without queueing anything.
  std::shared_ptr<Ticket> submit(const std::vector<rollout::GenerationRequest>& choices);
  // The ticket's unfinished choices end with finish_reason "abort"; their KV pages are freed.
  void cancel(const std::shared_ptr<Ticket>& ticket);

  // Stops stepping the engine (requests keep their place and pages) / goes on.
  void pause();
  void resume();
  // Loads new weights between steps: admitted requests finish on the old weights (finish) or
  // end with "abort" (abort); queued ones run on the new. Returns the new weight version.
  int64_t update_weights(ModelWeights weights, rollout::UpdatePolicy policy);

  // Refuses new requests from now on; returns once every admitted one has finished or
  // `timeout` passed (then the rest are aborted). True when nothing had to be aborted.
  bool drain(std::chrono::milliseconds timeout);

  SchedulerMetrics metrics() const;
  const ModelConfig& config() const { return config_; }

 private:
  struct Pending {
    std::shared_ptr<Ticket> ticket;
    size_t choice;
    rollout::GenerationRequest request;
  };
  struct Command;
  void loop();
  void admit_pending();
  void dispatch(const std::vector<rollout::StepOutput>& outputs);
  void abort_ticket(const std::shared_ptr<Ticket>& ticket);
  void refresh_metrics();
  // Running, queued and KV pages in use, now (scheduler thread, mutex_ held).
  void count_locked();
  void run_command(std::unique_lock<std::mutex>& lock, const std::function<void()>& fn);

  rollout::Engine engine_;  // touched by the scheduler thread only
  const ModelConfig config_;
  const SchedulerOptions options_;
  const int64_t kv_pages_, page_size_;  // the engine's pool, for checks on HTTP threads

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable idle_;
  std::deque<Pending> queue_;
  std::vector<std::function<void()>> commands_;  // run on the scheduler thread between steps
  int64_t in_system_ = 0;                        // sequences queued or in the engine
  bool paused_ = false, draining_ = false, stopping_ = false;
  SchedulerMetrics metrics_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, int64_t>> token_history_;

  // Scheduler-thread state.
  std::map<rollout::RequestId, std::pair<std::shared_ptr<Ticket>, size_t>> in_engine_;
  std::thread thread_;
};

}  // namespace lockstep::serve
