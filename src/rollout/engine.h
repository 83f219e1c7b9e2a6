// The rollout engine: continuous batching over a ModelRunner with a paged KV cache, chunked
// prefill, prefix caching, preemption by recompute, seeded sampling and weight versions.
//
// Invariance (docs/numerics.md, D1, D2, D5): every token's values depend only on its own sequence,
// because the runner's kernels are batch invariant and the engine (a) writes a token's K/V
// before any query reads it, (b) shares a KV page only between sequences with the same token
// prefix at the same positions under the same weights, (c) recomputes a preempted sequence
// token for token, and (d) keys random numbers by (seed, stream(seed), position). So a
// request's tokens and log-probs are the same bits alone or in any batch, with any chunk
// size, cache hit or preemption. The engine never calls kernels; a CUDA runner plugs in.
//
// Use:
//   Engine engine(make_runner(device, weights, precision), options);
//   RequestId id = engine.add_request(request);      // throws lockstep::Error on bad input
//   while (engine.has_unfinished()) for (auto& out : engine.step()) stream(out);
//   RequestResult r = engine.take_result(id);
// One thread drives an engine (the runner parallelises each step inside).
#pragma once
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <vector>

#include "model/runner.h"
#include "rollout/kv_page_pool.h"
#include "rollout/request.h"

namespace lockstep::rollout {

struct EngineOptions {
  int64_t kv_pages = 1024;          // KV page budget (the runner allocates this pool)
  int64_t page_size = 16;           // positions per page (numerics do not depend on it)
  int64_t max_batch_tokens = 2048;  // tokens per step (decode and prefill together)
  int64_t prefill_chunk = 512;      // most prompt tokens of one request per step
  bool prefix_cache = true;
  bool use_config_eos = true;       // stop on config.json's eos_token_id
  Detokenizer detokenize;           // needed only for stop strings
  int64_t initial_weight_version = 0;
};

// What update_weights does with requests that already started.
enum class UpdatePolicy { finish, abort };

struct EngineStats {
  int64_t requests = 0;  // accepted by add_request
  int64_t steps = 0, forward_tokens = 0, prefix_hit_tokens = 0, preemptions = 0;
};

class Engine {
 public:
  Engine(std::unique_ptr<ModelRunner> runner, EngineOptions options);

  // Queues a request; it joins the running batch at a later step. Throws lockstep::Error
  // (naming the field) for a bad request and leaves the engine unchanged.
  RequestId add_request(const GenerationRequest& request);
  // Ends a request now with finish_reason "abort" (reported by the next step); its tokens
  // so far are kept. No-op for a finished or unknown request.
  void abort(RequestId id);

  // Runs one forward over the scheduled tokens; returns per-request new tokens and endings.
  std::vector<StepOutput> step();
  bool has_unfinished() const { return !running_.empty() || !waiting_.empty() || !events_.empty(); }
  // Steps until every request has finished; returns all step outputs in order.
  std::vector<StepOutput> run_to_completion();

  const RequestResult& result(RequestId id) const;
  // Returns and forgets a request's result (finished requests only).
  RequestResult take_result(RequestId id);

  // Pauses admission, lets started requests finish (or aborts them), flushes the prefix
  // cache, loads the weights, bumps the version and resumes. Requests not yet started run
  // under the new weights. Returns the step outputs produced while draining.
  // = begin_weight_update + the runner's load_weights + end_weight_update.
  std::vector<StepOutput> update_weights(const ModelWeights& weights, UpdatePolicy policy);

  // The same update in buckets (docs/parallel.md, parallel/weight_sync.h):
  // begin_weight_update pauses admission, drains or aborts started requests (as
  // update_weights) and flushes the prefix cache; each load_weight_bucket replaces some
  // tensors' boxes (global names) in the runner; end_weight_update bumps the version once
  // and resumes. No request runs between begin and end (nothing is admitted). Misuse (a
  // bucket or an end outside an update, a begin inside one) throws lockstep::Error.
  std::vector<StepOutput> begin_weight_update(UpdatePolicy policy);
  void load_weight_bucket(const std::vector<WeightPiece>& pieces);
  void end_weight_update();
  bool updating_weights() const { return updating_; }
  int64_t weight_version() const { return weight_version_; }

  const EngineOptions& options() const { return options_; }
  const EngineStats& stats() const { return stats_; }
  const KvPagePool& pages() const { return pool_; }
  ModelRunner& runner() { return *runner_; }
  // A host copy of the weights the engine samples with (for `--audit-weight-sync`).
  ModelWeights weights() const { return runner_->export_weights(); }

 private:
  struct Sequence {
    RequestId id = 0;
    GenerationRequest request;
    uint64_t stream = 0;
    std::vector<int32_t> tokens;  // prompt then output
    int64_t num_computed = 0;     // tokens whose K/V is in the cache
    std::vector<int32_t> pages;
    std::vector<uint64_t> page_content;  // content id of each published full page
    bool started = false;
    RequestResult result;
  };
  struct Scheduled {
    Sequence* seq;
    int64_t begin, count;
  };

  bool admit(Sequence& seq, int64_t& budget, std::vector<Scheduled>& plan);
  bool ensure_pages(Sequence& seq, int64_t end_position, bool may_preempt);
  void preempt_newest();
  void release_pages(Sequence& seq);
  void publish_full_pages(Sequence& seq);
  int64_t chunk_for(const Sequence& seq, int64_t budget) const;
  void finish(Sequence& seq, FinishReason reason);
  FinishReason stop_check(const Sequence& seq) const;

  std::unique_ptr<ModelRunner> runner_;
  EngineOptions options_;
  KvPagePool pool_;
  std::vector<int32_t> stop_ids_;  // EOS ids from the config
  int64_t weight_version_;
  bool paused_ = false;
  bool updating_ = false;  // between begin_weight_update and end_weight_update
  RequestId next_id_ = 0;
  std::map<RequestId, Sequence> sequences_;  // unfinished and untaken results
  std::vector<Sequence*> running_;           // admitted, ordered by id (oldest first)
  std::deque<Sequence*> waiting_;            // preempted (at the front) then new, oldest first
  std::vector<StepOutput> events_;           // endings to report at the next step (aborts)
  EngineStats stats_;
};

}  // namespace lockstep::rollout
