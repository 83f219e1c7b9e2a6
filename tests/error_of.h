// The message of the lockstep::Error a call throws, for tests of error paths.
#pragma once
#include <functional>
#include <string>

#include "core/error.h"

namespace lockstep::testing {

// "" when `f` throws nothing.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace lockstep::testing
