// Backward of the rotary embedding: the rotation's transpose (rotation by -angle).
#pragma once
#include <cstdint>

#include "kernels/cpu/rope.h"

namespace lockstep::cpu {

// In place on dx [T, heads, head_dim]: (d1, d2) -> (d1 cos + d2 sin, d2 cos - d1 sin).
void rope_backward(float* dx, const int32_t* positions, int64_t T, int64_t heads, const RopeTable& table);

}  // namespace lockstep::cpu
