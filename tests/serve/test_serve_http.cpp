// `lockstep serve` over real HTTP on loopback: the OpenAI endpoints and extension fields,
// exactness (log-probs equal `lockstep score` bit for bit; a request alone and among 50
// concurrent others gets the same bytes), streaming, bad input, a full queue, client
// disconnects, SIGTERM draining, pause/resume, metrics and weight updates.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <bit>
#include <cstring>
#include <thread>

#include "../cli/run_command.h"
#include "serve_process.h"
#include "tokenizer/tokenizer.h"

namespace lockstep {
namespace {

using Json = nlohmann::json;
using testing::post_json;
using testing::ServeProcess;
using namespace std::chrono_literals;

std::vector<Json> sse_events(const std::string& body, bool* saw_done) {
  std::vector<Json> events;
  *saw_done = false;
  size_t at = 0;
  while (at < body.size()) {
    size_t end = body.find("\n\n", at);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(at, end - at);
    at = end + 2;
    if (event.rfind("data: ", 0) != 0) continue;  // comments (keep-alives)
    if (event == "data: [DONE]")
      *saw_done = true;
    else
      events.push_back(Json::parse(event.substr(6)));
  }
  return events;
}

// A metric's value from /metrics text.
double metric(httplib::Client& c, const std::string& name) {
  auto r = c.Get("/metrics");
  if (!r) return -1;
  const size_t at = r->body.find("\n" + name + " ");
  return at == std::string::npos ? -1 : std::stod(r->body.substr(at + name.size() + 2));
}

bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds timeout = 10s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return condition();
}

// Raw bits, so -0.0 vs 0.0 or a last-ulp difference fails.
std::vector<uint32_t> bits(const std::vector<float>& v) {
  std::vector<uint32_t> b;
  for (float x : v) b.push_back(std::bit_cast<uint32_t>(x));
  return b;
}

std::vector<float> floats(const Json& array) {
  std::vector<float> v;
  for (const auto& x : array) v.push_back(float(x.get<double>()));
  return v;
}

class ServeTokenIds : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = new ServeProcess("--model " + testing::tiny_model()); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static ServeProcess* server_;
};
ServeProcess* ServeTokenIds::server_ = nullptr;

TEST_F(ServeTokenIds, HealthModelsAndMetrics) {
  auto c = server_->client();
  auto health = c->Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
  auto models = c->Get("/v1/models");
  ASSERT_TRUE(models);
  Json m = Json::parse(models->body);
  EXPECT_EQ(m["data"][0]["id"], "hf-tiny-qwen3-moe");
  EXPECT_EQ(m["data"][0]["max_model_len"], 512);
  EXPECT_GE(metric(*c, "lockstep_kv_pages_total"), 32);  // a full 512-position context, page size 16
  EXPECT_EQ(metric(*c, "lockstep_kv_pages_in_use"), 0);
}

