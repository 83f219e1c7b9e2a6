// Helpers of the GPU tests: skip without a device, device buffers, bf16 random data.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "core/device_memory.h"
#include "core/dtype.h"

#define LS_SKIP_WITHOUT_GPU() \
  if (!::lockstep::cuda_available()) GTEST_SKIP() << "no CUDA device"

namespace lockstep::testing {

template <typename T>
struct DeviceVec {
  std::shared_ptr<void> mem;
  int64_t n = 0;
  explicit DeviceVec(int64_t count) : mem(device_alloc(Device::cuda, size_t(std::max<int64_t>(count, 1)) * sizeof(T))), n(count) {}
  explicit DeviceVec(const std::vector<T>& host) : DeviceVec(int64_t(host.size())) { put(host); }
  T* get() const { return static_cast<T*>(mem.get()); }
  void put(const std::vector<T>& host) {
    device_copy(Device::cuda, mem.get(), Device::cpu, host.data(), host.size() * sizeof(T));
  }
  std::vector<T> take() const {
    std::vector<T> out(static_cast<size_t>(n));
    cudaDeviceSynchronize();
    device_copy(Device::cpu, out.data(), Device::cuda, mem.get(), out.size() * sizeof(T));
    return out;
  }
  // Poison: NaN bit patterns, so an unwritten output shows.
  void poison() { cudaMemset(mem.get(), 0xff, size_t(n) * sizeof(T)); }
};

inline std::vector<uint16_t> random_bf16(int64_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<uint16_t> out(static_cast<size_t>(n));
  for (auto& v : out) v = f32_to_bf16(d(rng));
  return out;
}

// Gradient-like fp32 values: log-uniform magnitudes over 2^-20 .. 2^4 (so the lo half of a bf16
// hi + lo split matters) and an exact zero every 97th value.
inline std::vector<float> random_gradient(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f), e(-20.0f, 4.0f);
  std::vector<float> out(static_cast<size_t>(n));
  for (size_t i = 0; i < out.size(); ++i) out[i] = i % 97 == 5 ? 0.0f : d(rng) * std::exp2(e(rng));
  return out;
}

inline bool same_bits_f(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace lockstep::testing
