// Outside rewards: --rm-url against a reward server this test starts on 127.0.0.1 (answers,
// concurrency, retries with backoff, timeouts, failures), and --custom-rm-cmd shell programs.
#include <gtest/gtest.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "dist/thread_communicator.h"
#include "loopback_server.h"
#include "rl/rewards/command_reward.h"
#include "rl/rewards/remote_reward.h"
#include "rl/trainer.h"
#include "rl_data_util.h"
#include "rl_test_util.h"

namespace lockstep::rl {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using testing::error_of;

// A reward server on a free loopback port, stopped (and its thread joined) with the object.
// Every handler returns within half a second.
class RewardServer {
 public:
  RewardServer() {
    httplib::Server& server = loopback_.server();
    server.Post("/score", [this](const httplib::Request& req, httplib::Response& res) {
      const int now = ++in_flight_;
      {
        std::lock_guard<std::mutex> lock(mu_);
        max_in_flight_ = std::max(max_in_flight_, now);
        bodies_.push_back(json::parse(req.body));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      const json j = json::parse(req.body);
      const double reward = 2 * std::stod(j.at("label").get<std::string>());
      // Either answer form: a bare number for odd labels, {"reward": x} for even ones.
      res.set_content(int(reward) % 4 == 2 ? std::to_string(reward) : json{{"reward", reward}}.dump(),
                      "application/json");
      --in_flight_;
    });
    server.Post("/flaky", [this](const httplib::Request&, httplib::Response& res) {
      if (calls_++ < 2) {
        res.status = 503;
        return;
      }
      res.set_content("0.5", "text/plain");
    });
    server.Post("/broken", [this](const httplib::Request&, httplib::Response& res) {
      ++calls_;
      res.status = 500;
    });
    server.Post("/garbage",
                [](const httplib::Request&, httplib::Response& res) { res.set_content("not a number", "text/plain"); });
    server.Post("/slow", [](const httplib::Request&, httplib::Response& res) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      res.set_content("1", "text/plain");
    });
    loopback_.start();
  }
  std::string url(const std::string& path) const { return loopback_.url(path); }
  int max_in_flight() const { return max_in_flight_; }
  int calls() const { return calls_; }
  std::vector<json> bodies() {
    std::lock_guard<std::mutex> lock(mu_);
    return bodies_;
  }