TEST_F(ServeTokenIds, LogprobsEqualScoreBitForBit) {
  auto c = server_->client();
  const std::vector<int32_t> prompt = {3, 1, 4, 1, 5, 9, 2, 6};
  const double tokens_before = metric(*c, "lockstep_generation_tokens_total");
  const double requests_before = metric(*c, "lockstep_requests_total");
  int status = 0;
  Json r = post_json(*c, "/v1/completions",
                     {{"model", "hf-tiny-qwen3-moe"},
                      {"prompt", prompt},
                      {"max_tokens", 12},
                      {"seed", 7},
                      {"n", 3},
                      {"logprobs", 0},
                      {"ignore_eos", true}},
                     &status);
  ASSERT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["prompt_ids"].get<std::vector<int32_t>>(), prompt);
  ASSERT_EQ(r["choices"].size(), 3u);
  const std::string dir = testing::fs::temp_directory_path() / ("lockstep_serve_score_" + std::to_string(getpid()));
  testing::fs::create_directories(dir);
  std::ofstream in(dir + "/in.jsonl");
  for (const auto& choice : r["choices"]) {
    EXPECT_EQ(choice["finish_reason"], "length");
    EXPECT_EQ(choice["weight_version"], 0);
    EXPECT_EQ(choice["output_ids"].size(), 12u);
    EXPECT_EQ(choice["logprobs"]["token_logprobs"], choice["output_logprobs"]);
    std::vector<int32_t> all = prompt;
    for (int32_t id : choice["output_ids"]) all.push_back(id);
    in << Json{{"input_ids", all}}.dump() << "\n";
  }
  in.close();
  EXPECT_EQ(r["usage"]["prompt_tokens"], 8);
  EXPECT_EQ(r["usage"]["completion_tokens"], 36);
  EXPECT_EQ(metric(*c, "lockstep_generation_tokens_total"), tokens_before + 36);
  EXPECT_EQ(metric(*c, "lockstep_requests_total"), requests_before + 1);
  EXPECT_GT(metric(*c, "lockstep_generation_tokens_per_second"), 0);
  auto score = testing::run_lockstep("score --model " + testing::tiny_model() + " --input " + dir + "/in.jsonl" +
                                     " --output " + dir + "/out.jsonl");
  ASSERT_EQ(score.status, 0) << score.output;
  std::ifstream out(dir + "/out.jsonl");
  std::string line;
  for (const auto& choice : r["choices"]) {
    ASSERT_TRUE(std::getline(out, line));
    std::vector<float> scored = floats(Json::parse(line)["logprobs"]);
    std::vector<float> tail(scored.end() - 12, scored.end());  // log p of each output token
    EXPECT_EQ(bits(floats(choice["output_logprobs"])), bits(tail));
  }
  testing::fs::remove_all(dir);
  // The three choices are different samples (seeds 7, 8, 9).
  EXPECT_NE(r["choices"][0]["output_ids"], r["choices"][1]["output_ids"]);
}

// Completions' `logprobs: N` on a model without a tokenizer: the top tokens are keyed by their
// ids; greedy's top-1 is its token, and every value is `lockstep score`'s for that token.
TEST_F(ServeTokenIds, TopLogprobsEqualScoreBitForBit) {
  auto c = server_->client();
  const std::vector<int32_t> prompt = {3, 1, 4, 1, 5};
  int status = 0;
  Json r = post_json(*c, "/v1/completions",
                     {{"prompt", prompt}, {"max_tokens", 4}, {"temperature", 0}, {"logprobs", 5}, {"ignore_eos", true}},
                     &status);
  ASSERT_EQ(status, 200) << r.dump();
  const Json& choice = r["choices"][0];
  const auto out = choice["output_ids"].get<std::vector<int32_t>>();
  ASSERT_EQ(out.size(), 4u);
  const std::string dir = testing::fs::temp_directory_path() / ("lockstep_serve_top_" + std::to_string(getpid()));
  testing::fs::create_directories(dir);
  std::ofstream in(dir + "/in.jsonl");
  std::vector<float> served;
  for (size_t t = 0; t < out.size(); ++t) {
    const Json& top = choice["logprobs"]["top_logprobs"][t];
    ASSERT_EQ(top.size(), 5u);
    EXPECT_EQ(top[std::to_string(out[t])], choice["output_logprobs"][t]);
    float best = -INFINITY;
    for (const auto& [id, value] : top.items()) {
      std::vector<int32_t> seq = prompt;
      seq.insert(seq.end(), out.begin(), out.begin() + int64_t(t));
      seq.push_back(std::stoi(id));
      in << Json{{"input_ids", seq}}.dump() << "\n";
      served.push_back(value.get<float>());
      best = std::max(best, served.back());
    }
    EXPECT_EQ(top[std::to_string(out[t])].get<float>(), best);  // greedy: the top-1
  }
  in.close();
  auto score = testing::run_lockstep("score --model " + testing::tiny_model() + " --input " + dir + "/in.jsonl" +
                                     " --output " + dir + "/out.jsonl");
  ASSERT_EQ(score.status, 0) << score.output;
  std::ifstream scored_file(dir + "/out.jsonl");
  std::vector<float> scored;
  for (std::string line; std::getline(scored_file, line);)
    scored.push_back(floats(Json::parse(line)["logprobs"]).back());
  EXPECT_EQ(bits(served), bits(scored));
  testing::fs::remove_all(dir);
}

