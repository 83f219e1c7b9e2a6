// `lockstep serve`'s HTTP face (cpp-httplib): the OpenAI endpoints and the RL control
// endpoints over a Scheduler. See docs/serve.md for the API.
//
//   GET  /health                    200 once listening (503 while draining)
//   GET  /v1/models
//   POST /v1/completions            prompt as text or token ids
//   POST /v1/chat/completions       messages through the Qwen3 chat template
//   GET  /metrics                   Prometheus text
//   POST /update_weights_from_disk  {"model_path": DIR, "abort_all_requests": false}
//   POST /pause_generation, /resume_generation
//
// Generation answers are written by a chunked content provider that waits on the request's
// Ticket; a write that fails means the client left, and its request is cancelled (its KV
// pages freed). A non-streamed answer sends a space (JSON whitespace) when it has waited a
// while, so a vanished client is noticed before the request ends.
#pragma once
#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <string>

#include "model/weights.h"
#include "serve/openai_request.h"
#include "serve/scheduler.h"

namespace httplib {
class Server;
}

namespace lockstep::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 30000;  // 0 = any free port
  int http_threads = 64;
  Precision precision = Precision::float32;  // of weights loaded by /update_weights_from_disk
  std::chrono::milliseconds drain_timeout{30000};
};

class HttpServer {
 public:
  HttpServer(ServerOptions options, Scheduler& scheduler, ServedModel model);
  ~HttpServer();

  // Binds the listening socket; returns the port. Throws lockstep::Error when it cannot.
  int bind();
  // Answers requests until stop(); call after bind().
  void serve();
  // Refuses new requests, lets admitted ones finish (up to drain_timeout, then aborts them),
  // then stops listening. Safe to call from another thread.
  void stop();

 private:
  void add_routes();

  ServerOptions options_;
  Scheduler& scheduler_;
  ServedModel model_;
  std::unique_ptr<httplib::Server> http_;
  std::atomic<int64_t> next_id_{0};
  std::atomic<int64_t> open_responses_{0};  // generation answers still being written
  std::atomic<bool> draining_{false};
  std::mutex weights_mutex_;  // one weight update at a time
};

}  // namespace lockstep::serve
