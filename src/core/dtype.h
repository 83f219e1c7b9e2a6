// Element types and the bf16 <-> fp32 conversions of the precision recipes.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace lockstep {

enum class DType : uint8_t { f32, bf16, f16, f64, i32, i64, u8 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // safetensors spelling: F32, BF16, ...
DType dtype_from_name(const std::string& name, const std::string& where);

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest, ties to even; NaN stays NaN (quiet).
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t((bits + rounding) >> 16);
}

// fp32 -> nearest bf16 value, kept in an fp32 container.
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

float f16_to_f32(uint16_t h);

}  // namespace lockstep
