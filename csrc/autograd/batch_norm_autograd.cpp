// Autograd for the two batch-norm forwards, in C++ so that a training step pays no Python
// overhead per layer. First-order gradients come from the fused backward kernel; when a
// graph of the backward is asked for (double backward), the same gradients are computed
// from differentiable ATen ops instead.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/version.h>

#include <optional>
#include <vector>

#include "common/batch_norm_math.h"

namespace fastnorm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor undefined_if_none(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
bool given(const OptTensor& t) { return t.has_value() && t->defined(); }
OptTensor none_if_undefined(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

using TrainFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                   const OptTensor&, const OptTensor&, const OptTensor&,
                                                   const OptTensor&, double, bool, double, int64_t, double);
using ElemtFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                       const OptTensor&, double, int64_t, double);
using BackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const OptTensor&, const OptTensor&,
                                                              const OptTensor&, const OptTensor&, double, bool,
                                                              int64_t, double, bool, bool, bool);

template <typename Fn>
c10::TypedOperatorHandle<Fn> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// The gradients written with differentiable ATen ops (double backward). In training the
// statistics are recomputed from the input so that their dependence on it is part of the
// graph.
// The activation's derivative uses the pre-activation z (recomputed, so differentiable)
// when activation_needs_z, else the sign of the saved output (a constant mask).
variable_list composite_backward(const Tensor& grad_out, const Tensor& input, const Tensor& saved_mean,
                                 const Tensor& saved_var, const Tensor& weight, const Tensor& bias,
                                 const Tensor& residual, const Tensor& output, bool has_residual, double eps,
                                 bool training, Activation act, double slope) {
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> dims{0}, shape(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  shape[1] = input.size(1);
  const Tensor x = input.to(acc), dy = grad_out.to(acc);
  Tensor mean, var;
  if (training) {
    mean = x.mean(dims, /*keepdim=*/true);
    var = (x - mean).square().mean(dims, /*keepdim=*/true);
  } else {
    mean = saved_mean.to(acc).view(shape);
    var = saved_var.to(acc).view(shape);
  }
  const Tensor invstd = (var + eps).rsqrt();
  const Tensor xhat = (x - mean) * invstd;
  const Tensor w = weight.defined() ? weight.to(acc).view(shape) : at::ones({1}, x.options());
  Tensor dz = dy;
  if (act != Activation::None && activation_needs_z(act, slope)) {
    Tensor z = xhat * w;
    if (bias.defined()) z = z + bias.to(acc).view(shape);
    if (residual.defined()) z = z + residual.to(acc);
    switch (act) {
      case Activation::LeakyReLU:
        dz = at::where(z > 0, dy, dy * slope);
        break;
      case Activation::HardSwish:
        dz = at::where(z < -3, at::zeros_like(dy), at::where(z <= 3, dy * (z / 3 + 0.5), dy));
        break;
      case Activation::GELU:
        dz = dy * (0.5 * (1 + at::erf(z * kInvSqrt2)) + z * at::exp(-0.5 * z * z) * kInvSqrt2Pi);
        break;
      case Activation::GELUTanh: {
        const Tensor t = at::tanh(kSqrt2OverPi * (z + kGeluCubic * z * z * z));
        dz = dy * (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * kSqrt2OverPi * (1 + 3 * kGeluCubic * z * z));
        break;
      }
      case Activation::ReLU6:
        dz = at::where(at::logical_and(z > 0, z < 6), dy, at::zeros_like(dy));
        break;
      case Activation::ELU:
        dz = at::where(z <= 0, dy * at::exp(z), dy);
        break;
      default: {  // SiLU
        const Tensor s = at::sigmoid(z);
        dz = dy * s * (1 + z * (1 - s));
      }
    }
  } else if (act == Activation::ReLU) {
    dz = at::where(output <= 0, at::zeros_like(dy), dy);
  } else if (act != Activation::None) {
    dz = at::where(output > 0, dy, dy * slope);
  }
  Tensor gx;
  if (training) {
    gx = w * invstd * (dz - dz.mean(dims, true) - xhat * (dz * xhat).mean(dims, true));
  } else {
    gx = dz * w * invstd;
  }
  const Tensor gw = (dz * xhat).sum(dims);
  const Tensor gb = dz.sum(dims);
  return {gx.to(input.scalar_type()), weight.defined() ? gw.to(weight.scalar_type()) : Tensor(),
          bias.defined() ? gb.to(bias.scalar_type()) : Tensor(), has_residual ? dz.to(input.scalar_type()) : Tensor()};
}

// Saves what the backward needs; returns the tensors to hand to save_for_backward.
// Layout of the saved list: input, weight, bias, residual, output, mean, var.
struct Saved {
  static variable_list pack(const Tensor& input, const Tensor& weight, const Tensor& bias, const Tensor& residual,
                            const Tensor& output, const Tensor& mean, const Tensor& var, Activation act, double slope) {
    const bool needs_z = activation_needs_z(act, slope);
    // The activation's derivative comes from the output (relu, leaky relu with slope >= 0)
    // or the recomputed pre-activation, which needs the residual (silu): never both.
    const Tensor res = (act != Activation::None && needs_z) ? residual : Tensor();
    const Tensor out = (act != Activation::None && !needs_z) ? output : Tensor();
    return {input, weight, bias, res, out, mean, var};
  }
};

// needs_input_grad counts only the tensors actually passed (an absent optional takes no
// slot): records the slot of each tensor argument, in order, -1 when absent.
void store_edges(AutogradContext* ctx, std::initializer_list<std::pair<const char*, bool>> args) {
  int64_t edge = 0;
  for (const auto& [name, present] : args) {
    ctx->saved_data[name] = present ? edge++ : int64_t(-1);
  }
}

bool wants_grad(AutogradContext* ctx, const char* name) {
  const int64_t edge = ctx->saved_data[name].toInt();
  return edge >= 0 && ctx->needs_input_grad(edge);
}

void store_epilogue(AutogradContext* ctx, double eps, int64_t act, double slope, bool has_residual) {
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["act"] = act;
  ctx->saved_data["slope"] = slope;
  ctx->saved_data["has_residual"] = has_residual;
}

// Gradients for (input, weight, bias, residual) from the saved tensors.
variable_list backward_from_saved(AutogradContext* ctx, const Tensor& grad_out, bool training) {
  const auto saved = ctx->get_saved_variables();
  const Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &res = saved[3], &out = saved[4];
  const Tensor &mean = saved[5], &var = saved[6];
  const double eps = ctx->saved_data["eps"].toDouble();
  const int64_t act = ctx->saved_data["act"].toInt();
  const double slope = ctx->saved_data["slope"].toDouble();
  const bool has_residual = ctx->saved_data["has_residual"].toBool();
  const bool want_input = wants_grad(ctx, "input");
  const bool want_params = wants_grad(ctx, "weight") || wants_grad(ctx, "bias");
  const bool want_residual = wants_grad(ctx, "residual");
  if (!grad_out.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};

  if (at::GradMode::is_enabled()) {
    // A graph of the backward is being built (double backward).
    return composite_backward(grad_out, input, mean, var, weight, bias, res, out, has_residual, eps, training,
                              static_cast<Activation>(act), slope);
  }

  static const auto backward_op = op<BackwardFn>("fastnorm::batch_norm_backward");
  const bool preact_grad = want_residual && act != 0;
  at::AutoDispatchBelowADInplaceOrView guard;  // straight to the kernel: no autograd fallback per call
  auto [gi, gw, gb, gz] =
      backward_op.call(grad_out, input, mean, var, none_if_undefined(weight), none_if_undefined(bias),
                       none_if_undefined(res), none_if_undefined(out), eps, training, act, slope, want_input,
                       want_params, preact_grad);
  return {want_input ? gi : Tensor(), want_params && weight.defined() ? gw : Tensor(),
          want_params && bias.defined() ? gb : Tensor(),
          want_residual ? (preact_grad ? gz : grad_out) : Tensor()};
}

// Compiled autograd: torch before 2.6 takes a C++ Function's node only when it may be
// traced (its backward's ops go into the graph: they have fake kernels); newer torch calls
// an untraceable node as an opaque op, which keeps the fused backward whole.
#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 6
constexpr bool kTraceableNodes = true;
#else
constexpr bool kTraceableNodes = false;
#endif

class BatchNormTrain : public torch::autograd::Function<BatchNormTrain> {
 public:
  static constexpr bool is_traceable = kTraceableNodes;
  // The batch statistics come back through `stats`, not as outputs: they have no gradient,
  // and an output marked non-differentiable keeps compiled autograd from taking the node.
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& weight,
                               const OptTensor& bias, const OptTensor& residual, const OptTensor& running_mean,
                               const OptTensor& running_var, const OptTensor& num_batches_tracked, double momentum,
                               bool cumulative, double eps, int64_t act, double slope,
                               std::pair<Tensor, Tensor>* stats) {
    static const auto train_op = op<TrainFn>("fastnorm::batch_norm_train");
    Tensor out, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, mean, var) = train_op.call(input, weight, bias, residual, running_mean, running_var,
                                               num_batches_tracked, momentum, cumulative, eps, act, slope);
    }
    // The running statistics were written below autograd: record that they changed.
    for (const auto& t : {running_mean, running_var, num_batches_tracked}) {
      if (given(t)) torch::autograd::impl::bump_version(*t);
    }
    ctx->save_for_backward(Saved::pack(input, undefined_if_none(weight), undefined_if_none(bias),
                                       undefined_if_none(residual), out, mean, var, static_cast<Activation>(act),
                                       slope));
    store_epilogue(ctx, eps, act, slope, given(residual));
    store_edges(ctx, {{"input", true}, {"weight", given(weight)}, {"bias", given(bias)}, {"residual", given(residual)}});
    // An undefined dy (no gradient reached out) is not filled with zeros: backward_from_saved
    // handles it.
    ctx->set_materialize_grads(false);
    *stats = {mean, var};
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = backward_from_saved(ctx, grads[0], /*training=*/true);
    // input, weight, bias, residual, then running_mean ... negative_slope, stats.
    g.resize(13);
    return g;
  }
};

