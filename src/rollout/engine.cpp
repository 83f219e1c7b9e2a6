#include "rollout/engine.h"

#include <algorithm>

#include "core/error.h"

namespace lockstep::rollout {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename Container>
void insert_by_id(Container& c, auto* seq) {
  auto at = std::upper_bound(c.begin(), c.end(), seq, [](auto* a, auto* b) { return a->id < b->id; });
  c.insert(at, seq);
}

template <typename Container>
void erase_value(Container& c, auto* seq) {
  c.erase(std::remove(c.begin(), c.end(), seq), c.end());
}

}  // namespace

Engine::Engine(std::unique_ptr<ModelRunner> runner, EngineOptions options)
    : runner_(std::move(runner)),
      options_(std::move(options)),
      pool_(options_.kv_pages, options_.page_size),
      weight_version_(options_.initial_weight_version) {
  LS_CHECK(runner_ != nullptr, "rollout engine: no model runner");
  LS_CHECK(options_.max_batch_tokens > 0, "rollout engine: max_batch_tokens must be positive, got ",
           options_.max_batch_tokens);
  LS_CHECK(options_.prefill_chunk > 0, "rollout engine: prefill_chunk must be positive, got ", options_.prefill_chunk);
  if (options_.use_config_eos)
    for (int64_t id : runner_->config().eos_token_ids) stop_ids_.push_back(int32_t(id));
  runner_->allocate_kv(options_.kv_pages, options_.page_size);
}

RequestId Engine::add_request(const GenerationRequest& request) {
  const ModelConfig& config = runner_->config();
  validate_request(request, config);
  LS_CHECK(request.stop_strings.empty() || options_.detokenize,
           "stop_strings: the engine has no detokenizer to match them against");
  // The K/V positions the request can ever need: every token but the last sampled one.
  const int64_t prompt = int64_t(request.prompt.size());
  const int64_t most_positions = request_positions(request, config) - 1;
  const int64_t pages_needed = ceil_div(std::max(most_positions, prompt), options_.page_size);
  LS_CHECK(pages_needed <= pool_.num_pages(), "the request needs up to ", pages_needed, " KV pages (prompt ", prompt,
           " + max_new_tokens ", request.max_new_tokens, ", page size ", options_.page_size,
           ") but the engine's pool has ", pool_.num_pages());

  const RequestId id = next_id_++;
  ++stats_.requests;
  Sequence& seq = sequences_[id];
  seq.id = id;
  seq.request = request;
  seq.stream = sampling_stream(request.sampling.seed);
  seq.tokens = request.prompt;
  if (request.max_new_tokens == 0) {
    seq.result.finish_reason = FinishReason::length;
    events_.push_back({id, {}, FinishReason::length});
  } else {
    waiting_.push_back(&seq);
  }
  return id;
}

void Engine::abort(RequestId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end() || it->second.result.finished()) return;
  Sequence& seq = it->second;
  erase_value(waiting_, &seq);
  finish(seq, FinishReason::abort);
  events_.push_back({id, {}, FinishReason::abort});
}

int64_t Engine::chunk_for(const Sequence& seq, int64_t budget) const {
  const int64_t remaining = int64_t(seq.tokens.size()) - seq.num_computed;
  int64_t n = std::min(remaining, budget);
  if (remaining > 1) n = std::min(n, options_.prefill_chunk);
  return n;
}

void Engine::release_pages(Sequence& seq) {
  for (int32_t page : seq.pages) pool_.release(page);
  seq.pages.clear();
  seq.page_content.clear();
  seq.num_computed = 0;
}

void Engine::preempt_newest() {
  Sequence* victim = running_.back();
  running_.pop_back();
  // Its tokens so far are kept; the K/V is recomputed (identically) when it is readmitted.
  release_pages(*victim);
  insert_by_id(waiting_, victim);
  ++stats_.preemptions;
}

bool Engine::ensure_pages(Sequence& seq, int64_t end_position, bool may_preempt) {
  const int64_t needed = ceil_div(end_position, options_.page_size);
  while (int64_t(seq.pages.size()) < needed) {
    if (auto page = pool_.allocate()) {
      seq.pages.push_back(*page);
      continue;
    }
    if (!may_preempt || running_.empty()) return false;
    const bool self = running_.back() == &seq;
    preempt_newest();
    if (self) return false;
  }
  return true;
}

