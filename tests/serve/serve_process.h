// Starts `lockstep serve` on loopback for a test (--port 0), reads the address it prints,
// and stops it with SIGTERM (SIGKILL if it has not exited within the timeout), so every
// test's server ends with the test. Also: the model directories the serve tests use.
#pragma once
#include <gtest/gtest.h>
#include <httplib.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "checkpoint/safetensors.h"
#include "model/weights.h"

extern char** environ;

namespace lockstep::testing {

namespace fs = std::filesystem;

class ServeProcess {
 public:
  // `args` are the flags after `serve` (split on spaces); --host/--port are added.
  explicit ServeProcess(const std::string& args) {
    std::vector<std::string> argv = {LOCKSTEP_BINARY, "serve", "--host", "127.0.0.1", "--port", "0"};
    std::istringstream in(args);
    for (std::string a; in >> a;) argv.push_back(a);
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe failed");
    stderr_path_ = fs::temp_directory_path() /
                   ("lockstep_serve_" + std::to_string(getpid()) + "_" + std::to_string(counter()++) + ".log");
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    posix_spawn_file_actions_addclose(&actions, out[0]);
    posix_spawn_file_actions_addopen(&actions, 2, stderr_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (posix_spawn(&pid_, cargv[0], &actions, nullptr, cargv.data(), environ) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
    close(out[1]);
    out_fd_ = out[0];
    if (pid_ < 0) throw std::runtime_error("cannot start " + argv[0]);
    // The address line, within 60 s (loading the model is quick; the machine may be busy).
    const std::string marker = "listening on http://127.0.0.1:";
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (stdout_.find('\n', stdout_.find(marker) == std::string::npos ? stdout_.size() : stdout_.find(marker)) ==
           std::string::npos) {
      const int left = int(
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
      pollfd p{out_fd_, POLLIN, 0};
      if (left <= 0 || poll(&p, 1, left) <= 0) break;
      char buf[512];
      const ssize_t n = read(out_fd_, buf, sizeof buf);
      if (n <= 0) break;
      stdout_.append(buf, size_t(n));
    }
    const size_t at = stdout_.find(marker);
    if (at == std::string::npos) {
      terminate();
      throw std::runtime_error("lockstep serve did not start: " + stdout_ + log());
    }
    port_ = std::stoi(stdout_.substr(at + marker.size()));
  }
  ~ServeProcess() { terminate(); }
  ServeProcess(const ServeProcess&) = delete;

  int port() const { return port_; }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
  std::unique_ptr<httplib::Client> client(int timeout_s = 60) const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port_);
    c->set_read_timeout(timeout_s, 0);
    c->set_write_timeout(timeout_s, 0);
    c->set_connection_timeout(5, 0);
    return c;
  }
  std::string log() const {
    std::ifstream in(stderr_path_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }
  void signal(int sig) const {
    if (pid_ > 0) kill(pid_, sig);
  }
  // Sends SIGTERM and waits (up to `timeout`, then SIGKILL); returns the exit status, or
  // 128 + signal. Idempotent.
  int terminate(std::chrono::seconds timeout = std::chrono::seconds(20)) {
    if (pid_ <= 0) return status_;
    kill(pid_, SIGTERM);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int raw = 0;
    while (waitpid(pid_, &raw, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &raw, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    pid_ = -1;
    close(out_fd_);
    status_ = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
    fs::remove(stderr_path_);
    return status_;
  }

 private:
  static int& counter() {
    static int n = 0;
    return n;
  }
  pid_t pid_ = -1;
  int out_fd_ = -1, port_ = 0, status_ = -1;
  std::string stdout_;
  fs::path stderr_path_;
};

// A model directory `name` (the served model name) in a per-process temporary folder, removed
// (with the folder once empty) when this goes out of scope, also when a test fails early.
class TempModel {
 public:
  explicit TempModel(fs::path dir) : dir_(std::move(dir)) {}
  TempModel(TempModel&& other) noexcept : dir_(std::exchange(other.dir_, {})) {}
  TempModel(const TempModel&) = delete;
  ~TempModel() {
    if (dir_.empty()) return;
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
    fs::remove(dir_.parent_path(), ignored);  // only succeeds once empty
  }
  const fs::path& path() const { return dir_; }
  std::string string() const { return dir_.string(); }

 private:
  fs::path dir_;
};

// Config `j`, random weights from `seed`, and the real Qwen3 tokenizer beside them when asked.
inline TempModel make_model(const std::string& name, const nlohmann::json& j, uint64_t seed, bool with_tokenizer) {
  const fs::path dir = fs::temp_directory_path() / ("lockstep_serve_" + std::to_string(getpid())) / name;
  fs::create_directories(dir);
  TempModel model(dir);
  std::ofstream(dir / "config.json") << j.dump();
  auto weights = ModelWeights::random(ModelConfig::from_json(j, "config.json"), seed, Precision::float32);
  std::map<std::string, Tensor> tensors;
  for (auto& [tensor_name, t] : weights.named()) tensors[tensor_name] = t->to_dtype(DType::bf16);
  write_safetensors((dir / "model.safetensors").string(), tensors);
  if (with_tokenizer) {
    const std::string tok = std::string(LOCKSTEP_FIXTURES) + "/qwen3-tokenizer/";
    fs::copy_file(tok + "tokenizer.json", dir / "tokenizer.json", fs::copy_options::overwrite_existing);
    fs::copy_file(tok + "tokenizer_config.json", dir / "tokenizer_config.json", fs::copy_options::overwrite_existing);
  }
  return model;
}

// A tiny random Qwen3-MoE with the Qwen3 vocabulary and tokenizer.
inline TempModel make_text_model(const std::string& name, int64_t max_positions = 256, uint64_t seed = 11) {
  nlohmann::json j = {{"model_type", "qwen3_moe"},
                      {"vocab_size", 151936},
                      {"hidden_size", 16},
                      {"num_hidden_layers", 1},
                      {"num_attention_heads", 2},
                      {"num_key_value_heads", 1},
                      {"head_dim", 8},
                      {"num_experts", 4},
                      {"num_experts_per_tok", 2},
                      {"moe_intermediate_size", 8},
                      {"max_position_embeddings", max_positions}};
  return make_model(name, j, seed, true);
}

inline std::string tiny_model() { return std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe"; }

// The fixture's architecture (no tokenizer) with other random weights and a longer context
// (so a request can stay in flight for a while).
inline TempModel make_tiny_variant(const std::string& name, uint64_t seed, int64_t max_positions = 4096) {
  std::ifstream in(tiny_model() + "/config.json");
  nlohmann::json j = nlohmann::json::parse(in);
  j["max_position_embeddings"] = max_positions;
  return make_model(name, j, seed, false);
}

inline nlohmann::json post_json(httplib::Client& c, const std::string& path, const nlohmann::json& body,
                                int* status = nullptr) {
  auto r = c.Post(path.c_str(), body.dump(), "application/json");
  if (!r) {
    ADD_FAILURE() << "POST " << path << " failed: " << httplib::to_string(r.error());
    return {};
  }
  if (status) *status = r->status;
  return nlohmann::json::parse(r->body, nullptr, false);
}

}  // namespace lockstep::testing
