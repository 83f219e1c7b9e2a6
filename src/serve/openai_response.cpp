#include "serve/openai_response.h"

namespace lockstep::serve {

using Json = nlohmann::ordered_json;

ResponseWriter::ResponseWriter(const ApiRequest& request, const ServedModel& model, std::string id, int64_t created)
    : request_(request), model_(model), id_(std::move(id)), created_(created) {
  for (int64_t i = 0; i < request.n; ++i) texts_.emplace_back(model.tokenizer, request.stop);
  streamed_tokens_.assign(request.n, 0);
  streamed_text_.assign(request.n, 0);
  streamed_finish_.assign(request.n, false);
}

Json ResponseWriter::envelope(const char* object) const {
  return {{"id", id_}, {"object", object}, {"created", created_}, {"model", model_.name}};
}

std::string ResponseWriter::token_text(int32_t id) const {
  return model_.tokenizer ? decode_known(*model_.tokenizer, {id}, false) : std::to_string(id);
}

Json ResponseWriter::token_bytes(int32_t id) const {
  Json bytes = Json::array();
  if (model_.tokenizer && id < model_.tokenizer->vocab_size())
    for (unsigned char b : model_.tokenizer->token_bytes(id)) bytes.push_back(int(b));
  return bytes;
}

// The top log-probs (request_.top_logprobs of them per token) come in the engine's order: by
// log-prob descending, ties to the lower token id.
Json ResponseWriter::logprobs_json(const ChoiceState& c, size_t begin, size_t end, size_t text_offset) const {
  const auto& ids = c.output_ids;
  if (request_.endpoint == Endpoint::chat) {
    Json content = Json::array();
    for (size_t t = begin; t < end; ++t) {
      Json top = Json::array();
      for (const TopLogprob& x : c.top_logprobs[t])
        top.push_back({{"token", token_text(x.token)}, {"logprob", x.logprob}, {"bytes", token_bytes(x.token)}});
      content.push_back({{"token", token_text(ids[t])},
                         {"logprob", c.logprobs[t]},
                         {"bytes", token_bytes(ids[t])},
                         {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  Json tokens = Json::array(), values = Json::array(), offsets = Json::array(), tops = Json::array();
  for (size_t t = begin; t < end; ++t) {
    std::string s = token_text(ids[t]);
    offsets.push_back(text_offset);
    text_offset += s.size();
    tokens.push_back(std::move(s));
    values.push_back(c.logprobs[t]);
    Json top = Json::object();  // text -> log-prob; two ids of one text keep the more likely
    for (const TopLogprob& x : c.top_logprobs[t])
      if (!top.contains(token_text(x.token))) top[token_text(x.token)] = x.logprob;
    tops.push_back(std::move(top));
  }
  return {{"tokens", tokens},
          {"token_logprobs", values},
          {"top_logprobs", request_.top_logprobs > 0 ? tops : Json(nullptr)},
          {"text_offset", offsets}};
}

Json ResponseWriter::usage(const Ticket::Snapshot& state) const {
  int64_t completion = 0;
  for (const auto& c : state.choices) completion += int64_t(c.output_ids.size());
  const int64_t prompt = int64_t(request_.prompt.size());
  return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

Json ResponseWriter::full(const Ticket::Snapshot& state) {
  const bool chat = request_.endpoint == Endpoint::chat;
  Json out = envelope(chat ? "chat.completion" : "text_completion");
  Json choices = Json::array();
  for (size_t i = 0; i < state.choices.size(); ++i) {
    const ChoiceState& c = state.choices[i];
    ChoiceText& text = texts_[i];
    for (int32_t id : c.output_ids) text.push(id);
    text.finish();
    Json choice = {{"index", i}};
    if (chat)
      choice["message"] = {{"role", "assistant"}, {"content", text.text()}};
    else
      choice["text"] = text.text();
    choice["logprobs"] = request_.logprobs ? logprobs_json(c, 0, c.output_ids.size(), 0) : Json(nullptr);
    choice["finish_reason"] = rollout::finish_reason_name(c.finish_reason);
    choice["output_ids"] = c.output_ids;
    choice["output_logprobs"] = c.logprobs;
    choice["weight_version"] = c.weight_version;
    if (!c.error.empty()) choice["error"] = c.error;
    choices.push_back(std::move(choice));
  }
  out["choices"] = std::move(choices);
  out["usage"] = usage(state);
  out["prompt_ids"] = request_.prompt;
  return out;
}

std::string ResponseWriter::stream_events(const Ticket::Snapshot& state) {
  const bool chat = request_.endpoint == Endpoint::chat;
  const char* object = chat ? "chat.completion.chunk" : "text_completion";
  auto event = [](const Json& j) { return "data: " + j.dump(-1, ' ', false, Json::error_handler_t::replace) + "\n\n"; };
  std::string events;
  if (chat && !sent_role_) {  // OpenAI's first chat chunk carries the role
    Json first = envelope(object);
    Json choices = Json::array();
    for (size_t i = 0; i < state.choices.size(); ++i)
      choices.push_back({{"index", i},
                         {"delta", {{"role", "assistant"}, {"content", ""}}},
                         {"logprobs", nullptr},
                         {"finish_reason", nullptr}});
    first["choices"] = std::move(choices);
    first["prompt_ids"] = request_.prompt;
    events += event(first);
    sent_role_ = true;
  }
  for (size_t i = 0; i < state.choices.size(); ++i) {
    const ChoiceState& c = state.choices[i];
    if (streamed_finish_[i]) continue;
    const size_t begin = streamed_tokens_[i], end = c.output_ids.size();
    const bool finished = c.finish_reason != rollout::FinishReason::none;
    if (begin == end && !finished) continue;
    ChoiceText& text = texts_[i];
    for (size_t t = begin; t < end; ++t) text.push(c.output_ids[t]);
    if (finished) text.finish();
    const size_t text_offset = streamed_text_[i];
    const std::string delta = text.take_new();
    streamed_text_[i] += delta.size();
    Json choice = {{"index", i}};
    if (chat)
      choice["delta"] = {{"content", delta}};
    else
      choice["text"] = delta;
    choice["logprobs"] = request_.logprobs ? logprobs_json(c, begin, end, text_offset) : Json(nullptr);
    choice["finish_reason"] = finished ? Json(rollout::finish_reason_name(c.finish_reason)) : Json(nullptr);
    choice["output_ids"] = std::vector<int32_t>(c.output_ids.begin() + begin, c.output_ids.end());
    choice["output_logprobs"] = std::vector<float>(c.logprobs.begin() + begin, c.logprobs.end());
    choice["weight_version"] = c.weight_version;
    if (!c.error.empty()) choice["error"] = c.error;
    Json chunk = envelope(object);
    chunk["choices"] = Json::array({std::move(choice)});
    if (!chat && !sent_role_) {  // completions: prompt_ids ride on the first chunk
      chunk["prompt_ids"] = request_.prompt;
      sent_role_ = true;
    }
    events += event(chunk);
    streamed_tokens_[i] = end;
    streamed_finish_[i] = finished;
  }
  if (state.done && !sent_done_) {
    if (request_.include_usage) {
      Json tail = envelope(object);
      tail["choices"] = Json::array();
      tail["usage"] = usage(state);
      events += event(tail);
    }
    events += "data: [DONE]\n\n";
    sent_done_ = true;
  }
  return events;
}

}  // namespace lockstep::serve
