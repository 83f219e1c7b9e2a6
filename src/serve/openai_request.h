// Parsing and validation of OpenAI request bodies (/v1/completions, /v1/chat/completions)
// into engine requests. Every refusal is an ApiError (400) naming the field and what was
// expected; nothing here touches the engine, so it is safe to call from any thread and to fuzz.
//
// Conventions: a field given as null counts as absent. Unknown fields are ignored (clients
// send many); fields that would change the numbers but are not implemented (penalties,
// top alternatives) are refused rather than ignored. `n` choices share the prompt; choice i
// samples with seed + i, so a choice is reproducible by a request with n = 1 and that seed.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "model/config.h"
#include "rollout/request.h"
#include "serve/api_error.h"
#include "tokenizer/tokenizer.h"

namespace lockstep::serve {

enum class Endpoint { completions, chat };

// What the parser needs to know about the served model.
struct ServedModel {
  std::string name;  // the "model" a request must name
  const ModelConfig* config = nullptr;
  const Tokenizer* tokenizer = nullptr;  // null: token-id prompts only
};

struct ApiRequest {
  Endpoint endpoint = Endpoint::completions;
  std::vector<int32_t> prompt;
  int64_t n = 1;
  int64_t max_tokens = 16;
  rollout::SamplingParams sampling;  // seed of choice 0
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;  // the tokenizer's and config's EOS ids unless ignore_eos, plus any given
  bool logprobs = false;
  int32_t top_logprobs = 0;  // chat "top_logprobs", or completions "logprobs": N
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage

  // The engine request of choice `i` (seed + i).
  rollout::GenerationRequest choice(int64_t i) const;
};

// Limits that are the server's, not the model's.
inline constexpr int64_t kMaxChoices = 64;
inline constexpr size_t kMaxStopStrings = 16;

ApiRequest parse_api_request(std::string_view body, Endpoint endpoint, const ServedModel& model);

}  // namespace lockstep::serve
