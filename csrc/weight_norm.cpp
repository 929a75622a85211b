// The weight-norm ops' front: one validation site, the (outer, D, inner) view over dense
// memory (a channels_last convolution weight keeps its layout when dim is 0), then the CPU
// or CUDA kernels.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "weight_norm.h"

namespace fastnorm {
namespace {

using at::Tensor;

#ifdef FASTNORM_WITH_CUDA
#define FASTNORM_RUN_WN_KERNEL(on_cuda, fn, a) ((on_cuda) ? cuda::fn(a) : cpu::fn(a))
#else
#define FASTNORM_RUN_WN_KERNEL(on_cuda, fn, a) cpu::fn(a)
#endif

at::ScalarType acc_dtype(const Tensor& v) { return v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_v(const char* op, const Tensor& v, int64_t dim) {
  TORCH_CHECK(is_normalizable_dtype(v.scalar_type()), op,
              ": expected a floating-point weight (float64, float32, float16 or bfloat16), got v of ", describe(v));
  TORCH_CHECK(dim == -1 || (dim >= 0 && dim < v.dim()), op, ": dim ", dim, " is out of range for v of ", describe(v),
              " (-1 or None takes the norm over the whole tensor)");
}

int64_t slices(const Tensor& v, int64_t dim) { return dim == -1 ? 1 : v.size(dim); }

// A per-slice tensor (g, norm: one value per slice in any shape) as the kernels read it:
// contiguous in the accumulation dtype. Usually it is already: no op is dispatched then.
Tensor per_slice(const Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.is_contiguous() ? t : t.to(acc).contiguous();
}

// g holds one value per slice: shape [D], [] (D == 1), or v's rank with 1 everywhere but dim.
void check_g(const char* op, const Tensor& v, const Tensor& g, int64_t dim) {
  const int64_t D = slices(v, dim);
  bool fits = g.numel() == D && (g.dim() <= 1 || g.dim() == v.dim());
  if (fits && g.dim() == v.dim() && dim != -1) {
    for (int64_t d = 0; d < v.dim(); ++d) fits = fits && g.size(d) == (d == dim ? D : 1);
  }
  TORCH_CHECK(fits, op, ": g of ", describe(g), " does not fit v of ", describe(v), " with dim=", dim,
              ": expected ", D, " value(s), shaped [", D, "] or with v's rank and size 1 outside dim");
  TORCH_CHECK(g.device() == v.device(), op, ": expected g on v's device ", v.device(), ", got g of ", describe(g));
  const auto dt = g.scalar_type();
  TORCH_CHECK(dt == v.scalar_type() || (dt == at::kFloat && is_reduced_float(v.scalar_type())), op,
              ": expected g of dtype ", dtype_name(v.scalar_type()),
              is_reduced_float(v.scalar_type()) ? " or torch.float32" : "", ", got g of ", describe(g));
}

// v dense in a view the kernels handle; fills outer, D, inner.
Tensor dense_view(const Tensor& v, int64_t dim, WeightNormArgs& a) {
  const int64_t numel = v.numel();
  if (dim == -1 || (dim == 0 && v.is_non_overlapping_and_dense() &&
                    (v.size(0) <= 1 || v.stride(0) * v.size(0) == numel))) {
    // Whole tensor, or dim 0 with each slice a block of memory: any order inside works.
    a.outer = 1;
    a.D = dim == -1 ? 1 : v.size(0);
    a.inner = a.D > 0 ? numel / std::max<int64_t>(a.D, 1) : 0;
    return v.is_non_overlapping_and_dense() ? v : v.contiguous();
  }
  a.outer = 1;
  a.inner = 1;
  for (int64_t d = 0; d < dim; ++d) a.outer *= v.size(d);
  for (int64_t d = dim + 1; d < v.dim(); ++d) a.inner *= v.size(d);
  a.D = v.size(dim);
  return v.contiguous();
}

// t in the memory layout of v (dense): as it is, or a copy.
Tensor like(const Tensor& t, const Tensor& v) {
  if (t.strides() == v.strides()) return t;
  Tensor r = at::empty_like(v);
  r.copy_(t);
  return r;
}

std::tuple<Tensor, Tensor> weight_norm(const Tensor& v, const Tensor& g, int64_t dim, double eps) {
  const char* op = "fastnorm.weight_norm";
  check_v(op, v, dim);
  check_g(op, v, g, dim);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  c10::DeviceGuard guard(v.device());
  WeightNormArgs a;
  a.v = dense_view(v, dim, a);
  a.g = g.contiguous();  // (check_g: v's dtype or the accumulation dtype; the kernels read either)
  a.eps = eps;
  a.w = at::empty_like(a.v);
  a.norm = at::empty({a.D}, v.options().dtype(acc_dtype(v)));
  if (v.numel() > 0) {
    FASTNORM_RUN_WN_KERNEL(v.is_cuda(), weight_norm_forward, a);
  } else {
    a.norm.fill_(std::sqrt(eps));  // slices of no values (as weight_norm_norms)
  }
  return {a.w, a.norm};
}

std::tuple<Tensor, Tensor> weight_norm_backward_impl(const char* op, const Tensor& grad_w, const Tensor& v,
                                                     const Tensor& g, const Tensor& norm, int64_t dim, bool in_place) {
  check_v(op, v, dim);
  check_g(op, v, g, dim);
  TORCH_CHECK(grad_w.sizes() == v.sizes() && grad_w.scalar_type() == v.scalar_type() && grad_w.device() == v.device(),
              op, ": expected grad_w with v's shape, dtype and device (", describe(v), "), got ", describe(grad_w));
  TORCH_CHECK(norm.dim() == 1 && norm.numel() == slices(v, dim) && norm.device() == v.device(), op,
              ": expected norm of shape [", slices(v, dim), "] on v's device, got norm of ", describe(norm));
  c10::DeviceGuard guard(v.device());
  WeightNormArgs a;
  a.v = dense_view(v, dim, a);
  a.grad_w = like(grad_w, a.v);
  a.g = g.contiguous();
  a.norm = per_slice(norm, acc_dtype(v));
  // grad_v over grad_w when asked to, or over the copy of grad_w made above (ours alone).
  a.grad_v = in_place || !a.grad_w.is_same(grad_w) ? a.grad_w : at::empty_like(a.v);
  a.grad_g = at::empty(g.sizes(), g.options());  // contiguous, g's shape and dtype
  if (v.numel() > 0) {
    FASTNORM_RUN_WN_KERNEL(v.is_cuda(), weight_norm_backward, a);
  } else {
    // No values: w does not depend on g, grad_g = 0, as torch >= 2.15 (earlier torch divided
    // the empty dot product by the zero norm: NaN).
    a.grad_g.zero_();
  }
  if (in_place && !a.grad_v.is_same(grad_w)) grad_w.copy_(a.grad_v);
  return {a.grad_v, a.grad_g};
}

std::tuple<Tensor, Tensor> weight_norm_backward(const Tensor& grad_w, const Tensor& v, const Tensor& g,
                                                const Tensor& norm, int64_t dim) {
  return weight_norm_backward_impl("fastnorm.weight_norm_backward", grad_w, v, g, norm, dim, false);
}

Tensor weight_norm_backward_(const Tensor& grad_w, const Tensor& v, const Tensor& g, const Tensor& norm, int64_t dim) {
  return std::get<1>(weight_norm_backward_impl("fastnorm.weight_norm_backward_", grad_w, v, g, norm, dim, true));
}

Tensor weight_norm_norms(const Tensor& v, int64_t dim, double eps) {
  const char* op = "fastnorm.weight_norm_norms";
  check_v(op, v, dim);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  c10::DeviceGuard guard(v.device());
  WeightNormArgs a;
  a.v = dense_view(v, dim, a);
  a.eps = eps;
  a.norm = at::empty({a.D}, v.options().dtype(acc_dtype(v)));
  if (v.numel() > 0) {
    FASTNORM_RUN_WN_KERNEL(v.is_cuda(), weight_norm_norms, a);
  } else {
    a.norm.fill_(std::sqrt(eps));
  }
  return a.norm;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("weight_norm", &weight_norm);
  m.impl("weight_norm_backward", &weight_norm_backward);
  m.impl("weight_norm_norms", &weight_norm_norms);
  m.impl("weight_norm_backward_", &weight_norm_backward_);
}

#ifdef FASTNORM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("weight_norm", &weight_norm);
  m.impl("weight_norm_backward", &weight_norm_backward);
  m.impl("weight_norm_norms", &weight_norm_norms);
  m.impl("weight_norm_backward_", &weight_norm_backward_);
}
#endif

}  // namespace fastnorm
