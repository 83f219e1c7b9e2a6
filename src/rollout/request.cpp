#include "rollout/request.h"

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
  LS_CHECK(n < config.max_position_embeddings, "input_ids: the prompt has ", n,
           " tokens, but the context holds ", config.max_position_embeddings,
           " (max_position_embeddings) and must leave room for one new token");
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
  for (const auto& str : r.stop_strings) LS_CHECK(!str.empty(), "stop_strings: an empty stop string");
}

}  // namespace lockstep::rollout