class BatchNormElemt : public torch::autograd::Function<BatchNormElemt> {
 public:
  static constexpr bool is_traceable = kTraceableNodes;
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean, const Tensor& var,
                               const OptTensor& weight, const OptTensor& bias, const OptTensor& residual, double eps,
                               int64_t act, double slope) {
    static const auto elemt_op = op<ElemtFn>("fastnorm::batch_norm_elemt");
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = elemt_op.call(input, mean, var, weight, bias, residual, eps, act, slope);
    }
    ctx->save_for_backward(Saved::pack(input, undefined_if_none(weight), undefined_if_none(bias),
                                       undefined_if_none(residual), out, mean, var, static_cast<Activation>(act),
                                       slope));
    store_epilogue(ctx, eps, act, slope, given(residual));
    store_edges(ctx, {{"input", true}, {"mean", true}, {"var", true}, {"weight", given(weight)}, {"bias", given(bias)},
                      {"residual", given(residual)}});
    ctx->set_materialize_grads(false);  // an undefined dy gives undefined gradients, no zeros
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The statistics are constants here (evaluation): no gradient for mean and var.
    auto g = backward_from_saved(ctx, grads[0], /*training=*/false);
    return {g[0], Tensor(), Tensor(), g[1], g[2], g[3], Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_autograd(const Tensor& input, const OptTensor& weight,
                                                             const OptTensor& bias, const OptTensor& residual,
                                                             const OptTensor& running_mean,
                                                             const OptTensor& running_var,
                                                             const OptTensor& num_batches_tracked, double momentum,
                                                             bool cumulative, double eps, int64_t act, double slope) {
  std::pair<Tensor, Tensor> stats;
  auto r = BatchNormTrain::apply(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                 momentum, cumulative, eps, act, slope, &stats);
  return {r[0], stats.first, stats.second};
}

Tensor batch_norm_elemt_autograd(const Tensor& input, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                                 const OptTensor& bias, const OptTensor& residual, double eps, int64_t act,
                                 double slope) {
  return BatchNormElemt::apply(input, mean, var, weight, bias, residual, eps, act, slope)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnorm, Autograd, m) {
  m.impl("batch_norm_train", &batch_norm_train_autograd);
  m.impl("batch_norm_elemt", &batch_norm_elemt_autograd);
}

}  // namespace fastnorm