bool Engine::admit(Sequence& seq, int64_t& budget, std::vector<Scheduled>& plan) {
  // Reuse cached pages of the same prefix; the last token is always computed (its logits are
  // needed), so only pages entirely before it are taken, and shared pages are never written.
  if (options_.prefix_cache) {
    const int64_t reusable = (int64_t(seq.tokens.size()) - 1) / options_.page_size;
    for (int64_t i = 0; i < reusable; ++i) {
      const uint64_t parent = i ? seq.page_content.back() : 0;
      auto hit = pool_.lookup_and_retain(
          parent, std::span<const int32_t>(seq.tokens.data() + i * options_.page_size, options_.page_size));
      if (!hit) break;
      seq.pages.push_back(hit->page);
      seq.page_content.push_back(hit->content);
      seq.num_computed += options_.page_size;
    }
  }
  const int64_t n = chunk_for(seq, budget);
  if (!ensure_pages(seq, seq.num_computed + n, /*may_preempt=*/false)) {
    release_pages(seq);
    return false;
  }
  stats_.prefix_hit_tokens += seq.num_computed;
  seq.started = true;
  plan.push_back({&seq, seq.num_computed, n});
  budget -= n;
  insert_by_id(running_, &seq);
  return true;
}

void Engine::publish_full_pages(Sequence& seq) {
  if (!options_.prefix_cache) return;
  const int64_t P = options_.page_size;
  const int64_t full = seq.num_computed / P;
  for (int64_t i = int64_t(seq.page_content.size()); i < full; ++i) {
    const uint64_t parent = i ? seq.page_content[i - 1] : 0;
    seq.page_content.push_back(
        pool_.publish(seq.pages[i], parent, std::span<const int32_t>(seq.tokens.data() + i * P, P)));
  }
}

FinishReason Engine::stop_check(const Sequence& seq) const {
  const auto& out = seq.result.output_ids;
  const int32_t last = out.back();
  auto listed = [last](const std::vector<int32_t>& ids) {
    return std::find(ids.begin(), ids.end(), last) != ids.end();
  };
  if (listed(stop_ids_) || listed(seq.request.stop_token_ids)) return FinishReason::stop;
  if (!seq.request.stop_strings.empty()) {
    const std::string text = options_.detokenize(out);
    for (const auto& s : seq.request.stop_strings)
      if (text.find(s) != std::string::npos) return FinishReason::stop;
  }
  if (int64_t(out.size()) >= seq.request.max_new_tokens) return FinishReason::length;
  if (int64_t(seq.tokens.size()) >= runner_->config().max_position_embeddings) return FinishReason::length;
  return FinishReason::none;
}

void Engine::finish(Sequence& seq, FinishReason reason) {
  erase_value(running_, &seq);
  release_pages(seq);
  seq.result.finish_reason = reason;
  seq.tokens = {};
}

