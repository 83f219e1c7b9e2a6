#include "serve/openai_request.h"

#include <cmath>
#include <random>

#include "core/error.h"
#include "core/json_int.h"
#include "core/json_parse.h"
#include "tokenizer/chat_json.h"

namespace lockstep::serve {

namespace {

using Json = nlohmann::ordered_json;

// A field or nothing: null counts as absent.
const Json* find(const Json& body, const char* key) {
  auto it = body.find(key);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

std::string got(const Json& v) {
  std::string s = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

int64_t int_field(const Json& body, const char* key, int64_t fallback, int64_t lo, int64_t hi) {
  const Json* v = find(body, key);
  if (!v) return fallback;
  std::string expected = "expected an integer in [";
  expected += std::to_string(lo) + ", " + std::to_string(hi) + "], got " + got(*v);
  const auto x = json_int_in(*v, lo, hi);
  if (!x) throw bad_field(key, expected);
  return *x;
}

float number_field(const Json& body, const char* key, float fallback) {
  const Json* v = find(body, key);
  if (!v) return fallback;
  if (!v->is_number()) throw bad_field(key, "expected a number, got " + got(*v));
  return v->get<float>();
}

bool bool_field(const Json& body, const char* key, bool fallback) {
  const Json* v = find(body, key);
  if (!v) return fallback;
  if (!v->is_boolean()) throw bad_field(key, "expected true or false, got " + got(*v));
  return v->get<bool>();
}

std::vector<int32_t> token_ids(const Json& array, const std::string& param, const ModelConfig& config) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < array.size(); ++i) {
    const Json& e = array[i];
    const std::string where = param + "[" + std::to_string(i) + "]";
    if (!e.is_number_integer()) throw bad_field(where, "expected a token id (an integer), got " + got(e));
    if (e.is_number_unsigned() ? e.get<uint64_t>() >= uint64_t(config.vocab_size)
                               : (e.get<int64_t>() < 0 || e.get<int64_t>() >= config.vocab_size))
      throw bad_field(where, got(e) + " is out of range [0, " + std::to_string(config.vocab_size) + ")");
    ids.push_back(e.get<int32_t>());
  }
  return ids;
}

std::vector<int32_t> encode_text(const std::string& text, const std::string& param, const ServedModel& model) {
  if (!model.tokenizer)
    throw bad_field(param,
                    "this model directory has no tokenizer.json, so text is not accepted; send the prompt as "
                    "an array of token ids");
  try {
    return model.tokenizer->encode(text);
  } catch (const Error& e) {
    throw bad_field(param, e.what());
  }
}

// "prompt": a string, an array of token ids, or an array holding exactly one of those.
std::vector<int32_t> completion_prompt(const Json& body, const ServedModel& model) {
  const Json* p = find(body, "prompt");
  if (!p) throw bad_field("prompt", "missing (expected a string or an array of token ids)");
  const Json* one = p;
  if (p->is_array() && p->size() == 1 && ((*p)[0].is_string() || (*p)[0].is_array())) one = &(*p)[0];
  if (one->is_string()) return encode_text(one->get<std::string>(), "prompt", model);
  if (one->is_array()) {
    if (!one->empty() && (one->front().is_string() || one->front().is_array()))
      throw bad_field("prompt", "one prompt per request is supported (got a batch of " + std::to_string(one->size()) +
                                    "); send one request per prompt");
    return token_ids(*one, "prompt", *model.config);
  }
  throw bad_field("prompt", "expected a string or an array of token ids, got " + got(*p));
}

std::vector<int32_t> chat_prompt(const Json& body, const ServedModel& model) {
  const Json* messages = find(body, "messages");
  if (!messages || !messages->is_array() || messages->empty())
    throw bad_field("messages",
                    "expected a non-empty array of messages, got " + (messages ? got(*messages) : "nothing"));
  if (!model.tokenizer)
    throw bad_field("messages",
                    "this model directory has no tokenizer.json, so chat is not available; use "
                    "/v1/completions with token ids");
  ChatOptions options;
  if (const Json* kwargs = find(body, "chat_template_kwargs")) {
    if (!kwargs->is_object()) throw bad_field("chat_template_kwargs", "expected an object, got " + got(*kwargs));
    try {
      options.enable_thinking = bool_field(*kwargs, "enable_thinking", true);
    } catch (const ApiError& e) {
      throw bad_field("chat_template_kwargs.enable_thinking", "expected true or false");
    }
  }
  std::string text;
  try {
    if (const Json* tools = find(body, "tools")) options.tools = chat_tools_from_json(*tools, "tools");
    text = model.tokenizer->render_chat(chat_messages_from_json(*messages, "request"), options);
  } catch (const Error& e) {
    throw bad_field("messages", e.what());
  }
  return encode_text(text, "messages", model);
}

std::vector<std::string> stop_strings(const Json& body, const ServedModel& model) {
  const Json* v = find(body, "stop");
  if (!v) return {};
  std::vector<std::string> out;
  if (v->is_string())
    out.push_back(v->get<std::string>());
  else if (v->is_array()) {
    for (const Json& e : *v) {
      if (!e.is_string()) throw bad_field("stop", "expected a string or an array of strings, got " + got(*v));
      out.push_back(e.get<std::string>());
    }
  } else {
    throw bad_field("stop", "expected a string or an array of strings, got " + got(*v));
  }
  if (out.size() > kMaxStopStrings)
    throw bad_field("stop",
                    "at most " + std::to_string(kMaxStopStrings) + " stop strings, got " + std::to_string(out.size()));
  for (const auto& s : out)
    if (s.empty()) throw bad_field("stop", "a stop string is empty");
  if (!out.empty() && !model.tokenizer)
    throw bad_field("stop", "stop strings need a tokenizer.json in the model directory; use stop_token_ids");
  return out;
}

}  // namespace

rollout::GenerationRequest ApiRequest::choice(int64_t i) const {
  rollout::GenerationRequest r;
  r.prompt = prompt;
  r.sampling = sampling;
  r.sampling.seed = sampling.seed + uint64_t(i);
  r.max_new_tokens = max_tokens;
  r.stop_token_ids = stop_token_ids;
  r.stop_strings = stop;
  r.top_logprobs = top_logprobs;
  return r;
}

ApiRequest parse_api_request(std::string_view body_text, Endpoint endpoint, const ServedModel& model) {
  Json body;
  try {
    body = parse_ordered_json(body_text, "the request body");
  } catch (const Error& e) {
    throw bad_field("", e.what(), "invalid_json");
  }
  if (!body.is_object()) throw bad_field("", "the request body must be a JSON object, got " + got(body));
  const ModelConfig& config = *model.config;

  if (const Json* name = find(body, "model")) {
    if (!name->is_string()) throw bad_field("model", "expected a string, got " + got(*name));
    if (name->get<std::string>() != model.name)
      throw bad_field(
          "model",
          "the model '" + name->get<std::string>() + "' is not served here (this server serves '" + model.name + "')",
          "model_not_found");
  }

  ApiRequest r;
  r.endpoint = endpoint;
  r.prompt = endpoint == Endpoint::chat ? chat_prompt(body, model) : completion_prompt(body, model);
  const char* prompt_param = endpoint == Endpoint::chat ? "messages" : "prompt";
  if (r.prompt.empty()) throw bad_field(prompt_param, "the prompt is empty (expected at least one token)");
  const int64_t context = config.max_position_embeddings;
  if (int64_t(r.prompt.size()) >= context)
    throw bad_field(prompt_param,
                    "the prompt has " + std::to_string(r.prompt.size()) + " tokens, but the context holds " +
                        std::to_string(context) + " and must leave room for one new token",
                    "context_length_exceeded");
  for (size_t i = 0; i < r.prompt.size(); ++i)  // a tokenizer larger than the model's vocabulary
    if (r.prompt[i] >= config.vocab_size)
      throw bad_field(prompt_param, "the prompt encodes to token id " + std::to_string(r.prompt[i]) +
                                        ", out of the model's vocab_size " + std::to_string(config.vocab_size));

  const int64_t room = context - int64_t(r.prompt.size());
  // OpenAI's defaults: 16 new tokens for completions, the rest of the context for chat.
  const int64_t default_max = endpoint == Endpoint::chat ? room : 16;
  const bool has_mct = find(body, "max_completion_tokens") != nullptr;
  r.max_tokens = int_field(body, has_mct ? "max_completion_tokens" : "max_tokens", default_max, 1, int64_t(1) << 40);
  r.n = int_field(body, "n", 1, 1, kMaxChoices);

  r.sampling.temperature = number_field(body, "temperature", 1.0f);
  if (!rollout::valid_temperature(r.sampling.temperature))
    throw bad_field("temperature",
                    "expected 0 (greedy) or a finite number >= 1e-6 (smaller ones overflow the logits), got " +
                        got(body["temperature"]));
  r.sampling.top_p = number_field(body, "top_p", 1.0f);
  if (!(r.sampling.top_p > 0.0f && r.sampling.top_p <= 1.0f))
    throw bad_field("top_p", "expected a number in (0, 1], got " + got(body["top_p"]));
  const int64_t top_k = int_field(body, "top_k", 0, -1, INT32_MAX);
  r.sampling.top_k = int32_t(std::max<int64_t>(top_k, 0));  // -1 (vLLM's "off") = 0
  if (const Json* seed = find(body, "seed")) {
    if (!seed->is_number_integer()) throw bad_field("seed", "expected an integer, got " + got(*seed));
    r.sampling.seed = seed->is_number_unsigned() ? seed->get<uint64_t>() : uint64_t(seed->get<int64_t>());
  } else {
    static thread_local std::mt19937_64 fresh(std::random_device{}());
    r.sampling.seed = fresh();
  }
  for (const char* penalty : {"presence_penalty", "frequency_penalty"})
    if (number_field(body, penalty, 0.0f) != 0.0f)
      throw bad_field(penalty, "penalties are not supported (they would change the sampled distribution); expected 0");
  if (float rp = number_field(body, "repetition_penalty", 1.0f); rp != 1.0f)
    throw bad_field("repetition_penalty", "penalties are not supported; expected 1");

  // Fields that would change what is sampled or returned, refused rather than ignored.
  if (const Json* bias = find(body, "logit_bias"); bias && !(bias->is_object() && bias->empty()))
    throw bad_field("logit_bias", "not supported (it would change the sampled distribution); leave it out");
  if (int_field(body, "best_of", r.n, 1, kMaxChoices) != r.n)
    throw bad_field("best_of", "only best_of = n is supported (every sample is returned)");
  if (bool_field(body, "echo", false)) throw bad_field("echo", "not supported; the prompt's ids are in prompt_ids");
  if (const Json* suffix = find(body, "suffix"))
    throw bad_field("suffix", "not supported (Qwen3 has no fill-in-the-middle format here), got " + got(*suffix));

  r.stop = stop_strings(body, model);
  if (!bool_field(body, "ignore_eos", false)) {
    for (int64_t id : config.eos_token_ids) r.stop_token_ids.push_back(int32_t(id));
    if (model.tokenizer)
      for (int32_t id : model.tokenizer->eos_token_ids())
        if (id < config.vocab_size) r.stop_token_ids.push_back(id);
  }
  if (const Json* ids = find(body, "stop_token_ids")) {
    if (!ids->is_array()) throw bad_field("stop_token_ids", "expected an array of token ids, got " + got(*ids));
    for (int32_t id : token_ids(*ids, "stop_token_ids", config)) r.stop_token_ids.push_back(id);
  }

  if (endpoint == Endpoint::chat) {
    r.logprobs = bool_field(body, "logprobs", false);
    r.top_logprobs = int32_t(int_field(body, "top_logprobs", 0, 0, kMaxTopLogprobs));
    if (r.top_logprobs > 0 && !r.logprobs)
      throw bad_field("top_logprobs", "needs \"logprobs\": true, got top_logprobs " + std::to_string(r.top_logprobs));
  } else if (const Json* lp = find(body, "logprobs")) {
    if (lp->is_boolean()) {
      r.logprobs = lp->get<bool>();
    } else {
      r.top_logprobs = int32_t(int_field(body, "logprobs", 0, 0, kMaxTopLogprobs));
      r.logprobs = true;
    }
  }
  r.stream = bool_field(body, "stream", false);
  if (const Json* so = find(body, "stream_options")) {
    if (!so->is_object()) throw bad_field("stream_options", "expected an object, got " + got(*so));
    try {
      r.include_usage = bool_field(*so, "include_usage", false);
    } catch (const ApiError&) {
      throw bad_field("stream_options.include_usage", "expected true or false");
    }
  }
  return r;
}

}  // namespace lockstep::serve
