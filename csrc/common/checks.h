// Helpers for argument checks: error messages name the tensor, its shape, dtype and device
// the way Python users know them.
#pragma once

#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace fastnorm {

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// "shape [2, 3], dtype torch.float32, device cpu"
inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", dtype " << dtype_name(t.scalar_type()) << ", device " << t.device();
  return os.str();
}

inline bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

inline bool is_normalizable_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || is_reduced_float(t);
}

}  // namespace fastnorm
