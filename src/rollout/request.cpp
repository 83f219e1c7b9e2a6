#include "rollout/request.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/philox.h"

namespace lockstep::rollout {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::abort: return "abort";
    case FinishReason::none: break;
  }
  return "none";
}

uint64_t sampling_stream(uint64_t seed) { return mix_seed(seed, 0x726f6c6c6f7574ull /* "rollout" */); }

void validate_request(const GenerationRequest& r, const ModelConfig& config) {
  LS_CHECK(!r.prompt.empty(), "input_ids: the prompt is empty (expected at least one token)");
  const int64_t n = int64_t(r.prompt.size());
  LS_CHECK(n < config.max_position_embeddings, "input_ids: the prompt has ", n, " tokens, but the context holds ",
           config.max_position_embeddings, " (max_position_embeddings) and must leave room for one new token");
  for (int64_t i = 0; i < n; ++i)
    LS_CHECK(r.prompt[i] >= 0 && r.prompt[i] < config.vocab_size, "input_ids[", i, "] = ", r.prompt[i],
             " is out of range [0, ", config.vocab_size, ")");
  const auto& s = r.sampling;
  LS_CHECK(valid_temperature(s.temperature), "temperature = ", s.temperature,
           " is invalid (expected 0 for greedy, or a finite value >= ", kMinTemperature,
           ": logits divided by a smaller one overflow)");
  LS_CHECK(s.top_p > 0.0f && s.top_p <= 1.0f, "top_p = ", s.top_p, " is outside (0, 1]");
  LS_CHECK(s.top_k >= 0, "top_k = ", s.top_k, " is negative (expected >= 0; 0 = off)");
  LS_CHECK(r.max_new_tokens >= 0, "max_new_tokens = ", r.max_new_tokens, " is negative");
  check_top_logprobs_count(r.top_logprobs);
  for (const auto& str : r.stop_strings) LS_CHECK(!str.empty(), "stop_strings: an empty stop string");
}

int64_t request_positions(const GenerationRequest& r, const ModelConfig& config) {
  const int64_t context = config.max_position_embeddings, prompt = int64_t(r.prompt.size());
  return std::min(context, prompt + std::min(r.max_new_tokens, context));
}

void check_engine_flags(int64_t page_size, int64_t max_batch_tokens, int64_t prefill_chunk, int64_t kv_pages) {
  auto in = [](int64_t v, int64_t lo, int64_t hi, const char* flag) {
    LS_CHECK(v >= lo && v <= hi, flag, " must be in [", lo, ", ", hi, "], got ", v);
  };
  in(page_size, 1, 4096, "--page-size");
  in(max_batch_tokens, 1, int64_t(1) << 24, "--max-batch-tokens");
  in(prefill_chunk, 1, int64_t(1) << 24, "--prefill-chunk");
  in(kv_pages, 0, int64_t(1) << 24, "--kv-pages (0 = automatic)");
}

}  // namespace lockstep::rollout
