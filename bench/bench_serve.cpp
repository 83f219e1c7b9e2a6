// A bounded load test of `lockstep serve` on loopback: `--concurrency` clients send
// `--requests` completions in total (closed loop: each client sends its next request when its
// last one is answered) and the tool prints requests/s, latency p50/p99 and output tokens/s.
// Prompts are random token ids (< --max-id) with fixed lengths, and ignore_eos fixes every
// output's length, so runs are comparable. bench/bench_serve.sh starts a server and runs this.
//   bench_serve --url http://127.0.0.1:PORT [--requests 200] [--concurrency 16]
//               [--prompt-tokens 32] [--max-tokens 32] [--top-logprobs 0] [--warmup 0] [--stream] [--json]
// --top-logprobs N asks every request for the N most likely tokens of each step (what that costs).
// --warmup N sends N requests first (at the same concurrency, other prompts) and leaves them out
// of every figure: a fresh server's first steps (lazy kernel loads, first allocations) would
// otherwise be the p99 of a short run.
#include <httplib.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

struct Options {
  std::string url = "http://127.0.0.1:30000";
  int requests = 200, concurrency = 16, prompt_tokens = 32, max_tokens = 32, max_id = 256, top_logprobs = 0, warmup = 0;
  bool stream = false, json = false;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, size_t(p / 100.0 * double(v.size() - 1) + 0.5));
  return v[i];
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Load test of lockstep serve on loopback"};
  app.add_option("--url", o.url, "server address (http://HOST:PORT)");
  app.add_option("--requests", o.requests, "requests in total")->check(CLI::Range(1, 1000000));
  app.add_option("--concurrency", o.concurrency, "clients sending at once")->check(CLI::Range(1, 1024));
  app.add_option("--prompt-tokens", o.prompt_tokens, "prompt length (random token ids)")->check(CLI::Range(1, 100000));
  app.add_option("--max-tokens", o.max_tokens, "output tokens per request (ignore_eos)")->check(CLI::Range(1, 100000));
  app.add_option("--max-id", o.max_id, "prompt ids are drawn from [0, max-id)")->check(CLI::Range(1, 1 << 30));
  app.add_option("--top-logprobs", o.top_logprobs, "the N most likely tokens of each step, per request")
      ->check(CLI::Range(0, 20));
  app.add_option("--warmup", o.warmup, "requests sent first and left out of the figures")
      ->check(CLI::Range(0, 1000000));
  app.add_flag("--stream", o.stream, "stream the answers (SSE)");
  app.add_flag("--json", o.json, "print one JSON object instead of a table");
  CLI11_PARSE(app, argc, argv);

  std::mutex mutex;
  std::vector<double> latencies_ms;
  int64_t output_tokens = 0, failures = 0;
  std::string first_error;
  // `count` requests from o.concurrency closed-loop clients; `warmup` ones draw other prompts
  // (a prompt seen in the warmup would be a prefix-cache hit) and record only their failures.
  auto send = [&](int count, bool warmup) {
    std::atomic<int> next{0};
    std::vector<std::thread> clients;
    for (int c = 0; c < o.concurrency; ++c)
      clients.emplace_back([&, c] {
        httplib::Client client(o.url);
        client.set_read_timeout(600, 0);
        std::mt19937 rng(uint32_t(c) + 1 + (warmup ? 0x9e3779b9u : 0u));
        for (int i = next++; i < count; i = next++) {
          std::vector<int> prompt(size_t(o.prompt_tokens));
          for (auto& id : prompt) id = int(rng() % uint32_t(o.max_id));
          nlohmann::json body = {{"prompt", prompt},   {"max_tokens", o.max_tokens}, {"seed", i},
                                 {"ignore_eos", true}, {"stream", o.stream},         {"temperature", 1.0}};
          if (o.top_logprobs > 0) body["logprobs"] = o.top_logprobs;
          const auto t0 = Clock::now();
          auto r = client.Post("/v1/completions", body.dump(), "application/json");
          const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
          int64_t tokens = 0;
          std::string error;
          if (!r)
            error = "connection: " + httplib::to_string(r.error());
          else if (r->status != 200)
            error = "HTTP " + std::to_string(r->status) + ": " + r->body;
          else if (o.stream) {
            for (size_t at = r->body.find("\"output_ids\":["); at != std::string::npos;
                 at = r->body.find("\"output_ids\":[", at + 1))
              tokens += nlohmann::json::parse(r->body.substr(at + 13, r->body.find(']', at) - at - 12)).size();
          } else {
            tokens = nlohmann::json::parse(r->body)["usage"]["completion_tokens"].get<int64_t>();
          }
          std::lock_guard lock(mutex);
          if (!error.empty()) {
            ++failures;
            if (first_error.empty()) first_error = (warmup ? "warmup: " : "") + error;
            continue;
          }
          if (warmup) continue;
          latencies_ms.push_back(ms);
          output_tokens += tokens;
        }
      });
    for (auto& t : clients) t.join();
  };
  if (o.warmup > 0) send(o.warmup, true);
  const auto start = Clock::now();
  send(o.requests, false);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  const nlohmann::json result = {{"requests", o.requests},
                                 {"concurrency", o.concurrency},
                                 {"prompt_tokens", o.prompt_tokens},
                                 {"max_tokens", o.max_tokens},
                                 {"top_logprobs", o.top_logprobs},
                                 {"warmup", o.warmup},
                                 {"stream", o.stream},
                                 {"failures", failures},
                                 {"seconds", seconds},
                                 {"requests_per_s", double(latencies_ms.size()) / seconds},
                                 {"latency_p50_ms", percentile(latencies_ms, 50)},
                                 {"latency_p99_ms", percentile(latencies_ms, 99)},
                                 {"output_tokens_per_s", double(output_tokens) / seconds}};
  if (o.json) {
    std::printf("%s\n", result.dump().c_str());
  } else {
    std::printf("%d requests (%d at once, prompt %d, output %d tokens, top_logprobs %d%s, after %d warmup): %.1f s\n",
                o.requests, o.concurrency, o.prompt_tokens, o.max_tokens, o.top_logprobs, o.stream ? ", streamed" : "",
                o.warmup, seconds);
    std::printf("  requests/s      %10.2f\n", result["requests_per_s"].get<double>());
    std::printf("  latency p50 ms  %10.2f\n", result["latency_p50_ms"].get<double>());
    std::printf("  latency p99 ms  %10.2f\n", result["latency_p99_ms"].get<double>());
    std::printf("  output tokens/s %10.1f\n", result["output_tokens_per_s"].get<double>());
    if (failures) std::printf("  failures        %10lld (first: %s)\n", (long long)failures, first_error.c_str());
  }
  return failures == 0 ? 0 : 1;
}
