// The OpenAI response shapes for one request: the whole JSON answer (stream: false) or SSE
// events as the choices grow (stream: true), with lockstep's extension fields:
//   each choice: "output_ids" (every sampled token, stop tokens included), "output_logprobs"
//   (their fp32 log-probs; a JSON number round-trips the float exactly) and "weight_version";
//   the response (or the last stream event): "prompt_ids".
// finish_reason is "stop", "length" or "abort" (cancelled, or ended by a weight update).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "serve/choice_text.h"
#include "serve/openai_request.h"
#include "serve/scheduler.h"

namespace lockstep::serve {

class ResponseWriter {
 public:
  ResponseWriter(const ApiRequest& request, const ServedModel& model, std::string id, int64_t created);

  // The whole answer once every choice finished.
  nlohmann::ordered_json full(const Ticket::Snapshot& state);
  // "data: {...}\n\n" events for what is new in `state`; after the last choice finished,
  // also the usage event (when asked for) and "data: [DONE]\n\n".
  std::string stream_events(const Ticket::Snapshot& state);

 private:
  nlohmann::ordered_json envelope(const char* object) const;
  nlohmann::ordered_json logprobs_json(const ChoiceState& choice, size_t begin, size_t end, size_t text_offset) const;
  nlohmann::ordered_json token_bytes(int32_t id) const;
  nlohmann::ordered_json usage(const Ticket::Snapshot& state) const;
  std::string token_text(int32_t id) const;

  const ApiRequest& request_;
  const ServedModel& model_;
  std::string id_;
  int64_t created_;
  std::vector<ChoiceText> texts_;
  std::vector<size_t> streamed_tokens_;  // per choice, tokens already sent
  std::vector<size_t> streamed_text_;    // per choice, text bytes already sent
  std::vector<bool> streamed_finish_;
  bool sent_role_ = false, sent_done_ = false;
};

}  // namespace lockstep::serve
