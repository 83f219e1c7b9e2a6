// lockstep generate: sample continuations of token-id prompts with the rollout engine
// (docs/rollout.md).
//
// Input: JSONL, one request per line: {"input_ids":[...]} with optional per-request "seed",
// "max_new_tokens", "temperature", "top_p", "top_k" and "stop_token_ids" (the command-line
// values are the defaults). When the model directory has a tokenizer.json, a request may give
// text instead of ids: {"prompt":"..."} (encoded as is) or {"messages":[...]} (rendered by the
// Qwen3 chat template with "add_generation_prompt" (default true) and "enable_thinking"
// (default true)), and "stop":["..."] stop strings; the output then carries "text" (the
// decoded output, special tokens skipped) and the tokenizer's EOS ids stop generation. Without "seed", a request's seed is derived from --seed and its
// line number, so a request gives the same output whatever else is in the file.
// Output: one line per request, in input order:
//   {"output_ids":[...],"logprobs":[...],"weight_version":V,"finish_reason":"stop|length|abort"}
// with log-probs of the sampled tokens under softmax(logits / T) (T = 1 when greedy), printed
// with %.9g so they round-trip exactly.
// A bad request (prompt longer than the context, empty prompt, ids out of range, top_p outside
// (0, 1], negative temperature, negative top_k, a field of the wrong type) gets the line
//   {"error":"<input>:<line>: <field and message>"}
// in its place; the other requests are served normally (bit for bit as if alone), each error
// is also printed to stderr, and the exit status is 1 when any request failed (0 otherwise).
// Errors in the command itself (flags, model, unreadable input) exit non-zero before any output.
// Under mpirun or with topology flags (topology_flags.h) the engine runs on a ParallelRunner
// (parallel/parallel_runner.h); independent DP replicas each run their share of the requests
// (rollout/replica_split.h). The output is the single-rank bytes, written by rank 0; the
// topology is checked against the model before any input or weight is read.
#include <algorithm>
#include <memory>
#include <optional>

#include <nlohmann/json.hpp>

#include "command_registry.h"
#include "core/device_memory.h"
#include "core/error.h"
#include "core/json_int.h"
#include "core/jsonl.h"
#include "core/output_path.h"
#include "core/philox.h"
#include "dist/mpi_communicator.h"
#include "model/kv_cache.h"
#include "parallel/parallel_runner.h"
#include "rollout/replica_split.h"
#include "rollout/engine.h"
#include "tokenizer/chat_json.h"
#include "tokenizer/tokenizer.h"
#include "topology_flags.h"

