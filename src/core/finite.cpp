#include "core/finite.h"

#include <cmath>

#include "core/error.h"

namespace lockstep {

NonFinite find_non_finite(const float* values, int64_t n) {
  NonFinite r;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isfinite(values[i])) continue;
    if (r.count++ == 0) r.first = i, r.first_value = values[i];
  }
  return r;
}

void check_finite(const Tensor& t, const std::string& where, const std::string& name) {
  LS_CHECK(t.dtype() == DType::f32, where, ": tensor '", name, "': finiteness is checked on f32 values");
  const NonFinite bad = find_non_finite(t.data<float>(), t.numel());
  LS_CHECK(bad.count == 0, where, ": tensor '", name, "' holds ", bad.count, " non-finite value",
           bad.count == 1 ? "" : "s", " (the first, ", bad.first_value, ", at flat index ", bad.first, ")");
}

}  // namespace lockstep
