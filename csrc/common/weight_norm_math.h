// Weight-norm math shared by the CPU and the CUDA kernels: w = g * v / ||v|| with the norm
// taken over every dimension but one, and its gradients. `eps` is added under the square
// root (0 gives torch._weight_norm exactly, NaN for a zero-norm slice as torch).
#pragma once

#include "common/batch_norm_math.h"

namespace fastnorm {

template <typename T>
FASTNORM_HD inline T wn_norm(T sum_squares, double eps) {
  return fn_sqrt(sum_squares + T(eps));
}

// Backward per slice d, from dot = sum(grad_w * v) over the slice:
//   grad_g = dot / n,  grad_v = a * (grad_w + c * v)  with a = g / n, c = -dot / n^2.
// The sum grad_w + c * v cancels when a slice is (nearly) parallel to its gradient (a
// one-element slice: exactly), so the kernels take it with c as an unevaluated sum
// c_hi + c_lo of two values of the accumulation type and fused multiply-adds.
template <typename T>
struct WeightNormGrad {
  T grad_g;
  T a;
  T c_hi;
  T c_lo;
};

template <typename T>
FASTNORM_HD inline WeightNormGrad<T> wn_grad(double g, double norm, double dot) {
  const double inv = 1.0 / norm;
  const double c = -dot * inv * inv;
  const T c_hi = T(c);
  return {T(dot * inv), T(g * inv), c_hi, T(c - double(c_hi))};
}

// The same coefficients in T alone (torch's kernels' rounding), c_lo zero: for slices long
// enough that the cancellation is no concern. One division instead of a float64 chain.
template <typename T>
FASTNORM_HD inline WeightNormGrad<T> wn_grad_plain(T g, T norm, T dot) {
  const T inv = T(1) / norm, grad_g = dot * inv;
  return {grad_g, g * inv, -grad_g * inv, T(0)};
}

// g or grad_g: one value per slice, stored in the weight's dtype T or in the accumulation
// dtype A (torch keeps g in the weight's dtype; float32 g with low-precision weights is
// allowed too). Read and written in place, so that g needs no conversion before the kernel
// nor grad_g after it: each would be one more launch on CUDA.
template <typename T, typename A>
struct SliceValues {
  void* p;
  bool in_acc;  // stored as A
  FASTNORM_HD double get(int64_t d) const {
    return in_acc ? double(static_cast<const A*>(p)[d]) : double(A(static_cast<const T*>(p)[d]));
  }
  FASTNORM_HD void set(int64_t d, A x) const {
    if (in_acc) {
      static_cast<A*>(p)[d] = x;
    } else {
      static_cast<T*>(p)[d] = T(x);
    }
  }
};

// One value of grad_v.
template <typename T>
FASTNORM_HD inline T wn_grad_v(const WeightNormGrad<T>& k, T grad_w, T v) {
  return k.a * ::fma(v, k.c_lo, ::fma(v, k.c_hi, grad_w));
}

}  // namespace fastnorm