namespace lockstep::cli {
namespace {

struct GenerateOptions {
  std::string model, input = "-", output = "-", dtype = "float32", device = "cpu";
  int64_t max_new_tokens = 0;
  float temperature = 1.0f, top_p = 1.0f;
  int32_t top_k = 0;
  uint64_t seed = 0;
  int64_t max_batch_tokens = 2048, kv_pages = 0, page_size = 16, prefill_chunk = 512;
  TopologyRequest topology;  // parallel forms (mpirun)
};

template <typename T>
T field_or(const JsonlRecord& r, const char* key, T fallback, bool (nlohmann::json::*is_type)() const noexcept,
           const char* expected) {
  if (!r.value.contains(key)) return fallback;
  const auto& v = r.value[key];
  LS_CHECK((v.*is_type)(), "field '", key, "' must be ", expected, ", got ", v.dump());
  return v.get<T>();
}

rollout::GenerationRequest finish_request(const JsonlRecord& r, const GenerateOptions& o, const ModelConfig& config,
                                          rollout::GenerationRequest q);

// Token ids of a text request: "prompt" as is, or "messages" through the chat template.
std::vector<int32_t> encode_text_request(const JsonlRecord& r, const Tokenizer* tokenizer) {
  LS_CHECK(tokenizer, "fields 'prompt' and 'messages' need a tokenizer.json in the model directory; give 'input_ids'");
  if (r.value.contains("prompt")) {
    LS_CHECK(r.value["prompt"].is_string(), "field 'prompt' must be a string, got ", r.value["prompt"].dump());
    return tokenizer->encode(r.value["prompt"].get<std::string>());
  }
  ChatOptions chat;
  chat.add_generation_prompt =
      field_or<bool>(r, "add_generation_prompt", true, &nlohmann::json::is_boolean, "true or false");
  chat.enable_thinking = field_or<bool>(r, "enable_thinking", true, &nlohmann::json::is_boolean, "true or false");
  auto messages = chat_messages_from_json(nlohmann::ordered_json(r.value["messages"]), "messages");
  return tokenizer->encode(tokenizer->render_chat(messages, chat));
}

rollout::GenerationRequest parse_request(const JsonlRecord& r, const GenerateOptions& o, const ModelConfig& config,
                                         const Tokenizer* tokenizer) {
  rollout::GenerationRequest q;
  if (!r.value.contains("input_ids") && (r.value.contains("prompt") || r.value.contains("messages"))) {
    for (int32_t id : encode_text_request(r, tokenizer)) q.prompt.push_back(id);
    LS_CHECK(!q.prompt.empty(), "the prompt encodes to no tokens");
    for (int32_t id : q.prompt)
      LS_CHECK(id < config.vocab_size, "the prompt encodes to token id ", id,
               ", out of the model's vocab_size ", config.vocab_size);
  }
  if (tokenizer)
    for (int32_t id : tokenizer->eos_token_ids())
      if (id < config.vocab_size) q.stop_token_ids.push_back(id);
  if (r.value.contains("stop")) {
    LS_CHECK(tokenizer, "field 'stop' (stop strings) needs a tokenizer.json in the model directory");
    const auto& v = r.value["stop"];
    LS_CHECK(v.is_array(), "field 'stop' must be a list of strings, got ", v.dump());
    for (const auto& e : v) {
      LS_CHECK(e.is_string() && !e.get<std::string>().empty(), "stop: ", e.dump(), " is not a non-empty string");
      q.stop_strings.push_back(e.get<std::string>());
    }
  }
  if (!q.prompt.empty()) return finish_request(r, o, config, std::move(q));
  LS_CHECK(r.value.contains("input_ids"), "missing field 'input_ids'");
  const auto& ids = r.value["input_ids"];
  LS_CHECK(ids.is_array(), "field 'input_ids' must be a list of token ids, got ", ids.dump());
  for (size_t i = 0; i < ids.size(); ++i) {
    LS_CHECK(ids[i].is_number_integer(), "input_ids[", i, "] must be an integer, got ", ids[i].dump());
    const int64_t id = ids[i].get<int64_t>();
    LS_CHECK(id >= 0 && id < config.vocab_size, "input_ids[", i, "] = ", id, " is out of range [0, ",
             config.vocab_size, ")");
    q.prompt.push_back(int32_t(id));
  }
  return finish_request(r, o, config, std::move(q));
}

// Sampling fields, seed and stop ids, common to id and text requests.
rollout::GenerationRequest finish_request(const JsonlRecord& r, const GenerateOptions& o, const ModelConfig& config,
                                          rollout::GenerationRequest q) {
  q.max_new_tokens = r.value.contains("max_new_tokens")
                         ? json_int(r.value["max_new_tokens"], 0, INT64_MAX, "field 'max_new_tokens'")
                         : o.max_new_tokens;
  q.sampling.temperature =
      field_or<float>(r, "temperature", o.temperature, &nlohmann::json::is_number, "a number");
  q.sampling.top_p = field_or<float>(r, "top_p", o.top_p, &nlohmann::json::is_number, "a number");
  q.sampling.top_k =
      int32_t(r.value.contains("top_k") ? json_int(r.value["top_k"], 0, INT32_MAX, "field 'top_k'") : o.top_k);
  q.sampling.seed = r.value.contains("seed")
                        ? field_or<uint64_t>(r, "seed", 0, &nlohmann::json::is_number_unsigned, "a non-negative integer")
                        : mix_seed(o.seed, uint64_t(r.line));
  if (r.value.contains("stop_token_ids")) {
    const auto& v = r.value["stop_token_ids"];
    LS_CHECK(v.is_array(), "field 'stop_token_ids' must be a list of token ids, got ", v.dump());
    for (const auto& e : v)
      q.stop_token_ids.push_back(int32_t(json_int(e, 0, config.vocab_size - 1, "stop_token_ids: each id")));
  }
  rollout::validate_request(q, config);
  return q;
}

std::string error_line(const std::string& message) { return nlohmann::json{{"error", message}}.dump(); }

int run_generate(const GenerateOptions& o) {
  check_output_differs(o.output, {o.input}, "--output");
  const Precision precision = precision_from_name(o.dtype);
  const Device device = device_from_name(o.device);
  LS_CHECK(device == Device::cpu || cuda_available(), "--device cuda: no CUDA device is available in this build");
  LS_CHECK(o.max_new_tokens >= 0, "--max-new-tokens must be >= 0, got ", o.max_new_tokens);
  rollout::check_engine_flags(o.page_size, o.max_batch_tokens, o.prefill_chunk, o.kv_pages);
  LS_CHECK(o.top_k >= 0, "--top-k must be >= 0 (0 = off), got ", o.top_k);
  auto world = dist::world_communicator();
  const bool parallel = o.topology.parallel() || world->size() > 1;
  LS_CHECK(!parallel || device == Device::cpu,
           "the parallel forms of generate run on --device cpu (the GPU forms are not built yet)");
  std::optional<ResolvedTopology> topology;  // checked before any input or weight is read
  if (parallel) topology = resolve_topology(o.topology, ModelConfig::load(o.model + "/config.json"), world->size());
  const bool writer = world->rank() == 0;
  auto records = read_jsonl(o.input);  // read and check all input before any compute
  std::unique_ptr<ModelRunner> runner;
  int replicas = 1, replica = 0;  // independent DP replicas of the engine split the requests
  rollout::ReplicaGather gather;
  if (parallel) {
    auto pr = load_parallel_runner(*world, o.model, ModelConfig::load(o.model + "/config.json"), *topology, precision);
    replicas = pr->replicas();
    replica = pr->replica();
    gather = [p = pr.get()](const std::string& blob) { return p->gather_from_replicas(blob); };
    runner = std::move(pr);
  } else
    runner = make_runner(device, ModelWeights::load(o.model, precision), precision);
  std::optional<Tokenizer> tokenizer;
  if (Tokenizer::available(o.model)) tokenizer = Tokenizer::load(o.model);
  const ModelConfig config = runner->config();

  // Parse every request; a bad one gets its error line and the others go on.
  std::vector<std::string> errors(records.size());
  std::vector<rollout::GenerationRequest> requests(records.size());
  int64_t pages_for_all = 1, pages_for_largest = 1;
  for (size_t i = 0; i < records.size(); ++i) {
    try {
      requests[i] = parse_request(records[i], o, config, tokenizer ? &*tokenizer : nullptr);
      const int64_t positions = rollout::request_positions(requests[i], config);
      int64_t pages = (positions + o.page_size - 1) / o.page_size;
      pages_for_all += pages;
      pages_for_largest = std::max(pages_for_largest, pages);
    } catch (const Error& e) {
      errors[i] = o.input + ":" + std::to_string(records[i].line) + ": " + e.what();
    }
  }

  rollout::EngineOptions options;
  // Automatic pool: every request at once, but no more than 4 GiB of K/V unless the largest
  // single request needs it (the engine preempts and recomputes when pages run short).
  const int64_t pages_in_4gib = (int64_t(4) << 30) / KvCache::page_bytes(config, o.page_size);
  options.kv_pages =
      o.kv_pages > 0 ? o.kv_pages : std::max(pages_for_largest, std::min(pages_for_all, pages_in_4gib));
  options.page_size = o.page_size;
  options.max_batch_tokens = o.max_batch_tokens;
  options.prefill_chunk = o.prefill_chunk;
  if (tokenizer) options.detokenize = [tok = *tokenizer](const std::vector<int32_t>& ids) { return tok.decode(ids); };
  rollout::Engine engine(std::move(runner), options);
  std::vector<std::optional<rollout::GenerationRequest>> to_run(records.size());
  for (size_t i = 0; i < records.size(); ++i)
    if (errors[i].empty()) to_run[i] = requests[i];
  const auto outcomes = rollout::run_on_replicas(engine, to_run, replicas, replica, gather);
  for (size_t i = 0; i < records.size(); ++i)
    if (errors[i].empty() && !outcomes[i].error.empty())
      errors[i] = o.input + ":" + std::to_string(records[i].line) + ": " + outcomes[i].error;
  if (!writer) {  // every rank knows every outcome; rank 0 writes the output
    const bool any_failed = std::any_of(errors.begin(), errors.end(), [](const auto& e) { return !e.empty(); });
    return any_failed ? 1 : 0;
  }

  JsonlWriter out(o.output);
  int64_t failed = 0;
  for (size_t i = 0; i < records.size(); ++i) {
    if (!errors[i].empty()) {
      ++failed;
      std::fprintf(stderr, "lockstep generate: error: %s\n", errors[i].c_str());
      out.write_line(error_line(errors[i]));
      continue;
    }
    const rollout::RequestResult& r = outcomes[i].result;
    const int64_t version = r.weight_versions.empty() ? engine.weight_version() : r.weight_versions.front();
    out.write_line("{\"output_ids\":" + format_ints(r.output_ids) +
                   ",\"logprobs\":" + format_floats(r.logprobs.data(), r.logprobs.size()) +
                   ",\"weight_version\":" + std::to_string(version) + ",\"finish_reason\":\"" +
                   rollout::finish_reason_name(r.finish_reason) + "\"" +
                   (tokenizer ? ",\"text\":" + nlohmann::json(tokenizer->decode(r.output_ids, true)).dump() : "") + "}");
  }
  out.close();
  if (failed > 0) {
    std::fprintf(stderr, "lockstep generate: %lld of %zu requests failed\n", (long long)failed, records.size());
    return 1;
  }
  return 0;
}

const bool registered = register_command(
    {"generate", "Sample continuations of token-id prompts (JSONL in, JSONL out)", [](CLI::App& sub) {
       auto o = std::make_shared<GenerateOptions>();
       sub.add_option("--model", o->model, "model directory")->required();
       sub.add_option("--input", o->input, "input JSONL ('-' = stdin)");
       sub.add_option("--output", o->output, "output JSONL ('-' = stdout)");
       sub.add_option("--max-new-tokens", o->max_new_tokens, "most new tokens per request")->required();
       sub.add_option("--temperature", o->temperature, "sampling temperature (0 = greedy)");
       sub.add_option("--top-p", o->top_p, "nucleus mass in (0, 1] (1 = off)");
       sub.add_option("--top-k", o->top_k, "keep the k most likely tokens (0 = off)");
       sub.add_option("--seed", o->seed, "base seed; a request without \"seed\" uses (seed, line number)");
       sub.add_option("--dtype", o->dtype, "float32 | bfloat16");
       sub.add_option("--device", o->device, "cpu | cuda");
       sub.add_option("--max-batch-tokens", o->max_batch_tokens, "tokens per engine step");
       sub.add_option("--kv-pages", o->kv_pages, "KV cache pages (0 = enough for every request at once)");
       sub.add_option("--page-size", o->page_size, "positions per KV page");
       sub.add_option("--prefill-chunk", o->prefill_chunk, "most prompt tokens of one request per step");
       add_topology_flags(sub, o->topology);
       return std::function<int()>([o] { return run_generate(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