 private:
  testing::LoopbackServer loopback_;
  std::atomic<int> in_flight_{0}, calls_{0};
  std::mutex mu_;
  int max_in_flight_ = 0;
  std::vector<json> bodies_;
};

std::vector<RewardRequest> numbered_samples(int n) {
  std::vector<RewardRequest> out;
  for (int i = 0; i < n; ++i)
    out.push_back({"prompt " + std::to_string(i), "response " + std::to_string(i), std::to_string(i), json{{"id", i}}});
  return out;
}

RemoteRewardOptions fast_options(const std::string& url) {
  RemoteRewardOptions o;
  o.url = url;
  o.timeout_s = 2;
  o.backoff_s = 0.02;
  return o;
}

TEST(RemoteReward, PostsEachSampleAndKeepsInputOrderWithBoundedConcurrency) {
  RewardServer server;
  RemoteRewardOptions o = fast_options(server.url("/score"));
  o.concurrency = 3;
  auto rewards = remote_rewards(numbered_samples(9), o);
  EXPECT_EQ(rewards, (std::vector<float>{0, 2, 4, 6, 8, 10, 12, 14, 16}));
  EXPECT_LE(server.max_in_flight(), 3);
  EXPECT_GE(server.max_in_flight(), 2);
  auto bodies = server.bodies();
  ASSERT_EQ(bodies.size(), 9u);
  for (const auto& b : bodies) {
    const int id = b.at("metadata").at("id").get<int>();
    EXPECT_EQ(b.at("prompt"), "prompt " + std::to_string(id));
    EXPECT_EQ(b.at("response"), "response " + std::to_string(id));
    EXPECT_EQ(b.at("label"), std::to_string(id));
  }
}

TEST(RemoteReward, RetriesWithBackoffThenSucceeds) {
  RewardServer server;
  RemoteRewardOptions o = fast_options(server.url("/flaky"));
  o.concurrency = 1;
  o.retries = 3;
  const auto start = Clock::now();
  EXPECT_EQ(remote_rewards(numbered_samples(2), o), (std::vector<float>{0.5f, 0.5f}));
  EXPECT_EQ(server.calls(), 4);  // two 503s, then one answer per sample
  EXPECT_GE(std::chrono::duration<double>(Clock::now() - start).count(), 0.02 + 0.04);
}

TEST(RemoteReward, FailuresNameTheUrlAfterTheRetries) {
  RewardServer server;
  RemoteRewardOptions o = fast_options(server.url("/broken"));
  o.retries = 2;
  o.concurrency = 1;
  const auto start = Clock::now();
  EXPECT_EQ(error_of([&] { remote_rewards(numbered_samples(1), o); }),
            "--rm-url " + o.url + ": sample 0 failed after 3 attempts: HTTP status 500");
  EXPECT_EQ(server.calls(), 3);
  EXPECT_GE(std::chrono::duration<double>(Clock::now() - start).count(), 0.02 + 0.04);
  o.url = server.url("/garbage");
  EXPECT_NE(error_of([&] { remote_rewards(numbered_samples(1), o); })
                .find(": sample 0 failed after 3 attempts: the answer: expected a number or {\"reward\": number}, got "
                      "'not a number'"),
            std::string::npos);
  o.url = server.url("/slow");
  o.timeout_s = 0.1;
  o.retries = 1;
  const std::string slow = error_of([&] { remote_rewards(numbered_samples(1), o); });
  EXPECT_EQ(slow, "--rm-url " + o.url +
                      ": sample 0 failed after 2 attempts: no answer in time (--rm-timeout 0.1000 s), or the "
                      "connection closed");
}

TEST(RemoteReward, NoServerAndBadUrlsAreErrors) {
  std::string dead_url;
  {
    RewardServer gone;
    dead_url = gone.url("/score");
  }  // stopped: nothing listens on its port now
  RemoteRewardOptions o = fast_options(dead_url);
  o.retries = 1;
  EXPECT_EQ(error_of([&] {
              remote_rewards(numbered_samples(1), o);
            }).rfind("--rm-url " + dead_url + ": sample 0 failed after 2 attempts: cannot connect", 0),
            0u);
  EXPECT_EQ(error_of([] { parse_http_url("https://x:1/a"); }),
            "--rm-url: expected http://HOST:PORT/PATH, got 'https://x:1/a'");
  EXPECT_EQ(error_of([] { parse_http_url("http://x:99999/a"); }),
            "--rm-url: port 99999 out of range in 'http://x:99999/a'");
  EXPECT_EQ(error_of([] { parse_http_url("http://:80/a"); }), "--rm-url: no host in 'http://:80/a'");
  HttpUrl u = parse_http_url("http://rm.local:8000/v1/reward");
  EXPECT_EQ(u.host, "rm.local");
  EXPECT_EQ(u.port, 8000);
  EXPECT_EQ(u.path, "/v1/reward");
  EXPECT_EQ(parse_http_url("http://rm").path, "/");
}

TEST(CommandReward, ReadsOneRewardPerSampleInOrder) {
  // The program echoes each sample's label (keys are sorted, so "label" comes first).
  auto rewards = command_rewards(numbered_samples(4), R"cmd(sed -n 's/^{"label":"\([0-9]*\)".*/\1/p')cmd");
  EXPECT_EQ(rewards, (std::vector<float>{0, 1, 2, 3}));
  EXPECT_EQ(command_rewards(numbered_samples(2), R"(while read -r l; do echo '{"reward": -1.5}'; done)"),
            (std::vector<float>{-1.5f, -1.5f}));
}

TEST(CommandReward, BadProgramsAreErrorsNamingTheCommand) {
  EXPECT_EQ(error_of([] { command_rewards(numbered_samples(2), "cat > /dev/null; exit 3"); }),
            "--custom-rm-cmd 'cat > /dev/null; exit 3': exited with status 3");
  EXPECT_EQ(error_of([] { command_rewards(numbered_samples(3), "head -n 1 | sed 's/.*/1/'"); }),
            "--custom-rm-cmd 'head -n 1 | sed 's/.*/1/'': wrote 1 reward lines for 3 samples");
  EXPECT_EQ(error_of([] { command_rewards(numbered_samples(1), "cat > /dev/null; echo hello"); }),
            "--custom-rm-cmd 'cat > /dev/null; echo hello': output line 1: expected a number or {\"reward\": number}, "
            "got 'hello'");
}

// One training step whose rewards come from the test's server: it sees the data set's prompt,
// label and metadata and the decoded response, and its answers are the step's rewards.
TEST(RemoteReward, TrainingStepScoresThroughTheServer) {
  RewardServer server;
  testing::TempDir dir("remote_train");
  TrainConfig c;
  c.prompt_data = dir.sub("data.jsonl");
  std::ofstream(c.prompt_data) << R"({"prompt": "Say 1.", "label": "1", "info": {"src": "t"}})"
                                  "\n"
                               << R"({"prompt": "Say 3.", "label": "3", "info": {"src": "t"}})"
                                  "\n";
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.metadata_key = "info";
  c.rm_url = server.url("/score");
  c.sft_warmup_steps = 0;
  c.num_rollout = 1;
  testing::small_batches(c);
  c.rollout_max_response_len = 4;
  c.progress = false;
  c.output_dir = dir.sub("out");
  run_training(c);
  auto metrics = testing::read_metrics(c);
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_DOUBLE_EQ(metrics[0]["rollout/rewards"].get<double>(), (2 + 2 + 6 + 6) / 4.0);
  auto bodies = server.bodies();
  ASSERT_EQ(bodies.size(), 4u);
  for (const auto& b : bodies) {
    EXPECT_EQ(b.at("prompt"), "Say " + b.at("label").get<std::string>() + ".");
    EXPECT_EQ(b.at("metadata"), (json{{"src", "t"}}));
    EXPECT_TRUE(b.at("response").is_string());
  }
}

}  // namespace
}  // namespace lockstep::rl

