// What a caller asks the rollout engine for, and what it gets back (docs/rollout.md).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/runner.h"

namespace lockstep::rollout {

using RequestId = uint64_t;

// The smallest temperature above 0: logits up to 1e32 divided by it stay finite in f32.
inline constexpr float kMinTemperature = 1e-6f;
// 0 (greedy) or a finite temperature >= kMinTemperature.
inline bool valid_temperature(double t) { return t == 0 || (t >= kMinTemperature && t <= 3.4e38); }

struct SamplingParams {
  float temperature = 1.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 = off
  float top_p = 1.0f;        // 1 = off; must be in (0, 1]
  uint64_t seed = 0;         // random numbers are keyed by (seed, stream(seed), position)
};

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, at least one
  SamplingParams sampling;
  int64_t max_new_tokens = 16;
  std::vector<int32_t> stop_token_ids;    // in addition to the engine's EOS ids
  std::vector<std::string> stop_strings;  // needs EngineOptions::detokenize
  int32_t top_logprobs = 0;               // also report this many most likely tokens per step (<= 20)
};

enum class FinishReason { none, stop, length, abort };
const char* finish_reason_name(FinishReason r);

// One generated token with its log-prob (log softmax(logits / T) at the token, before
// top-k/top-p truncation; T = 1 when greedy) and the weight version that produced it.
struct TokenOutput {
  int32_t token = 0;
  float logprob = 0.0f;
  int64_t weight_version = 0;
  std::vector<TopLogprob> top;  // the request's top_logprobs most likely tokens (same log-softmax)
};

// What one engine step produced for one request: its new tokens, and whether it ended.
struct StepOutput {
  RequestId id = 0;
  std::vector<TokenOutput> tokens;
  FinishReason finish_reason = FinishReason::none;  // none while the request runs on
  bool finished() const { return finish_reason != FinishReason::none; }
};

// Everything a request produced so far.
struct RequestResult {
  std::vector<int32_t> output_ids;
  std::vector<float> logprobs;
  std::vector<int64_t> weight_versions;               // per token
  std::vector<std::vector<TopLogprob>> top_logprobs;  // per token, when the request asked for them
  FinishReason finish_reason = FinishReason::none;
  bool finished() const { return finish_reason != FinishReason::none; }
};

// Turns token ids into text; used to detect stop strings (the tokenizer plugs in here).
using Detokenizer = std::function<std::string(const std::vector<int32_t>&)>;

// The stream id that keys a request's random numbers: a function of its seed only, so a
// request draws the same numbers whatever arrives with it (docs/numerics.md, D5).
uint64_t sampling_stream(uint64_t seed);

// Checks a request against the model before it is queued; throws lockstep::Error naming the
// field, what was expected and what was found.
void validate_request(const GenerationRequest& request, const ModelConfig& config);

// Positions a request can fill: prompt + max_new_tokens, capped by the context, without
// overflow for any max_new_tokens up to INT64_MAX.
int64_t request_positions(const GenerationRequest& request, const ModelConfig& config);

// Range checks of the engine's sizing flags (generate, serve): each is bounded so products
// such as pages x page size x layers stay far from overflow. Errors name the flag.
void check_engine_flags(int64_t page_size, int64_t max_batch_tokens, int64_t prefill_chunk, int64_t kv_pages);

}  // namespace lockstep::rollout