TEST_F(ServeTokenIds, ChoiceIOfNEqualsSeedPlusI) {
  auto c = server_->client();
  Json many = post_json(*c, "/v1/completions", {{"prompt", {7, 7, 7}}, {"max_tokens", 6}, {"seed", 100}, {"n", 3}});
  Json one = post_json(*c, "/v1/completions", {{"prompt", {7, 7, 7}}, {"max_tokens", 6}, {"seed", 102}});
  ASSERT_EQ(many["choices"].size(), 3u);
  EXPECT_EQ(many["choices"][2]["output_ids"], one["choices"][0]["output_ids"]);
  EXPECT_EQ(many["choices"][2]["output_logprobs"], one["choices"][0]["output_logprobs"]);
}

TEST_F(ServeTokenIds, AloneAndAmongFiftyConcurrentGivesTheSameBytes) {
  const Json probe = {{"prompt", {11, 12, 13, 14, 15}},
                      {"max_tokens", 20},
                      {"seed", 1234},
                      {"temperature", 0.8},
                      {"top_k", 50},
                      {"top_p", 0.95},
                      {"ignore_eos", true}};
  auto fields = [](const Json& r) {
    return r["choices"][0]["output_ids"].dump() + r["choices"][0]["output_logprobs"].dump();
  };
  auto c = server_->client();
  const std::string alone = fields(post_json(*c, "/v1/completions", probe));
  std::vector<std::string> crowd(51);
  std::vector<std::thread> threads;
  for (int i = 0; i < 51; ++i)
    threads.emplace_back([&, i] {
      auto client = server_->client();
      Json body = i == 25 ? probe
                          : Json{{"prompt", {11, 12, 13, i % 7 + 1}},
                                 {"max_tokens", 5 + i % 30},
                                 {"seed", i},
                                 {"n", 1 + i % 2},
                                 {"stream", i % 3 == 0}};
      if (i == 25)
        crowd[i] = fields(post_json(*client, "/v1/completions", body));
      else {
        auto r = client->Post("/v1/completions", body.dump(), "application/json");
        crowd[i] = r ? std::to_string(r->status) : "failed: " + httplib::to_string(r.error());
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(crowd[25], alone);
  for (int i = 0; i < 51; ++i)
    if (i != 25) {
      EXPECT_EQ(crowd[i], "200") << "request " << i << " stream " << (i % 3 == 0);
    }
  EXPECT_EQ(metric(*c, "lockstep_kv_pages_in_use"), 0);
}

TEST_F(ServeTokenIds, StreamingCarriesTheSameTokens) {
  auto c = server_->client();
  const Json body = {{"prompt", {2, 4, 6}}, {"max_tokens", 9}, {"seed", 5}, {"n", 2}};
  Json whole = post_json(*c, "/v1/completions", body);
  Json streamed = body;
  streamed["stream"] = true;
  streamed["stream_options"] = {{"include_usage", true}};
  auto r = c->Post("/v1/completions", streamed.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_NE(r->get_header_value("Content-Type").find("text/event-stream"), std::string::npos);
  bool done = false;
  auto events = sse_events(r->body, &done);
  EXPECT_TRUE(done);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back()["usage"]["completion_tokens"], 18);
  std::vector<Json> ids(2, Json::array()), lps(2, Json::array());
  std::vector<std::string> finish(2);
  for (const auto& e : events)
    for (const auto& ch : e["choices"]) {
      const int i = ch["index"];
      for (const auto& x : ch["output_ids"]) ids[i].push_back(x);
      for (const auto& x : ch["output_logprobs"]) lps[i].push_back(x);
      if (!ch["finish_reason"].is_null()) finish[i] = ch["finish_reason"];
    }
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(ids[i], whole["choices"][i]["output_ids"]);
    EXPECT_EQ(lps[i], whole["choices"][i]["output_logprobs"]);
    EXPECT_EQ(finish[i], whole["choices"][i]["finish_reason"]);
  }
}

TEST_F(ServeTokenIds, BadInputGets400WithAnErrorObject) {
  auto c = server_->client();
  struct Case {
    std::string body, param;
  };
  const std::vector<Case> cases = {
      {"{\"prompt\": [1, 2", ""},
      {"{\"prompt\": [1,2], \"model\": \"gpt-4\"}", "model"},
      {Json{{"prompt", std::vector<int>(600, 1)}}.dump(), "prompt"},
      {"{\"prompt\": [1], \"max_tokens\": 0}", "max_tokens"},
      {"{\"prompt\": [1], \"max_tokens\": \"ten\"}", "max_tokens"},
      {"{\"prompt\": \"\xc3\x28\"}", ""},
      {"{\"prompt\": [1, 512]}", "prompt[1]"},
      {"{\"prompt\": \"text needs a tokenizer\"}", "prompt"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", "messages"},
  };
  for (const auto& k : cases) {
    const char* path = k.body.find("messages") != std::string::npos ? "/v1/chat/completions" : "/v1/completions";
    auto r = c->Post(path, k.body, "application/json");
    ASSERT_TRUE(r) << k.body;
    EXPECT_EQ(r->status, 400) << k.body;
    Json e = Json::parse(r->body, nullptr, false);
    ASSERT_TRUE(e.contains("error")) << r->body;
    EXPECT_TRUE(e["error"]["message"].is_string());
    EXPECT_EQ(e["error"]["type"], "invalid_request_error");
    EXPECT_EQ(e["error"]["param"].is_null() ? "" : e["error"]["param"].get<std::string>(), k.param) << k.body;
  }
  auto health = c->Get("/health");
  ASSERT_TRUE(health);
  EXPECT_EQ(health->status, 200);
}

TEST(Serve, FullQueueGets429WithRetryAfter) {
  ServeProcess server("--model " + testing::tiny_model() + " --max-running-requests 1 --max-queued-requests 1");
  auto c = server.client();
  ASSERT_EQ(c->Post("/pause_generation", "", "application/json")->status, 200);
  std::vector<std::thread> waiting;
  std::vector<int> statuses(2, 0);
  std::vector<std::string> bodies(2);
  for (int i = 0; i < 2; ++i)
    waiting.emplace_back([&, i] {
      auto client = server.client();
      auto r = client->Post("/v1/completions", Json{{"prompt", {1, 2}}, {"max_tokens", 3}, {"seed", i}}.dump(),
                            "application/json");
      if (r) std::tie(statuses[i], bodies[i]) = std::pair(r->status, r->body);
    });
  ASSERT_TRUE(wait_until([&] { return metric(*c, "lockstep_queue_depth") == 2; }));
  auto full = c->Post("/v1/completions", R"({"prompt":[1,2],"max_tokens":3})", "application/json");
  ASSERT_TRUE(full);
  EXPECT_EQ(full->status, 429);
  EXPECT_EQ(full->get_header_value("Retry-After"), "1");
  EXPECT_TRUE(Json::parse(full->body)["error"]["message"].is_string());
  EXPECT_EQ(metric(*c, "lockstep_requests_rejected_total"), 1);
  std::this_thread::sleep_for(600ms);  // long enough for the waiting answers' heartbeats
  ASSERT_EQ(c->Post("/resume_generation", "", "application/json")->status, 200);
  for (auto& t : waiting) t.join();
  EXPECT_EQ(statuses, (std::vector<int>{200, 200}));
  for (const auto& body : bodies) {  // heartbeat spaces, then the answer: still one JSON value
    EXPECT_EQ(body.front(), ' ');
    EXPECT_EQ(Json::parse(body)["choices"][0]["output_ids"].size(), 3u);
  }
}

// A raw socket that sends a request and then vanishes, mid-generation.
TEST(Serve, ClientDisconnectCancelsAndFreesPages) {
  auto dir = testing::make_text_model("long-context", 4096);
  ServeProcess server("--model " + dir.string());
  auto c = server.client();
  for (bool stream : {false, true}) {
    const double cancelled_before = metric(*c, "lockstep_requests_cancelled_total");
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(uint16_t(server.port()));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    const std::string body =
        Json{{"prompt", {1, 2, 3}}, {"max_tokens", 4000}, {"ignore_eos", true}, {"stream", stream}}.dump();
    const std::string request =
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: " +
        std::to_string(body.size()) + "\r\n\r\n" + body;
    ASSERT_EQ(send(fd, request.data(), request.size(), 0), ssize_t(request.size()));
    ASSERT_TRUE(wait_until([&] { return metric(*c, "lockstep_kv_pages_in_use") > 0; }));  // it has started
    ASSERT_EQ(c->Post("/pause_generation", "", "application/json")->status, 200);         // hold it there
    EXPECT_EQ(metric(*c, "lockstep_running_sequences"), 1);
    close(fd);
    EXPECT_TRUE(wait_until(
        [&] {
          return metric(*c, "lockstep_requests_cancelled_total") == cancelled_before + 1 &&
                 metric(*c, "lockstep_kv_pages_in_use") == 0;
        },
        5s))
        << "stream " << stream;
    EXPECT_EQ(metric(*c, "lockstep_running_sequences"), 0);
    ASSERT_EQ(c->Post("/resume_generation", "", "application/json")->status, 200);
  }
}

// SIGTERM while a long request runs: /health and new requests get 503 (with Retry-After), the
// admitted request finishes and is answered, and the process exits 0.
TEST(Serve, SigtermDrainsAdmittedRequestsAndExits) {
  auto dir = testing::make_tiny_variant("drain", 11);
  ServeProcess server("--model " + dir.string());
  auto c = server.client();
  Json answer;
  int status = 0;
  std::thread waiting([&] {
    auto client = server.client();
    answer = post_json(*client, "/v1/completions", {{"prompt", {4, 5}}, {"max_tokens", 3000}, {"ignore_eos", true}},
                       &status);
  });
  ASSERT_TRUE(wait_until([&] { return metric(*c, "lockstep_running_sequences") == 1; }));
  server.signal(SIGTERM);
  ASSERT_TRUE(wait_until([&] {
    auto health = c->Get("/health");
    return health && health->status == 503;
  }));
  auto refused = c->Post("/v1/completions", R"({"prompt":[1],"max_tokens":2})", "application/json");
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->status, 503);
  EXPECT_EQ(refused->get_header_value("Retry-After"), "1");
  EXPECT_EQ(server.terminate(), 0) << server.log();
  waiting.join();
  EXPECT_EQ(status, 200);
  EXPECT_EQ(answer["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(answer["choices"][0]["output_ids"].size(), 3000u);
}

// A request in flight at an update (held there by pause) either finishes on the old weights
// or ends with "abort"; it never carries tokens of the new version.
TEST(Serve, WeightUpdateBumpsTheVersionAndNeverMixes) {
  auto dir = testing::make_tiny_variant("weights-a", 11);
  auto other = testing::make_tiny_variant("weights-b", 12);
  ServeProcess server("--model " + dir.string());
  auto c = server.client();
  const Json probe = {{"prompt", {1, 2, 3}}, {"max_tokens", 8}, {"seed", 3}, {"ignore_eos", true}};
  Json before = post_json(*c, "/v1/completions", probe);
  EXPECT_EQ(before["choices"][0]["weight_version"], 0);

  for (bool abort_all : {true, false}) {
    Json in_flight;
    std::thread long_request([&] {
      auto client = server.client();
      in_flight =
          post_json(*client, "/v1/completions", {{"prompt", {5, 6}}, {"max_tokens", 2000}, {"ignore_eos", true}});
    });
    ASSERT_TRUE(wait_until([&] { return metric(*c, "lockstep_running_sequences") == 1; }));
    ASSERT_EQ(c->Post("/pause_generation", "", "application/json")->status, 200);
    int status = 0;
    Json updated =
        post_json(*c, "/update_weights_from_disk",
                  {{"model_path", (abort_all ? other : dir).string()}, {"abort_all_requests", abort_all}}, &status);
    ASSERT_EQ(c->Post("/resume_generation", "", "application/json")->status, 200);
    long_request.join();
    ASSERT_EQ(status, 200) << updated.dump();
    EXPECT_EQ(updated["weight_version"], abort_all ? 1 : 2);
    const auto& choice = in_flight["choices"][0];
    EXPECT_EQ(choice["weight_version"], abort_all ? 0 : 1);
    if (abort_all) {
      EXPECT_EQ(choice["finish_reason"], "abort");
      EXPECT_LT(choice["output_ids"].size(), 2000u);
      Json after = post_json(*c, "/v1/completions", probe);  // new weights, new numbers
      EXPECT_EQ(after["choices"][0]["weight_version"], 1);
      EXPECT_NE(after["choices"][0]["output_logprobs"], before["choices"][0]["output_logprobs"]);
    } else {
      EXPECT_EQ(choice["finish_reason"], "length");  // finished on the old weights
      EXPECT_EQ(choice["output_ids"].size(), 2000u);
    }
  }
  Json back = post_json(*c, "/v1/completions", probe);  // the original weights again, version 2
  EXPECT_EQ(back["choices"][0]["weight_version"], 2);
  EXPECT_EQ(back["choices"][0]["output_logprobs"], before["choices"][0]["output_logprobs"]);
  EXPECT_EQ(metric(*c, "lockstep_weight_version"), 2);
  int status = 0;
  Json bad = post_json(*c, "/update_weights_from_disk", {{"model_path", "/nonexistent/checkpoint"}}, &status);
  EXPECT_EQ(status, 400);
  EXPECT_EQ(bad["error"]["param"], "model_path");
  auto text_model = testing::make_text_model("other-architecture");
  Json wrong_arch = post_json(*c, "/update_weights_from_disk", {{"model_path", text_model.string()}}, &status);
  EXPECT_EQ(status, 400);
  EXPECT_NE(wrong_arch["error"]["message"].get<std::string>().find("config.json"), std::string::npos);
}

class ServeText : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempModel(testing::make_text_model("tiny-text"));
    server_ = new ServeProcess("--model " + dir_->string());
    tokenizer_ = new Tokenizer(Tokenizer::load(dir_->string()));
  }
  static void TearDownTestSuite() {
    delete server_;
    delete tokenizer_;
    delete dir_;
  }
  static testing::TempModel* dir_;
  static ServeProcess* server_;
  static Tokenizer* tokenizer_;
};
testing::TempModel* ServeText::dir_ = nullptr;
ServeProcess* ServeText::server_ = nullptr;
Tokenizer* ServeText::tokenizer_ = nullptr;

TEST_F(ServeText, ChatRendersTheTemplateAndDecodesTheText) {
  auto c = server_->client();
  int status = 0;
  Json r = post_json(*c, "/v1/chat/completions",
                     {{"model", "tiny-text"},
                      {"messages", {{{"role", "user"}, {"content", "Hi there"}}}},
                      {"max_tokens", 10},
                      {"seed", 9},
                      {"logprobs", true},
                      {"chat_template_kwargs", {{"enable_thinking", false}}}},
                     &status);
  ASSERT_EQ(status, 200) << r.dump();
  ChatOptions options;
  options.enable_thinking = false;
  EXPECT_EQ(r["prompt_ids"].get<std::vector<int32_t>>(),
            tokenizer_->encode(tokenizer_->render_chat({{"user", "Hi there"}}, options)));
  const auto& choice = r["choices"][0];
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(choice["message"]["role"], "assistant");
  EXPECT_EQ(choice["message"]["content"], tokenizer_->decode(choice["output_ids"].get<std::vector<int32_t>>(), true));
  ASSERT_EQ(choice["logprobs"]["content"].size(), choice["output_ids"].size());
  for (size_t t = 0; t < choice["output_ids"].size(); ++t)
    EXPECT_EQ(choice["logprobs"]["content"][t]["logprob"], choice["output_logprobs"][t]);
}

TEST_F(ServeText, StopStringCutsTheTextInBothModes) {
  auto c = server_->client();
  const Json body = {{"prompt", "Once upon a time"}, {"max_tokens", 24}, {"seed", 2}, {"ignore_eos", true}};
  Json full = post_json(*c, "/v1/completions", body);
  const std::string text = full["choices"][0]["text"];
  ASSERT_GE(text.size(), 8u) << text;
  // A stop string from inside the text (the third and fourth characters of its first run).
  const std::string stop = text.substr(2, 2);
  Json stopped_body = body;
  stopped_body["stop"] = stop;
  Json stopped = post_json(*c, "/v1/completions", stopped_body);
  EXPECT_EQ(stopped["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(stopped["choices"][0]["text"], text.substr(0, text.find(stop)));
  stopped_body["stream"] = true;
  auto r = c->Post("/v1/completions", stopped_body.dump(), "application/json");
  ASSERT_TRUE(r);
  bool done = false;
  std::string streamed;
  for (const auto& e : sse_events(r->body, &done)) streamed += e["choices"][0]["text"].get<std::string>();
  EXPECT_TRUE(done);
  EXPECT_EQ(streamed, stopped["choices"][0]["text"]);
}

}  // namespace
}  // namespace lockstep
