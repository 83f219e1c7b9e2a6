#include "rl/rewards/remote_reward.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include "core/error.h"

namespace lockstep::rl {

HttpUrl parse_http_url(const std::string& url) {
  const std::string scheme = "http://";
  LS_CHECK(url.rfind(scheme, 0) == 0, "--rm-url: expected http://HOST:PORT/PATH, got '", url, "'");
  const std::string rest = url.substr(scheme.size());
  const size_t slash = rest.find('/');
  const std::string authority = rest.substr(0, slash);
  HttpUrl u;
  if (slash != std::string::npos) u.path = rest.substr(slash);
  const size_t colon = authority.rfind(':');
  u.host = authority.substr(0, colon);
  if (colon != std::string::npos) {
    const std::string port = authority.substr(colon + 1);
    LS_CHECK(!port.empty() && port.size() <= 5 &&
                 std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }),
             "--rm-url: bad port '", port, "' in '", url, "'");
    u.port = std::stoi(port);
    LS_CHECK(u.port > 0 && u.port < 65536, "--rm-url: port ", u.port, " out of range in '", url, "'");
  }
  LS_CHECK(!u.host.empty(), "--rm-url: no host in '", url, "'");
  return u;
}

namespace {

// One attempt: the reward, or why there is none.
// httplib's error names ("Read") in words a user can act on.
std::string describe(httplib::Error e, double timeout_s) {
  const std::string limit = " (--rm-timeout " + std::to_string(timeout_s).substr(0, 6) + " s)";
  switch (e) {
    case httplib::Error::Connection: return "cannot connect (refused, or no answer" + limit + ")";
    case httplib::Error::ConnectionTimeout: return "connecting timed out" + limit;
    case httplib::Error::Read: return "no answer in time" + limit + ", or the connection closed";
    case httplib::Error::Write: return "sending the request failed" + limit;
    default: return "request failed (" + httplib::to_string(e) + ")";
  }
}

bool try_once(httplib::Client& client, const HttpUrl& u, const std::string& body, double timeout_s, float& reward,
              std::string& why) {
  auto res = client.Post(u.path, body, "application/json");
  if (!res) {
    why = describe(res.error(), timeout_s);
    return false;
  }
  if (res->status < 200 || res->status >= 300) {
    why = "HTTP status " + std::to_string(res->status);
    return false;
  }
  try {
    reward = parse_reward_answer(res->body, "the answer");
  } catch (const Error& e) {
    why = e.what();
    return false;
  }
  return true;
}

}  // namespace

std::vector<float> remote_rewards(const std::vector<RewardRequest>& samples, const RemoteRewardOptions& o) {
  const HttpUrl u = parse_http_url(o.url);
  std::vector<float> rewards(samples.size(), 0.0f);
  std::vector<std::string> errors(samples.size());
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  const auto timeout = std::chrono::duration<double>(o.timeout_s);
  auto worker = [&] {
    httplib::Client client(u.host, u.port);
    client.set_connection_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
    client.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
    client.set_write_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
    for (size_t i = next++; i < samples.size() && !failed; i = next++) {
      const std::string body = samples[i].to_json().dump();
      double wait = o.backoff_s;
      std::string why;
      bool ok = false;
      for (int64_t attempt = 0; attempt <= o.retries && !ok; ++attempt) {
        if (attempt > 0) {
          std::this_thread::sleep_for(std::chrono::duration<double>(wait));
          wait *= 2;
        }
        ok = try_once(client, u, body, o.timeout_s, rewards[i], why);
      }
      if (!ok) {
        errors[i] = why;
        failed = true;  // the others stop taking new samples
      }
    }
  };
  const size_t n_workers = std::min<size_t>(size_t(std::max<int64_t>(1, o.concurrency)), samples.size());
  std::vector<std::thread> workers;
  for (size_t w = 0; w < n_workers; ++w) workers.emplace_back(worker);
  for (auto& t : workers) t.join();
  for (size_t i = 0; i < samples.size(); ++i)
    LS_CHECK(errors[i].empty(), "--rm-url ", o.url, ": sample ", i, " failed after ", o.retries + 1,
             " attempts: ", errors[i]);
  return rewards;
}

}  // namespace lockstep::rl
