// NaN and infinity in weights: found by name at load and by audit, never computed with.
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace lockstep {

struct NonFinite {
  int64_t count = 0;   // NaN, +Inf and -Inf values
  int64_t first = -1;  // flat index of the first, -1 when none
  float first_value = 0;
};

NonFinite find_non_finite(const float* values, int64_t n);

// Throws Error "<where>: tensor '<name>' holds N non-finite values (the first, nan, at
// flat index i)" when the f32 tensor `t` holds any.
void check_finite(const Tensor& t, const std::string& where, const std::string& name);

}  // namespace lockstep
