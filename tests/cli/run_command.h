// Runs the lockstep binary in a shell and captures its exit status and output.
#pragma once
#include <array>
#include <cstdio>
#include <string>
#include <sys/wait.h>

namespace lockstep::testing {

struct CommandResult {
  int status = -1;  // exit code, or 128 + signal
  std::string output;
};

inline CommandResult run_shell(const std::string& command) {
  CommandResult r;
  std::FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
  int raw = pclose(p);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
  return r;
}

inline CommandResult run_lockstep(const std::string& args) { return run_shell(std::string(LOCKSTEP_BINARY) + " " + args); }

}  // namespace lockstep::testing
