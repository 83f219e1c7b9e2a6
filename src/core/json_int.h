// Integers read from JSON (configs, JSONL fields, requests), range-checked before any
// narrowing, so a large value can never wrap into a small type.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "core/error.h"

namespace lockstep {

// The value when `v` is an integer in [lo, hi] (unsigned values above int64 are out of
// every range); nullopt otherwise.
template <typename Json>
std::optional<int64_t> json_int_in(const Json& v, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) return std::nullopt;
  if (v.is_number_unsigned() && v.template get<uint64_t>() > uint64_t(INT64_MAX)) return std::nullopt;
  const int64_t x = v.template get<int64_t>();
  if (x < lo || x > hi) return std::nullopt;
  return x;
}

// json_int_in, or Error "<what> must be an integer in [lo, hi], got <v>".
template <typename Json>
int64_t json_int(const Json& v, int64_t lo, int64_t hi, const std::string& what) {
  const auto x = json_int_in(v, lo, hi);
  LS_CHECK(x, what, " must be an integer in [", lo, ", ", hi, "], got ", v.dump());
  return *x;
}

}  // namespace lockstep
