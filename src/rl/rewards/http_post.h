// JSON POSTs to an outside service of the RL loop (a reward model, an environment): `concurrency`
// at a time, each retried with doubling backoff when it fails (no connection, timeout, a non-2xx
// status, or an answer its caller cannot use); after a body's last retry the whole call fails with
// an error naming the flag, the URL, the body's index and the last failure.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace lockstep::rl {

struct HttpUrl {
  std::string host;
  int port = 80;
  std::string path = "/";
};

// Only plain http (the service is local or on a private network); errors name `flag`.
HttpUrl parse_http_url(const std::string& url, const std::string& flag = "--rm-url");

struct HttpPostOptions {
  std::string url;
  std::string url_flag = "--rm-url";          // named by errors
  std::string timeout_flag = "--rm-timeout";  // named by timeout errors
  std::string item = "sample";                // what one body is, in errors
  int64_t concurrency = 16;
  double timeout_s = 30;   // connect, read and write, per attempt
  int64_t retries = 3;     // attempts after the first
  double backoff_s = 0.5;  // before the first retry; doubles each time
};

// Posts every body; `accept(i, answer)` takes answer i, or throws lockstep::Error to have the body
// retried (its message is the failure an error reports).
void post_json_all(const std::vector<std::string>& bodies, const HttpPostOptions& options,
                   const std::function<void(size_t, const std::string&)>& accept);

}  // namespace lockstep::rl