namespace lockstep::rl {
namespace {

// Under ranks (threads here, as under mpirun) the reward program runs on rank 0 only, and every
// rank gets its rewards, or its error.
TEST(CommandReward, UnderRanksOnlyRankZeroCallsTheProgram) {
  testing::TempDir dir("rm_ranks");
  const std::string calls = dir.sub("calls.txt"), program = dir.sub("label_reward.sh");
  std::ofstream(program) << "echo call >> '" << calls << "'\n"
                         << R"sh(sed -n 's/^{"label":"\([0-9.]*\)".*/\1/p')sh"
                         << "\n";
  TrainConfig c;
  c.prompt_data = dir.sub("data.jsonl");
  std::ofstream(c.prompt_data) << R"({"prompt": "Say 1.", "label": "1"})"
                                  "\n"
                               << R"({"prompt": "Say 3.", "label": "3"})"
                                  "\n";
  c.load = testing::make_text_model_dir(dir.sub("model"));
  c.custom_rm_cmd = "sh " + program;
  c.sft_warmup_steps = 0;
  c.num_rollout = 1;
  testing::small_batches(c);
  c.rollout_max_response_len = 2;
  c.progress = false;
  c.output_dir = dir.sub("out");
  c.num_threads = 1;  // the thread ranks share one process: no kernel thread pool between them
  dist::run_threads(2, [&](dist::Communicator& comm) { run_training(c, &comm); });
  EXPECT_EQ(testing::read_bytes(calls), "call\n");
  EXPECT_DOUBLE_EQ(testing::read_metrics(c).at(0)["rollout/rewards"].get<double>(), 2.0);
  c.custom_rm_cmd = "cat > /dev/null; exit 4";
  c.output_dir = dir.sub("out_failing");
  EXPECT_EQ(error_of([&] { dist::run_threads(2, [&](dist::Communicator& comm) { run_training(c, &comm); }); }),
            "--custom-rm-cmd 'cat > /dev/null; exit 4': exited with status 4");
}

}  // namespace
}  // namespace lockstep::rl
