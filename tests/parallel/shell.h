// Runs shell commands (the lockstep binary, mpirun) for the CLI tests and a scratch dir.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace lockstep::ptest {

struct Run {
  int status = -1;
  std::string output;  // stdout and stderr
};

inline Run shell(const std::string& command) {
  Run r;
  std::FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  const int raw = pclose(p);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  return r;
}

inline std::string lockstep_bin() { return LOCKSTEP_BINARY; }
// mpirun as CI runs it (root, 2 cores): one CPU thread per rank.
inline std::string mpirun(int np) {
  return "mpirun --oversubscribe --allow-run-as-root -np " + std::to_string(np) +
         " -x LOCKSTEP_NUM_THREADS=1 " + lockstep_bin();
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A fresh directory removed at scope exit.
struct ScratchDir {
  std::filesystem::path path;
  explicit ScratchDir(const std::string& tag) {
    path = std::filesystem::temp_directory_path() / ("lockstep_parallel_" + tag + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() { std::filesystem::remove_all(path); }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

}  // namespace lockstep::ptest
