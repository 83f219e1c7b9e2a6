// Shared helpers for model tests: the fixture model and its HF float64 reference.
#pragma once
#include <cstring>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "model/qwen3_moe.h"

namespace lockstep::testing {

inline std::string fixture_model_dir() { return std::string(LOCKSTEP_FIXTURES) + "/hf-tiny-qwen3-moe"; }

inline const SafetensorsReader& golden() {
  static SafetensorsReader r = SafetensorsReader::open(fixture_model_dir() + "/golden.safetensors");
  return r;
}

inline std::vector<int32_t> golden_ids(const std::string& name) {
  const Tensor& t = golden().get(name);
  std::vector<int32_t> out(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) out[i] = int32_t(t.data<int64_t>()[i]);
  return out;
}

inline std::vector<double> golden_f64(const std::string& name) {
  const Tensor& t = golden().get(name);
  return std::vector<double>(t.data<double>(), t.data<double>() + t.numel());
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace lockstep::testing
