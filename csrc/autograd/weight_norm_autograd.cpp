// Autograd for weight norm in C++: first-order gradients from the fused backward kernel;
// a graph of the backward (double backward) from differentiable ATen ops. weight_norm_norms
// gets its gradient too (grad_v = grad_norm * v / norm), for compositions built on it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace fastnorm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using WeightNormFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double);
using BackwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using NormsFn = Tensor(const Tensor&, int64_t, double);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// Sum over every dimension but dim (all of them for -1), keeping dims.
Tensor sum_except(const Tensor& t, int64_t dim) {
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (d != dim) dims.push_back(d);
  }
  return dims.empty() ? t : t.sum(dims, /*keepdim=*/true);
}

// The gradients of w = g * v / n, n = sqrt(sum(v^2) + eps), through differentiable ATen ops:
//   grad_g = dot / n, grad_v = (g / n) * (grad_w - v * dot / n^2), dot = sum(grad_w * v).
std::vector<Tensor> composite_backward(const Tensor& grad_w, const Tensor& v, const Tensor& g, int64_t dim,
                                       double eps) {
  const auto acc = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor vf = v.to(acc), gwf = grad_w.to(acc);
  const Tensor n = (sum_except(vf.square(), dim) + eps).sqrt();
  const Tensor gs = g.to(acc).reshape(n.sizes());
  const Tensor dot = sum_except(gwf * vf, dim);
  const Tensor grad_v = gs / n * (gwf - vf * dot / n.square());
  const Tensor grad_g = (dot / n).reshape(g.sizes());
  return {grad_v.to(v.scalar_type()), grad_g.to(g.scalar_type())};
}

class WeightNorm : public torch::autograd::Function<WeightNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& v, const Tensor& g, int64_t dim, double eps) {
    static const auto fwd = op<WeightNormFn>("fastnorm::weight_norm");
    Tensor w, norm;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(w, norm) = fwd.call(v, g, dim, eps);
    }
    ctx->save_for_backward({v, g, norm});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({norm});
    ctx->set_materialize_grads(false);  // norm's gradient is never used: no zeros made for it
    return {w, norm};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &v = saved[0], &g = saved[1], &norm = saved[2];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const Tensor& grad_w = grads[0];
    if (!grad_w.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    if (at::GradMode::is_enabled()) {  // a graph of the backward: double backward
      auto grads_vg = composite_backward(grad_w, v, g, dim, eps);
      return {grads_vg[0], grads_vg[1], Tensor(), Tensor()};
    }
    static const auto bwd = op<BackwardFn>("fastnorm::weight_norm_backward");
    at::AutoDispatchBelowADInplaceOrView guard;  // straight to the kernel: no autograd fallback per call
    auto [grad_v, grad_g] = bwd.call(grad_w, v, g, norm, dim);
    return {grad_v, grad_g, Tensor(), Tensor()};
  }
};

class WeightNormNorms : public torch::autograd::Function<WeightNormNorms> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& v, int64_t dim, double eps) {
    static const auto norms = op<NormsFn>("fastnorm::weight_norm_norms");
    Tensor n;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      n = norms.call(v, dim, eps);
    }
    ctx->save_for_backward({v, n});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["eps"] = eps;
    return {n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& v = saved[0];
    const int64_t dim = ctx->saved_data["dim"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    std::vector<int64_t> shape(v.dim(), 1);
    if (dim != -1) shape[dim] = v.size(dim);
    // d norm / d v = v / norm; for a graph of the backward, the norm through ATen ops too.
    const Tensor n = at::GradMode::is_enabled() ? (sum_except(v.to(saved[1].scalar_type()).square(), dim) + eps).sqrt()
                                                : saved[1].reshape(shape);
    const Tensor scale = grads[0].reshape(shape) / n;
    return {(v * scale).to(v.scalar_type()), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> weight_norm_autograd(const Tensor& v, const Tensor& g, int64_t dim, double eps) {
  auto r = WeightNorm::apply(v, g, dim, eps);
  return {r[0], r[1]};
}

Tensor weight_norm_norms_autograd(const Tensor& v, int64_t dim, double eps) {
  return WeightNormNorms::apply(v, dim, eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnorm, Autograd, m) {
  m.impl("weight_norm", &weight_norm_autograd);
  m.impl("weight_norm_norms", &weight_norm_norms_autograd);
}

}  // namespace fastnorm