std::vector<StepOutput> Engine::step() {
  std::vector<StepOutput> outputs = std::move(events_);
  events_.clear();
  std::vector<Scheduled> plan;
  int64_t budget = options_.max_batch_tokens;

  // Running sequences first, oldest first; a sequence short of pages preempts the newest.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Sequence& seq = *running_[i];
    const int64_t n = chunk_for(seq, budget);
    if (!ensure_pages(seq, seq.num_computed + n, /*may_preempt=*/true)) break;  // it preempted itself
    plan.push_back({&seq, seq.num_computed, n});
    budget -= n;
  }
  // Then admission, oldest first (preempted sequences keep their place by id). While a
  // weight update drains, only sequences that already started are readmitted.
  for (auto it = waiting_.begin(); it != waiting_.end() && budget > 0;) {
    Sequence& seq = **it;
    if (paused_ && !seq.started) {
      ++it;
      continue;
    }
    if (!admit(seq, budget, plan)) break;
    it = waiting_.erase(it);
  }
  if (plan.empty()) return outputs;

  ForwardBatch batch;
  std::vector<SampleRequest> samples;
  std::vector<Sequence*> sampled;
  for (const auto& s : plan) {
    for (int64_t t = s.begin; t < s.begin + s.count; ++t) {
      batch.tokens.push_back(s.seq->tokens[t]);
      batch.positions.push_back(int32_t(t));
      batch.page_tables.push_back(s.seq->pages.data());
    }
    if (s.begin + s.count == int64_t(s.seq->tokens.size())) {
      const auto& p = s.seq->request.sampling;
      samples.push_back({batch.size() - 1, p.temperature, p.top_k, p.top_p, p.seed, s.seq->stream,
                         uint64_t(s.seq->tokens.size()), s.seq->request.top_logprobs});
      sampled.push_back(s.seq);
    }
  }
  std::vector<SampleResult> drawn = runner_->forward_sample(batch, samples);
  ++stats_.steps;
  stats_.forward_tokens += batch.size();

  for (const auto& s : plan) {
    s.seq->num_computed += s.count;
    publish_full_pages(*s.seq);
  }
  for (size_t i = 0; i < sampled.size(); ++i) {
    Sequence& seq = *sampled[i];
    seq.tokens.push_back(drawn[i].token);
    seq.result.output_ids.push_back(drawn[i].token);
    seq.result.logprobs.push_back(drawn[i].logprob);
    seq.result.weight_versions.push_back(weight_version_);
    TokenOutput token{drawn[i].token, drawn[i].logprob, weight_version_, {}};
    token.top.assign(drawn[i].top, drawn[i].top + drawn[i].num_top);
    if (seq.request.top_logprobs > 0) seq.result.top_logprobs.push_back(token.top);
    StepOutput out{seq.id, {std::move(token)}, stop_check(seq)};
    if (out.finished()) finish(seq, out.finish_reason);
    outputs.push_back(std::move(out));
  }
  return outputs;
}

std::vector<StepOutput> Engine::run_to_completion() {
  std::vector<StepOutput> all;
  while (has_unfinished())
    for (auto& out : step()) all.push_back(std::move(out));
  return all;
}

const RequestResult& Engine::result(RequestId id) const {
  auto it = sequences_.find(id);
  LS_CHECK(it != sequences_.end(), "rollout engine: unknown request id ", id);
  return it->second.result;
}

RequestResult Engine::take_result(RequestId id) {
  auto it = sequences_.find(id);
  LS_CHECK(it != sequences_.end(), "rollout engine: unknown request id ", id);
  LS_CHECK(it->second.result.finished(), "rollout engine: request ", id, " has not finished");
  RequestResult r = std::move(it->second.result);
  sequences_.erase(it);
  return r;
}

std::vector<StepOutput> Engine::begin_weight_update(UpdatePolicy policy) {
  LS_CHECK(!updating_,
           "rollout engine: begin_weight_update while a weight update is already in progress (call "
           "end_weight_update first)");
  paused_ = true;
  std::vector<StepOutput> outputs;
  if (policy == UpdatePolicy::abort) {
    std::vector<RequestId> started;
    for (Sequence* s : running_) started.push_back(s->id);
    for (Sequence* s : waiting_)
      if (s->started) started.push_back(s->id);
    for (RequestId id : started) abort(id);
    outputs = std::move(events_);
    events_.clear();
  }
  // Drain: step until no started sequence is left (new ones wait, admission is paused).
  auto in_flight = [this] {
    return !running_.empty() || std::any_of(waiting_.begin(), waiting_.end(), [](auto* s) { return s->started; });
  };
  while (in_flight() || !events_.empty())
    for (auto& out : step()) outputs.push_back(std::move(out));
  // No page is referenced now: the cache holds only old-weight K/V; forget all of it.
  pool_.flush();
  updating_ = true;
  return outputs;
}

void Engine::load_weight_bucket(const std::vector<WeightPiece>& pieces) {
  LS_CHECK(updating_, "rollout engine: load_weight_bucket outside a weight update (call begin_weight_update first)");
  runner_->load_weight_bucket(pieces);
}

void Engine::end_weight_update() {
  LS_CHECK(updating_, "rollout engine: end_weight_update without begin_weight_update");
  updating_ = false;
  ++weight_version_;
  paused_ = false;
}

std::vector<StepOutput> Engine::update_weights(const ModelWeights& weights, UpdatePolicy policy) {
  std::vector<StepOutput> outputs = begin_weight_update(policy);
  runner_->load_weights(weights);
  end_weight_update();
  return outputs;
}

}  // namespace lockstep::rollout
