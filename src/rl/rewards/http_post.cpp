#include "rl/rewards/http_post.h"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#include "core/error.h"

namespace lockstep::rl {

HttpUrl parse_http_url(const std::string& url, const std::string& flag) {
  const std::string scheme = "http://";
  LS_CHECK(url.rfind(scheme, 0) == 0, flag, ": expected http://HOST:PORT/PATH, got '", url, "'");
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
             flag, ": bad port '", port, "' in '", url, "'");
    u.port = std::stoi(port);
    LS_CHECK(u.port > 0 && u.port < 65536, flag, ": port ", u.port, " out of range in '", url, "'");
  }
  LS_CHECK(!u.host.empty(), flag, ": no host in '", url, "'");
  return u;
}

namespace {

// httplib's error names ("Read") in words a user can act on.
std::string describe(httplib::Error e, const HttpPostOptions& o) {
  const std::string limit = " (" + o.timeout_flag + " " + std::to_string(o.timeout_s).substr(0, 6) + " s)";
  switch (e) {
    case httplib::Error::Connection: return "cannot connect (refused, or no answer" + limit + ")";
    case httplib::Error::ConnectionTimeout: return "connecting timed out" + limit;
    case httplib::Error::Read: return "no answer in time" + limit + ", or the connection closed";
    case httplib::Error::Write: return "sending the request failed" + limit;
    default: return "request failed (" + httplib::to_string(e) + ")";
  }
}

// One attempt: true when the answer was accepted, else why not.
bool try_once(httplib::Client& client, const HttpUrl& u, size_t i, const std::string& body, const HttpPostOptions& o,
              const std::function<void(size_t, const std::string&)>& accept, std::string& why) {
  auto res = client.Post(u.path, body, "application/json");
  if (!res) {
    why = describe(res.error(), o);
    return false;
  }
  if (res->status < 200 || res->status >= 300) {
    why = "HTTP status " + std::to_string(res->status);
    return false;
  }
  try {
    accept(i, res->body);
  } catch (const Error& e) {
    why = e.what();
    return false;
  }
  return true;
}

}  // namespace

void post_json_all(const std::vector<std::string>& bodies, const HttpPostOptions& o,
                   const std::function<void(size_t, const std::string&)>& accept) {
  const HttpUrl u = parse_http_url(o.url, o.url_flag);
  std::vector<std::string> errors(bodies.size());
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  const auto timeout = std::chrono::duration<double>(o.timeout_s);
  auto worker = [&] {
    httplib::Client client(u.host, u.port);
    client.set_connection_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
    client.set_read_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
    client.set_write_timeout(std::chrono::duration_cast<std::chrono::microseconds>(timeout));
    for (size_t i = next++; i < bodies.size() && !failed; i = next++) {
      double wait = o.backoff_s;
      std::string why;
      bool ok = false;
      for (int64_t attempt = 0; attempt <= o.retries && !ok; ++attempt) {
        if (attempt > 0) {
          std::this_thread::sleep_for(std::chrono::duration<double>(wait));
          wait *= 2;
        }
        ok = try_once(client, u, i, bodies[i], o, accept, why);
      }
      if (!ok) {
        errors[i] = why;
        failed = true;  // the others stop taking new bodies
      }
    }
  };
  const size_t n_workers = std::min<size_t>(size_t(std::max<int64_t>(1, o.concurrency)), bodies.size());
  std::vector<std::thread> workers;
  for (size_t w = 0; w < n_workers; ++w) workers.emplace_back(worker);
  for (auto& t : workers) t.join();
  for (size_t i = 0; i < bodies.size(); ++i)
    LS_CHECK(errors[i].empty(), o.url_flag, " ", o.url, ": ", o.item, " ", i, " failed after ", o.retries + 1,
             " attempts: ", errors[i]);
}

}  // namespace lockstep::rl
