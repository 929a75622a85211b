// Weight-norm kernel interface shared by the op front (weight_norm.cpp) and the device
// files. The front views v as (outer, D, inner) over dense memory, D = v.size(dim) (1 for
// the whole-tensor norm): slice d is `outer` runs of `inner` values.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastnorm {

struct WeightNormArgs {
  int64_t outer = 1, D = 1, inner = 1;
  at::Tensor v;       // dense in that view
  at::Tensor g;       // D values, contiguous, v's or the accumulation dtype (undefined for weight_norm_norms)
  at::Tensor norm;    // [D] accumulation dtype: written by forward and norms, read by backward
  at::Tensor w;       // forward output, like v
  at::Tensor grad_w;  // backward input, like v
  at::Tensor grad_v;  // backward output, like v
  at::Tensor grad_g;  // D values, contiguous, g's dtype
  double eps = 0.0;
};

// Whether g (and grad_g, which has g's dtype) is stored in the accumulation dtype rather
// than in v's: float32 g with a float16/bfloat16 weight. The kernels read and write both
// through SliceValues (common/weight_norm_math.h).
inline bool g_in_acc(const WeightNormArgs& a) { return a.g.defined() && a.g.scalar_type() != a.v.scalar_type(); }

namespace cpu {
void weight_norm_forward(const WeightNormArgs& a);   // norm, w
void weight_norm_backward(const WeightNormArgs& a);  // grad_v, grad_g
void weight_norm_norms(const WeightNormArgs& a);     // norm
}  // namespace cpu
namespace cuda {
void weight_norm_forward(const WeightNormArgs& a);
void weight_norm_backward(const WeightNormArgs& a);
void weight_norm_norms(const WeightNormArgs& a);
}  // namespace cuda

}  // namespace fastnorm
