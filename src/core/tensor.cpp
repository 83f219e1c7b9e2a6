#include "core/tensor.h"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "core/device_memory.h"
#include "core/error.h"

namespace lockstep {

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

Device device_from_name(const std::string& name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda") return Device::cuda;
  fail("--device: expected 'cpu' or 'cuda', got '", name, "'");
}

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  for (auto d : shape) LS_CHECK(d >= 0, "tensor shape ", shape_str(shape), " has a negative dimension");
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  size_t bytes = std::max<size_t>(t.nbytes(), 1);
  t.owner_ = device_alloc(device, bytes);
  t.data_ = t.owner_.get();
  device_memset_zero(device, t.data_, bytes);
  return t;
}

Tensor Tensor::view(Shape shape, DType dtype, void* data, std::shared_ptr<void> owner) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.data_ = data;
  t.owner_ = std::move(owner);
  return t;
}

Tensor Tensor::to_f32() const {
  LS_CHECK(device_ == Device::cpu, "to_f32: tensor must be on the cpu");
  Tensor out = zeros(shape_, DType::f32);
  float* o = out.data<float>();
  int64_t n = numel();
  switch (dtype_) {
    case DType::f32: std::memcpy(o, data_, n * 4); break;
    case DType::bf16: {
      auto* s = data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = bf16_to_f32(s[i]);
      break;
    }
    case DType::f16: {
      auto* s = data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = f16_to_f32(s[i]);
      break;
    }
    case DType::f64: {
      auto* s = data<double>();
      for (int64_t i = 0; i < n; ++i) o[i] = float(s[i]);
      break;
    }
    default: fail("to_f32: cannot convert a ", dtype_name(dtype_), " tensor to F32");
  }
  return out;
}

Tensor Tensor::to_dtype(DType target) const {
  if (target == dtype_) return clone();
  if (target == DType::f32) return to_f32();
  Tensor f = to_f32();
  Tensor out = zeros(shape_, target);
  int64_t n = numel();
  const float* s = f.data<float>();
  switch (target) {
    case DType::bf16: {
      auto* o = out.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) o[i] = f32_to_bf16(s[i]);
      break;
    }
    case DType::f64: {
      auto* o = out.data<double>();
      for (int64_t i = 0; i < n; ++i) o[i] = s[i];
      break;
    }
    default: fail("to_dtype: cannot convert to ", dtype_name(target));
  }
  return out;
}

Tensor Tensor::clone() const {
  Tensor out = zeros(shape_, dtype_, device_);
  device_copy(device_, out.data_, device_, data_, nbytes());
  return out;
}

Tensor Tensor::reshaped(Shape shape) const {
  LS_CHECK(shape_numel(shape) == numel(), "reshape ", shape_str(shape_), " -> ", shape_str(shape),
           ": element counts differ");
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::to_device(Device device) const {
  if (device == device_) return *this;
  Tensor out = zeros(shape_, dtype_, device);
  device_copy(device, out.data_, device_, data_, nbytes());
  return out;
}

}  // namespace lockstep
