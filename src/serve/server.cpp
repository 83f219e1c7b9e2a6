#include "serve/server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <cstdio>
#include <ctime>
#include <thread>

#include "core/error.h"
#include "core/json_parse.h"
#include "serve/metrics.h"
#include "serve/openai_response.h"

namespace lockstep::serve {

namespace {

using Json = nlohmann::ordered_json;
using namespace std::chrono_literals;

constexpr auto kWaitSlice = 100ms;  // how long a writer waits on its ticket per call
constexpr auto kHeartbeat = 250ms;  // quiet time after which a writer probes the client
// With a charset, cpp-httplib does not compress the body: a compressed answer would be held
// back by the compressor (no streaming, no disconnect probe).
constexpr const char* kJson = "application/json; charset=utf-8";

void send_json(httplib::Response& res, int status, const Json& body) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, Json::error_handler_t::replace), kJson);
}

void send_error(httplib::Response& res, const ApiError& e) {
  send_json(res, e.status, error_body(e));
  if (e.status == 429 || e.status == 503) res.set_header("Retry-After", "1");
}

// cpp-httplib 0.11 listens with a backlog of 5: a burst of clients overflows it and the kernel
// drops their handshakes. listen() again on the bound socket raises the backlog.
class WideBacklogServer : public httplib::Server {
 public:
  void widen_backlog(int backlog) { ::listen(svr_sock_, backlog); }
};

// One generation answer being written: owned by the content provider and its releaser.
struct Generation {
  Generation(ApiRequest r, const ServedModel& model, std::string id)
      : request(std::move(r)), id(id), writer(request, model, std::move(id), int64_t(std::time(nullptr))) {}
  ApiRequest request;
  std::string id;  // "cmpl-N" / "chatcmpl-N", for log lines
  ResponseWriter writer;
  std::shared_ptr<Ticket> ticket;
  uint64_t seen = 0;
  bool finished = false, released = false;
  std::chrono::steady_clock::time_point last_write = std::chrono::steady_clock::now();
};

// Writes what is new for one answer (or a heartbeat after a quiet while); returns false when
// the client is gone.
bool write_some(Generation& g, bool stream, httplib::DataSink& sink) {
  const auto snapshot = g.ticket->wait(g.seen, kWaitSlice);
  g.seen = snapshot.generation;
  const auto now = std::chrono::steady_clock::now();
  std::string out;
  if (stream)
    out = g.writer.stream_events(snapshot);
  else if (snapshot.done)
    out = g.writer.full(snapshot).dump(-1, ' ', false, Json::error_handler_t::replace);
  if (out.empty() && now - g.last_write >= kHeartbeat) out = stream ? ": keep-alive\n\n" : " ";
  if (!out.empty()) {
    g.last_write = now;
    if (!sink.write(out.data(), out.size())) return false;
  }
  if (snapshot.done) {
    g.finished = true;
    sink.done();
  }
  return true;
}

}  // namespace

HttpServer::HttpServer(ServerOptions options, Scheduler& scheduler, ServedModel model)
    : options_(std::move(options)),
      scheduler_(scheduler),
      model_(std::move(model)),
      http_(std::make_unique<WideBacklogServer>()) {
  const int threads = std::max(options_.http_threads, 4);
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  http_->set_payload_max_length(size_t(32) << 20);
  http_->set_keep_alive_timeout(2);  // idle keep-alive connections hold a thread and delay stop()
  http_->set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError(500, "internal error: " + what, "", "", "server_error"));
  });
  add_routes();
}

HttpServer::~HttpServer() = default;

int HttpServer::bind() {
  int port = options_.port;
  if (port == 0)
    port = http_->bind_to_any_port(options_.host);
  else if (!http_->bind_to_port(options_.host, port))
    port = -1;
  LS_CHECK(port > 0, "cannot listen on ", options_.host, ":", options_.port, " (address in use or not local?)");
  static_cast<WideBacklogServer&>(*http_).widen_backlog(1024);
  return port;
}

void HttpServer::serve() { http_->listen_after_bind(); }

void HttpServer::stop() {
  draining_ = true;
  scheduler_.drain(options_.drain_timeout);
  // Let the writers send what the drained requests produced before the sockets close.
  for (int i = 0; i < 100 && open_responses_ > 0; ++i) std::this_thread::sleep_for(20ms);
  http_->stop();
}

