#include "serve/scheduler.h"

#include <cstdio>
#include <future>

#include "core/error.h"

namespace lockstep::serve {

using Clock = std::chrono::steady_clock;

Ticket::Snapshot Ticket::wait(uint64_t seen, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  changed_.wait_for(lock, timeout, [&] { return generation_ != seen; });
  return {choices_, generation_, finished_ == choices_.size()};
}

void Ticket::append(size_t choice, const rollout::StepOutput& out, int64_t version) {
  std::lock_guard lock(mutex_);
  ChoiceState& c = choices_[choice];
  if (c.finish_reason != rollout::FinishReason::none) return;
  for (const auto& t : out.tokens) {
    if (c.weight_version < 0) c.weight_version = t.weight_version;
    c.output_ids.push_back(t.token);
    c.logprobs.push_back(t.logprob);
    c.top_logprobs.push_back(t.top);
  }
  if (out.finished()) {
    if (c.weight_version < 0) c.weight_version = version;
    c.finish_reason = out.finish_reason;
    ++finished_;
  }
  ++generation_;
  changed_.notify_all();
}

void Ticket::fail(size_t choice, const std::string& error, int64_t version) {
  {
    std::lock_guard lock(mutex_);
    choices_[choice].error = error;
  }
  append(choice, {0, {}, rollout::FinishReason::abort}, version);
}

Scheduler::Scheduler(std::unique_ptr<ModelRunner> runner, rollout::EngineOptions engine_options,
                     SchedulerOptions options)
    : engine_(std::move(runner), std::move(engine_options)),
      config_(engine_.runner().config()),
      options_(options),
      kv_pages_(engine_.pages().num_pages()),
      page_size_(engine_.options().page_size) {
  LS_CHECK(options_.max_running > 0, "--max-running-requests must be positive, got ", options_.max_running);
  LS_CHECK(options_.max_queued >= 0, "--max-queued-requests must be >= 0, got ", options_.max_queued);
  metrics_.kv_pages_total = engine_.pages().num_pages();
  metrics_.weight_version = engine_.weight_version();
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

std::shared_ptr<Ticket> Scheduler::submit(const std::vector<rollout::GenerationRequest>& choices) {
  const int64_t pool = kv_pages_, page = page_size_;
  for (const auto& r : choices) {
    rollout::validate_request(r, config_);
    // The engine's own admission check (engine.cpp), here so the client hears it now.
    const int64_t prompt = int64_t(r.prompt.size());
    const int64_t positions = std::min(prompt + r.max_new_tokens - 1, config_.max_position_embeddings - 1);
    LS_CHECK((std::max(positions, prompt) + page - 1) / page <= pool,
             "the request needs more KV pages than the "
             "server's whole pool (",
             pool, " pages of ", page, "); lower max_tokens or raise --kv-pages");
  }
  const int64_t n = int64_t(choices.size());
  auto ticket = std::make_shared<Ticket>(choices.size());
  {
    std::lock_guard lock(mutex_);
    if (draining_ || stopping_) throw ShuttingDown("the server is shutting down");
    if (in_system_ + n > options_.max_running + options_.max_queued) {
      ++metrics_.requests_rejected;
      throw Overloaded("the server is at capacity (" + std::to_string(in_system_) + " sequences running or queued, " +
                       std::to_string(options_.max_running + options_.max_queued) + " allowed); retry later");
    }
    for (size_t i = 0; i < choices.size(); ++i) queue_.push_back({ticket, i, choices[i]});
    in_system_ += n;
    ++metrics_.requests_accepted;
    metrics_.prompt_tokens += n * int64_t(choices.front().prompt.size());
    metrics_.queued = int64_t(queue_.size());
  }
  wake_.notify_all();
  return ticket;
}

void Scheduler::cancel(const std::shared_ptr<Ticket>& ticket) {
  if (ticket->cancelled_.exchange(true)) return;
  {
    std::lock_guard lock(mutex_);
    ++metrics_.requests_cancelled;
    commands_.push_back([this, ticket] { abort_ticket(ticket); });
  }
  wake_.notify_all();
}

void Scheduler::abort_ticket(const std::shared_ptr<Ticket>& ticket) {
  for (auto it = in_engine_.begin(); it != in_engine_.end();) {
    if (it->second.first != ticket) {
      ++it;
      continue;
    }
    // Aborted and taken now, so its pages are free even while paused; the engine's later
    // abort event names an id no longer mapped and is ignored.
    const auto [id, choice] = std::pair(it->first, it->second.second);
    engine_.abort(id);
    engine_.take_result(id);
    it = in_engine_.erase(it);
    {
      std::lock_guard lock(mutex_);
      --in_system_;
      ++metrics_.finished_abort;
      count_locked();
    }
    ticket->append(choice, {id, {}, rollout::FinishReason::abort}, engine_.weight_version());
  }
  std::lock_guard lock(mutex_);
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (it->ticket != ticket) {
      ++it;
      continue;
    }
    const size_t choice = it->choice;
    it = queue_.erase(it);
    --in_system_;
    ++metrics_.finished_abort;
    count_locked();
    ticket->append(choice, {0, {}, rollout::FinishReason::abort}, engine_.weight_version());
  }
}

void Scheduler::pause() {
  std::lock_guard lock(mutex_);
  paused_ = true;
  metrics_.paused = true;
}

void Scheduler::resume() {
  {
    std::lock_guard lock(mutex_);
    paused_ = false;
    metrics_.paused = false;
  }
  wake_.notify_all();
}

void Scheduler::run_command(std::unique_lock<std::mutex>& lock, const std::function<void()>& fn) {
  auto done = std::make_shared<std::promise<void>>();
  auto future = done->get_future();
  commands_.push_back([fn, done] {
    try {
      fn();
      done->set_value();
    } catch (...) {
      done->set_exception(std::current_exception());
    }
  });
  lock.unlock();
  wake_.notify_all();
  future.get();
}

int64_t Scheduler::update_weights(ModelWeights weights, rollout::UpdatePolicy policy) {
  int64_t version = 0;
  std::unique_lock lock(mutex_);
  LS_CHECK(!stopping_, "the server is shutting down");
  run_command(lock, [&] {
    dispatch(engine_.update_weights(weights, policy));
    version = engine_.weight_version();
  });
  return version;
}

bool Scheduler::drain(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  draining_ = true;
  paused_ = false;
  wake_.notify_all();
  if (idle_.wait_for(lock, timeout, [&] { return in_system_ == 0; })) return true;
  run_command(lock, [this] {
    std::vector<std::shared_ptr<Ticket>> tickets;
    for (auto& [id, entry] : in_engine_) tickets.push_back(entry.first);
    {
      std::lock_guard guard(mutex_);
      for (auto& p : queue_) tickets.push_back(p.ticket);
    }
    for (auto& t : tickets) abort_ticket(t);
  });
  return false;
}

void Scheduler::admit_pending() {
  std::vector<Pending> admitted;
  {
    std::lock_guard lock(mutex_);
    while (!queue_.empty() && int64_t(in_engine_.size() + admitted.size()) < options_.max_running) {
      admitted.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
  }
  for (auto& p : admitted) {
    try {
      if (p.ticket->cancelled()) throw Error("cancelled before it started");
      const rollout::RequestId id = engine_.add_request(p.request);
      in_engine_[id] = {p.ticket, p.choice};
    } catch (const Error& e) {
      {
        std::lock_guard lock(mutex_);
        --in_system_;
        ++metrics_.finished_abort;
      }
      p.ticket->fail(p.choice, e.what(), engine_.weight_version());
    }
  }
  std::lock_guard lock(mutex_);
  count_locked();
}

void Scheduler::dispatch(const std::vector<rollout::StepOutput>& outputs) {
  for (const auto& out : outputs) {
    auto it = in_engine_.find(out.id);
    if (it == in_engine_.end()) continue;
    const auto [ticket, choice] = it->second;
    {
      // The counts first: a client that hears its answer and reads /metrics sees them.
      std::lock_guard lock(mutex_);
      metrics_.generation_tokens += int64_t(out.tokens.size());
      if (out.finished()) {
        engine_.take_result(out.id);
        in_engine_.erase(it);
        --in_system_;
        switch (out.finish_reason) {
          case rollout::FinishReason::stop: ++metrics_.finished_stop; break;
          case rollout::FinishReason::length: ++metrics_.finished_length; break;
          default: ++metrics_.finished_abort; break;
        }
        count_locked();
      }
    }
    ticket->append(choice, out, engine_.weight_version());
  }
}

void Scheduler::count_locked() {
  metrics_.running = int64_t(in_engine_.size());
  metrics_.queued = int64_t(queue_.size());
  metrics_.kv_pages_in_use = engine_.pages().num_pages() - engine_.pages().available();
}

void Scheduler::refresh_metrics() {
  count_locked();
  metrics_.engine_steps = engine_.stats().steps;
  metrics_.prefix_hit_tokens = engine_.stats().prefix_hit_tokens;
  metrics_.preemptions = engine_.stats().preemptions;
  metrics_.weight_version = engine_.weight_version();
  const auto now = Clock::now();
  if (token_history_.empty() || now - token_history_.back().first > std::chrono::milliseconds(100))
    token_history_.push_back({now, metrics_.generation_tokens});
  while (token_history_.size() > 2 && now - token_history_[1].first > std::chrono::seconds(10))
    token_history_.pop_front();
}

SchedulerMetrics Scheduler::metrics() const {
  std::lock_guard lock(mutex_);
  SchedulerMetrics m = metrics_;
  if (!token_history_.empty()) {
    // Tokens since the oldest sample within (about) the last 10 s, over the time since it.
    const auto& [t0, tokens0] = token_history_.front();
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (seconds > 0.0) m.generation_tokens_per_s = double(m.generation_tokens - tokens0) / seconds;
  }
  return m;
}

void Scheduler::loop() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wake_.wait(lock, [&] {
      const bool can_admit = !queue_.empty() && int64_t(in_engine_.size()) < options_.max_running;
      return stopping_ || !commands_.empty() || (!paused_ && (can_admit || engine_.has_unfinished()));
    });
    if (stopping_) break;
    auto commands = std::move(commands_);
    commands_.clear();
    const bool paused = paused_;
    lock.unlock();
    for (auto& command : commands) command();
    if (!paused) {
      admit_pending();
      try {
        if (engine_.has_unfinished()) dispatch(engine_.step());
      } catch (const std::exception& e) {
        // Not expected (requests are validated before they enter); end what runs rather than the server.
        std::fprintf(stderr, "lockstep serve: engine step failed: %s; aborting the running requests\n", e.what());
        std::vector<std::shared_ptr<Ticket>> tickets;
        for (auto& [id, entry] : in_engine_) tickets.push_back(entry.first);
        for (auto& t : tickets) abort_ticket(t);
      }
    }
    lock.lock();
    refresh_metrics();
    idle_.notify_all();
  }
  // Stopping: whatever is left ends with "abort" so no HTTP thread waits forever.
  const int64_t version = engine_.weight_version();
  for (auto& [id, entry] : in_engine_)
    entry.first->append(entry.second, {id, {}, rollout::FinishReason::abort}, version);
  for (auto& p : queue_) p.ticket->append(p.choice, {0, {}, rollout::FinishReason::abort}, version);
  in_engine_.clear();
  queue_.clear();
  commands_.clear();  // their waiters get a broken promise instead of waiting forever
  in_system_ = 0;
  idle_.notify_all();
}

}  // namespace lockstep::serve
