// lockstep serve: an OpenAI-compatible HTTP server over the rollout engine (docs/serve.md).
//
// One scheduler thread runs the engine continuously, so concurrent requests are batched; the
// tokens and log-probs a client gets are the engine's bits (the same as `lockstep generate`
// and `lockstep score`). Prints "lockstep serve: listening on http://HOST:PORT" on stdout
// once it accepts connections (--port 0 picks a free port). SIGTERM or SIGINT: refuse new
// requests, let the admitted ones finish (--drain-timeout, then abort them), exit 0.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <thread>

#include "command_registry.h"
#include "core/device_memory.h"
#include "core/error.h"
#include "model/kv_cache.h"
#include "model/runner.h"
#include "serve/choice_text.h"
#include "serve/scheduler.h"
#include "serve/server.h"
#include "tokenizer/tokenizer.h"

namespace lockstep::cli {
namespace {

struct ServeOptions {
  std::string model, dtype = "float32", device = "cpu", host = "127.0.0.1", served_model_name;
  int port = 30000;
  int64_t max_running = 64, max_queued = 256;
  int64_t max_batch_tokens = 2048, kv_pages = 0, page_size = 16, prefill_chunk = 512;
  double drain_timeout_s = 30.0;
};

int run_serve(const ServeOptions& o) {
  const Precision precision = precision_from_name(o.dtype);
  const Device device = device_from_name(o.device);
  LS_CHECK(device == Device::cpu || cuda_available(), "--device cuda: no CUDA device is available in this build");
  LS_CHECK(o.port >= 0 && o.port <= 65535, "--port must be in [0, 65535], got ", o.port);
  LS_CHECK(o.max_running > 0 && o.max_running <= (1 << 20) && o.max_queued >= 0 && o.max_queued <= (1 << 24),
           "--max-running-requests must be in [1, 2^20] and "
           "--max-queued-requests in [0, 2^24], got ",
           o.max_running, " and ", o.max_queued);
  rollout::check_engine_flags(o.page_size, o.max_batch_tokens, o.prefill_chunk, o.kv_pages);

  // Signals go to the waiting thread below, never to a worker: block them before any thread starts.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);  // a client that left is noticed by a failed write

  auto weights = ModelWeights::load(o.model, precision);
  const ModelConfig config = weights.config;
  std::optional<Tokenizer> tokenizer;
  if (Tokenizer::available(o.model)) tokenizer = Tokenizer::load(o.model);

  rollout::EngineOptions engine;
  // Automatic pool: every running request at full context, within 4 GiB of K/V, and never
  // less than one full-context request (the engine preempts when pages run short).
  const int64_t per_request = (config.max_position_embeddings + o.page_size - 1) / o.page_size;
  const int64_t pages_in_4gib = (int64_t(4) << 30) / KvCache::page_bytes(config, o.page_size);
  engine.kv_pages =
      o.kv_pages > 0 ? o.kv_pages : std::max(per_request, std::min(per_request * o.max_running, pages_in_4gib));
  engine.page_size = o.page_size;
  engine.max_batch_tokens = o.max_batch_tokens;
  engine.prefill_chunk = o.prefill_chunk;
  engine.use_config_eos = false;  // each request carries its EOS ids (so "ignore_eos" can drop them)
  if (tokenizer)
    engine.detokenize = [tok = *tokenizer](const std::vector<int32_t>& ids) {
      return serve::decode_known(tok, ids, false);
    };
  serve::Scheduler scheduler(make_runner(device, std::move(weights), precision), engine, {o.max_running, o.max_queued});

  serve::ServedModel model;
  model.name = o.served_model_name.empty() ? std::filesystem::path(o.model).lexically_normal().filename().string()
                                           : o.served_model_name;
  if (model.name.empty()) model.name = std::filesystem::path(o.model).lexically_normal().parent_path().filename();
  model.config = &scheduler.config();
  model.tokenizer = tokenizer ? &*tokenizer : nullptr;

  serve::ServerOptions server_options;
  server_options.host = o.host;
  server_options.port = o.port;
  server_options.precision = precision;
  server_options.http_threads = int(std::min<int64_t>(o.max_running + o.max_queued + 16, 1024));
  server_options.drain_timeout = std::chrono::milliseconds(int64_t(o.drain_timeout_s * 1000));
  serve::HttpServer server(server_options, scheduler, model);
  const int port = server.bind();
  std::thread http([&] { server.serve(); });
  std::printf("lockstep serve: listening on http://%s:%d (model '%s', %s)\n", o.host.c_str(), port, model.name.c_str(),
              tokenizer ? "with tokenizer" : "token ids only");
  std::fflush(stdout);

  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::fprintf(stderr, "lockstep serve: %s: draining\n", signal == SIGTERM ? "SIGTERM" : "SIGINT");
  server.stop();
  http.join();
  std::fprintf(stderr, "lockstep serve: stopped\n");
  return 0;
}

const bool registered = register_command(
    {"serve", "An OpenAI-compatible HTTP server over the rollout engine", [](CLI::App& sub) {
       auto o = std::make_shared<ServeOptions>();
       sub.add_option("--model", o->model, "model directory (config.json, safetensors, optional tokenizer.json)")
           ->required();
       sub.add_option("--dtype", o->dtype, "float32 | bfloat16");
       sub.add_option("--device", o->device, "cpu | cuda");
       sub.add_option("--host", o->host, "address to listen on");
       sub.add_option("--port", o->port, "port to listen on (0 = any free port, printed)");
       sub.add_option("--served-model-name", o->served_model_name,
                      "the model name clients send (default: the "
                      "model directory's name)");
       sub.add_option("--max-running-requests", o->max_running, "most sequences (choices) in the engine at once");
       sub.add_option("--max-queued-requests", o->max_queued, "most sequences waiting beyond those (then 429)");
       sub.add_option("--max-batch-tokens", o->max_batch_tokens, "tokens per engine step");
       sub.add_option("--kv-pages", o->kv_pages, "KV cache pages (0 = automatic)");
       sub.add_option("--page-size", o->page_size, "positions per KV page");
       sub.add_option("--prefill-chunk", o->prefill_chunk, "most prompt tokens of one request per step");
       sub.add_option("--drain-timeout", o->drain_timeout_s, "seconds SIGTERM waits for requests before aborting them");
       return std::function<int()>([o] { return run_serve(*o); });
     }});

}  // namespace
}  // namespace lockstep::cli
