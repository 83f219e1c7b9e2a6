// Errors that say what was expected and what was found.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace lockstep {

// Thrown for bad input (files, configs, requests, topologies). The message names the
// file, tensor or field, what was expected and what was found.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(detail::concat(args...));
}

}  // namespace lockstep

// Checks an internal invariant or an input condition; the message pieces are streamed.
#define LS_CHECK(cond, ...)                                                     \
  do {                                                                          \
    if (!(cond)) ::lockstep::fail(__VA_ARGS__);                                 \
  } while (0)
