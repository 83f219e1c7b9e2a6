// An HTTP server for the RL tests on a free 127.0.0.1 port: register handlers on server(), then
// start(); it stops (and its thread is joined) with the object.
#pragma once
#include <httplib.h>

#include <chrono>
#include <string>
#include <thread>

namespace lockstep::rl::testing {

class LoopbackServer {
 public:
  ~LoopbackServer() {
    server_.stop();
    if (thread_.joinable()) thread_.join();
  }
  httplib::Server& server() { return server_; }
  void start() {
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    for (int i = 0; i < 200 && !server_.is_running(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::string url(const std::string& path) const { return "http://127.0.0.1:" + std::to_string(port_) + path; }

 private:
  httplib::Server server_;
  int port_ = 0;
  std::thread thread_;
};

}  // namespace lockstep::rl::testing
