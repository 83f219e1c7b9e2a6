// A tensor: shape, element type, device and storage (owned, or a view of a mapped file).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace lockstep {

enum class Device : uint8_t { cpu, cuda };
const char* device_name(Device d);
Device device_from_name(const std::string& name);

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;
  // Fresh storage, zero-filled.
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::cpu);
  // A view of memory kept alive by `owner` (e.g. a mapped safetensors file).
  static Tensor view(Shape shape, DType dtype, void* data, std::shared_ptr<void> owner);

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int ndim() const { return int(shape_.size()); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  bool defined() const { return data_ != nullptr; }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  template <typename T>
  T* data() { return static_cast<T*>(data_); }
  template <typename T>
  const T* data() const { return static_cast<const T*>(data_); }

  // Conversions on the CPU (copies).
  Tensor to_f32() const;                // from f32, bf16, f16, f64
  Tensor to_dtype(DType target) const;  // f32 -> bf16 rounds to nearest even
  Tensor clone() const;
  Tensor reshaped(Shape shape) const;   // shares storage
  Tensor to_device(Device device) const;

 private:
  Shape shape_;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
  void* data_ = nullptr;
  std::shared_ptr<void> owner_;
};

}  // namespace lockstep
