// An environment server for the multi-turn tests on a free 127.0.0.1 port: POST /env records each
// episode's body and answers it with the test's function; /garbage and /no_done answer replies
// that are not the format (the error paths).
#pragma once
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "loopback_server.h"

namespace lockstep::rl::testing {

class EnvTestServer {
 public:
  using Answer = std::function<nlohmann::json(const nlohmann::json& body)>;
  explicit EnvTestServer(Answer answer) : answer_(std::move(answer)) {
    httplib::Server& server = loopback_.server();
    server.Post("/env", [this](const httplib::Request& req, httplib::Response& res) {
      const nlohmann::json body = nlohmann::json::parse(req.body);
      {
        std::lock_guard<std::mutex> lock(mu_);
        bodies_.push_back(body);
      }
      res.set_content(answer_(body).dump(), "application/json");
    });
    server.Post("/garbage", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("{\"observation\": ", "application/json");
    });
    server.Post("/no_done", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("{\"observation\": \"x\"}", "application/json");
    });
    loopback_.start();
  }
  std::string url(const std::string& path) const { return loopback_.url(path); }
  std::vector<nlohmann::json> bodies() {
    std::lock_guard<std::mutex> lock(mu_);
    return bodies_;
  }

 private:
  Answer answer_;
  LoopbackServer loopback_;
  std::mutex mu_;
  std::vector<nlohmann::json> bodies_;
};

}  // namespace lockstep::rl::testing
