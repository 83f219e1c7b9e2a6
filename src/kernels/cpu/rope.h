// Rotary position embeddings, Qwen3 (rotate-half) style.
#pragma once
#include <cstdint>
#include <vector>

namespace lockstep::cpu {

// cos/sin tables [max_positions, head_dim / 2]; angles pos * theta^(-2i/d) are formed in
// double and rounded once to fp32, so every position has one exact table entry.
struct RopeTable {
  int64_t head_dim = 0;
  int64_t max_positions = 0;
  std::vector<float> cos, sin;
  static RopeTable build(int64_t head_dim, int64_t max_positions, double theta);
};

// In place on x[T, heads, head_dim]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with
// x1 the first half of each head and x2 the second.
void rope(float* x, const int32_t* positions, int64_t T, int64_t heads, const RopeTable& table);

}  // namespace lockstep::cpu