void HttpServer::add_routes() {
  http_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (draining_) return send_error(res, ApiError(503, "the server is shutting down", "", "", "server_error"));
    send_json(res, 200, {{"status", "ok"}});
  });

  http_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    Json model = {{"id", model_.name},
                  {"object", "model"},
                  {"created", 0},
                  {"owned_by", "lockstep"},
                  {"max_model_len", model_.config->max_position_embeddings}};
    send_json(res, 200, {{"object", "list"}, {"data", Json::array({model})}});
  });

  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(prometheus_text(scheduler_.metrics()), "text/plain; version=0.0.4");
  });

  http_->Post("/pause_generation", [this](const httplib::Request&, httplib::Response& res) {
    scheduler_.pause();
    send_json(res, 200, {{"success", true}, {"message", "generation paused"}});
  });
  http_->Post("/resume_generation", [this](const httplib::Request&, httplib::Response& res) {
    scheduler_.resume();
    send_json(res, 200, {{"success", true}, {"message", "generation resumed"}});
  });

  http_->Post("/update_weights_from_disk", [this](const httplib::Request& req, httplib::Response& res) {
    try {
      Json body;
      try {
        body = parse_ordered_json(req.body, "the request body");
      } catch (const Error& e) {
        throw bad_field("", e.what(), "invalid_json");
      }
      if (!body.is_object()) throw bad_field("", "the request body must be a JSON object");
      if (!body.contains("model_path") || !body["model_path"].is_string())
        throw bad_field("model_path", "expected the checkpoint directory as a string");
      bool abort_all = false;
      if (body.contains("abort_all_requests")) {
        if (!body["abort_all_requests"].is_boolean()) throw bad_field("abort_all_requests", "expected true or false");
        abort_all = body["abort_all_requests"].get<bool>();
      }
      const std::string path = body["model_path"].get<std::string>();
      std::lock_guard lock(weights_mutex_);
      ModelWeights weights;
      try {
        weights = ModelWeights::load(path, options_.precision);  // off the scheduler thread: it keeps generating
      } catch (const Error& e) {
        throw bad_field("model_path", e.what());
      }
      if (weights.config.to_json() != scheduler_.config().to_json())
        throw bad_field("model_path",
                        "the checkpoint's config.json differs from the served model's (a weight update "
                        "keeps the architecture)");
      const int64_t version = scheduler_.update_weights(
          std::move(weights), abort_all ? rollout::UpdatePolicy::abort : rollout::UpdatePolicy::finish);
      send_json(res, 200, {{"success", true}, {"message", "loaded " + path}, {"weight_version", version}});
    } catch (const ApiError& e) {
      send_error(res, e);
    }
  });

  auto generate = [this](Endpoint endpoint) {
    return [this, endpoint](const httplib::Request& req, httplib::Response& res) {
      std::shared_ptr<Generation> g;
      try {
        const std::string id = (endpoint == Endpoint::chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id_++);
        g = std::make_shared<Generation>(parse_api_request(req.body, endpoint, model_), model_, id);
        std::vector<rollout::GenerationRequest> choices;
        for (int64_t i = 0; i < g->request.n; ++i) choices.push_back(g->request.choice(i));
        try {
          g->ticket = scheduler_.submit(choices);
        } catch (const Error& e) {
          throw bad_field("", e.what());
        } catch (const Overloaded& e) {
          throw ApiError(429, e.what(), "", "rate_limit_exceeded", "rate_limit_error");
        } catch (const ShuttingDown& e) {
          throw ApiError(503, e.what(), "", "", "server_error");
        }
      } catch (const ApiError& e) {
        return send_error(res, e);
      }
      ++open_responses_;
      const bool stream = g->request.stream;
      auto provider = [g, stream](size_t, httplib::DataSink& sink) {
        try {
          return write_some(*g, stream, sink);
        } catch (const std::exception& e) {  // never let an answer take the server down
          std::fprintf(stderr, "lockstep serve: error writing %s: %s\n", g->id.c_str(), e.what());
          return false;
        }
      };
      auto releaser = [this, g](bool) {
        if (g->released) return;  // a copied Response may release twice
        g->released = true;
        if (!g->finished) scheduler_.cancel(g->ticket);
        --open_responses_;
      };
      res.set_chunked_content_provider(stream ? "text/event-stream" : kJson, provider, releaser);
    };
  };
  http_->Post("/v1/completions", generate(Endpoint::completions));
  http_->Post("/v1/chat/completions", generate(Endpoint::chat));
}

}  // namespace lockstep::serve
