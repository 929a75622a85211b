// The batch-norm ops' front: the one place that validates arguments, brings tensors into
// the layout the kernels expect and allocates outputs, then calls the CPU or CUDA kernels.
// Nothing is written before every check has passed, so a failed call leaves the running
// statistics as they were.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "batch_norm.h"
#include "common/checks.h"

namespace fastnorm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Tensor value_or_undefined(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

// Runs the CPU or the CUDA kernel `fn` on `args`, by the input's device.
#ifdef FASTNORM_WITH_CUDA
#define FASTNORM_RUN_KERNEL(on_cuda, fn, ...) ((on_cuda) ? cuda::fn(__VA_ARGS__) : cpu::fn(__VA_ARGS__))
#else
#define FASTNORM_RUN_KERNEL(on_cuda, fn, ...) cpu::fn(__VA_ARGS__)
#endif

// The accumulation dtype: float64 for float64 input, float32 for everything else.
at::ScalarType acc_dtype(const Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

bool channels_innermost(const Tensor& t) {
  if (t.dim() < 3) {
    return t.is_contiguous();
  }
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < t.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  return t.permute(perm).is_contiguous();
}

// A dense copy of t with the channels innermost: (N, spatial..., C) in memory.
Tensor channels_innermost_copy(const Tensor& t) {
  std::vector<int64_t> to{0}, back{0, t.dim() - 1};
  for (int64_t d = 2; d < t.dim(); ++d) to.push_back(d);
  to.push_back(1);
  for (int64_t d = 1; d < t.dim() - 1; ++d) back.push_back(d);
  return t.permute(to).contiguous().permute(back);
}

// Makes `input` dense in a layout the kernels handle. Contiguous and channels-innermost
// tensors (channels_last, channels_last_3d, transposed (N, L, C) views) stay as they are;
// anything else is copied, channels innermost when its channel stride is the smallest.
// (fastnorm/_ops.py mirrors this for the fake tensors of torch.compile.)
Tensor dense_input(const Tensor& input, Layout& layout) {
  layout.N = input.size(0);
  layout.C = input.size(1);
  layout.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) layout.S *= input.size(d);
  Tensor x = input;
  if (!x.is_contiguous() && !channels_innermost(x)) {
    bool channel_stride_smallest = true;
    for (int64_t d = 0; d < x.dim(); ++d) {
      if (d != 1 && x.size(d) > 1 && x.stride(d) <= x.stride(1)) channel_stride_smallest = false;
    }
    x = channel_stride_smallest ? channels_innermost_copy(x) : x.contiguous();
  }
  // (N, C) and other S == 1 tensors are rows of C values: the channels-innermost kernels
  // vectorize them across channels.
  layout.channels_last = !x.is_contiguous() || layout.S == 1;
  return x;
}

// `t` (same sizes as x) in x's layout: as it is when it already is, else a copy.
Tensor conform(const Tensor& t, const Tensor& x) {
  if (!t.defined()) return t;
  const bool same = x.is_contiguous() ? t.is_contiguous() : channels_innermost(t);
  if (same) return t;
  Tensor r = at::empty_like(x);
  r.copy_(t);
  return r;
}

// A per-channel tensor as a contiguous tensor of the accumulation dtype (a no-op for the
// usual float32 parameters).
Tensor to_acc(const Tensor& t, at::ScalarType acc) {
  return t.defined() ? t.to(acc).contiguous() : t;
}

void check_input(const char* op, const Tensor& input) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected input of shape (N, C, ...) with at least 2 dimensions, got input of ",
              describe(input));
  TORCH_CHECK(is_normalizable_dtype(input.scalar_type()), op,
              ": expected a floating-point input (float64, float32, float16 or bfloat16), got input of ", describe(input));
}

// Per-channel tensors: 1-D of size C on the input's device; parameters share one dtype,
// the input's or float32 for float16/bfloat16 input.
void check_channel_tensors(const char* op, const Tensor& input, std::initializer_list<std::pair<const char*, OptTensor>> ts) {
  const int64_t C = input.size(1);
  std::optional<at::ScalarType> param_dtype;
  const char* first = nullptr;
  for (const auto& [name, t] : ts) {
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": expected ", name, " of shape [", C,
                "] (the input's channel count, input.size(1)), got ", name, " of ", describe(*t), "; input is ",
                describe(input));
    TORCH_CHECK(t->device() == input.device(), op, ": expected ", name, " on the input's device ", input.device(),
                ", got ", name, " of ", describe(*t));
    const auto dt = t->scalar_type();
    TORCH_CHECK(dt == input.scalar_type() || (dt == at::kFloat && is_reduced_float(input.scalar_type())), op,
                ": expected ", name, " of dtype ", dtype_name(input.scalar_type()),
                is_reduced_float(input.scalar_type()) ? " or torch.float32" : "", " to match the input, got ", name,
                " of ", describe(*t));
    if (!param_dtype) {
      param_dtype = dt;
      first = name;
    }
    TORCH_CHECK(dt == *param_dtype, op, ": ", first, " and ", name, " must share one dtype, got ",
                dtype_name(*param_dtype), " and ", dtype_name(dt));
  }
}

void check_same_as_input(const char* op, const char* name, const Tensor& input, const OptTensor& t) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->sizes() == input.sizes() && t->scalar_type() == input.scalar_type() && t->device() == input.device(),
              op, ": expected ", name, " with the input's shape, dtype and device (", describe(input), "), got ", name,
              " of ", describe(*t));
}

void check_epilogue(const char* op, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation < kActivations, op, ": unknown activation code ", activation,
              " (0 none, 1 relu, 2 leaky_relu, 3 silu, 4 relu6, 5 hardswish, 6 gelu, 7 gelu_tanh, 8 elu)");
}

// Fills the NormArgs common to every op.
void fill_norm_args(NormArgs& a, const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                    const OptTensor& residual, double eps, int64_t activation, double slope) {
  const auto acc = acc_dtype(input);
  a.input = dense_input(input, a.layout);
  a.weight = to_acc(value_or_undefined(weight), acc);
  a.bias = to_acc(value_or_undefined(bias), acc);
  a.residual = conform(value_or_undefined(residual), a.input);
  a.eps = eps;
  a.act = static_cast<Activation>(activation);
  a.slope = slope;
}

// Copies a per-channel result computed in the accumulation dtype back into `dst` when the
// kernel could not write `dst` directly.
void write_back(const Tensor& dst, const Tensor& computed) {
  if (dst.defined() && !computed.is_same(dst)) dst.copy_(computed);
}

// ---------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  const char* op = "fastnorm.batch_norm_stats";
  check_input(op, input);
  c10::DeviceGuard guard(input.device());
  NormArgs a;
  fill_norm_args(a, input, {}, {}, {}, 0.0, 0, 0.0);
  const auto opts = input.options().dtype(acc_dtype(input));
  a.mean = at::empty({a.layout.C}, opts);
  a.var = at::empty({a.layout.C}, opts);
  if (a.layout.numel() == 0) {
    a.mean.fill_(NAN);
    a.var.fill_(NAN);
  } else {
    FASTNORM_RUN_KERNEL(input.is_cuda(), batch_norm_stats, a);
  }
  return {a.mean, a.var};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const OptTensor& weight, const OptTensor& bias,
                                                    const OptTensor& residual, const OptTensor& running_mean,
                                                    const OptTensor& running_var, const OptTensor& num_batches_tracked,
                                                    double momentum, bool cumulative, double eps, int64_t activation,
                                                    double slope) {
  const char* op = "fastnorm.batch_norm (training)";
  check_input(op, input);
  check_channel_tensors(op, input, {{"weight", weight}, {"bias", bias}, {"running_mean", running_mean},
                                    {"running_var", running_var}});
  check_same_as_input(op, "residual", input, residual);
  check_epilogue(op, activation);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  if (num_batches_tracked.has_value()) {
    const auto& t = *num_batches_tracked;
    TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kLong && t.device() == input.device() && t.is_contiguous(),
                op, ": expected num_batches_tracked to be one int64 value on the input's device, got ", describe(t));
  }
  TORCH_CHECK(!cumulative || num_batches_tracked.has_value() || !running_mean.has_value(), op,
              ": momentum=None (cumulative average) needs num_batches_tracked");
  const int64_t count = input.numel() / std::max<int64_t>(1, input.size(1));
  TORCH_CHECK_VALUE(count != 1, "Expected more than 1 value per channel when training, got input size ",
                    input.sizes());
  c10::DeviceGuard guard(input.device());

  TrainArgs a;
  fill_norm_args(a, input, weight, bias, residual, eps, activation, slope);
  const auto acc = acc_dtype(input);
  a.output = at::empty_like(a.input);
  a.mean = at::empty({a.layout.C}, input.options().dtype(acc));
  a.var = at::empty({a.layout.C}, input.options().dtype(acc));
  if (a.layout.numel() == 0) {
    // As torch: empty output, running statistics untouched (the batch still counts).
    a.mean.fill_(NAN);
    a.var.fill_(NAN);
    if (num_batches_tracked.has_value()) num_batches_tracked->add_(1);
    return {a.output, a.mean, a.var};
  }
  a.running_mean = to_acc(value_or_undefined(running_mean), acc);
  a.running_var = to_acc(value_or_undefined(running_var), acc);
  a.num_batches_tracked = value_or_undefined(num_batches_tracked);
  a.momentum = momentum;
  a.cumulative = cumulative;
  FASTNORM_RUN_KERNEL(input.is_cuda(), batch_norm_train, a);
  write_back(value_or_undefined(running_mean), a.running_mean);
  write_back(value_or_undefined(running_var), a.running_var);
  return {a.output, a.mean, a.var};
}

Tensor batch_norm_elemt(const Tensor& input, const Tensor& mean, const Tensor& var, const OptTensor& weight,
                        const OptTensor& bias, const OptTensor& residual, double eps, int64_t activation, double slope) {
  const char* op = "fastnorm.batch_norm (evaluation)";
  check_input(op, input);
  check_channel_tensors(op, input, {{"weight", weight}, {"bias", bias}});
  check_channel_tensors(op, input, {{"mean", mean}, {"var", var}});
  check_same_as_input(op, "residual", input, residual);
  check_epilogue(op, activation);
  c10::DeviceGuard guard(input.device());
  NormArgs a;
  fill_norm_args(a, input, weight, bias, residual, eps, activation, slope);
  a.mean = to_acc(mean, acc_dtype(input));
  a.var = to_acc(var, acc_dtype(input));
  Tensor out = at::empty_like(a.input);
  if (a.layout.numel() == 0) return out;
  FASTNORM_RUN_KERNEL(input.is_cuda(), batch_norm_elemt, a, out);
  return out;
}

// Shared by the three backward ops: checks and the common BackwardArgs.
BackwardArgs backward_args(const char* op, const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                           const Tensor& var, const OptTensor& weight, const OptTensor& bias, const OptTensor& residual,
                           const OptTensor& output, double eps, int64_t activation, double slope) {
  check_input(op, input);
  check_same_as_input(op, "grad_output", input, grad_out);
  check_same_as_input(op, "residual", input, residual);
  check_same_as_input(op, "output", input, output);
  check_channel_tensors(op, input, {{"weight", weight}, {"bias", bias}});
  check_channel_tensors(op, input, {{"mean", mean}, {"var", var}});
  check_epilogue(op, activation);
  const auto act = static_cast<Activation>(activation);
  TORCH_CHECK(act == Activation::None || activation_needs_z(act, slope) || (output.has_value() && output->defined()),
              op, ": the activation's gradient needs the forward output");
  BackwardArgs a;
  fill_norm_args(a, input, weight, bias, residual, eps, activation, slope);
  a.grad_out = conform(grad_out, a.input);
  a.output = conform(value_or_undefined(output), a.input);
  a.mean = to_acc(mean, acc_dtype(input));
  a.var = to_acc(var, acc_dtype(input));
  return a;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> batch_norm_backward(
    const Tensor& grad_out, const Tensor& input, const Tensor& mean, const Tensor& var, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& residual, const OptTensor& output, double eps, bool training,
    int64_t activation, double slope, bool input_grad, bool param_grad, bool preact_grad) {
  BackwardArgs a = backward_args("fastnorm.batch_norm_backward", grad_out, input, mean, var, weight, bias, residual,
                                 output, eps, activation, slope);
  c10::DeviceGuard guard(input.device());
  a.training = training;
  const auto acc_opts = input.options().dtype(acc_dtype(input));
  a.grad_input = input_grad ? at::empty_like(a.input) : Tensor();
  a.grad_preact = preact_grad ? at::empty_like(a.input) : Tensor();
  a.grad_weight = param_grad ? at::empty({a.layout.C}, acc_opts) : Tensor();
  a.grad_bias = param_grad ? at::empty({a.layout.C}, acc_opts) : Tensor();
  if (a.layout.numel() == 0) {
    if (param_grad) {
      a.grad_weight.zero_();
      a.grad_bias.zero_();
    }
  } else if (input_grad || param_grad || preact_grad) {
    FASTNORM_RUN_KERNEL(input.is_cuda(), batch_norm_backward, a);
  }
  auto empty = [&]() { return at::empty({0}, input.options()); };
  // Parameter gradients in the parameters' dtype.
  const auto param_dtype = weight.has_value() ? weight->scalar_type()
                           : bias.has_value() ? bias->scalar_type()
                                              : acc_dtype(input);
  return {input_grad ? a.grad_input : empty(), param_grad ? a.grad_weight.to(param_dtype) : empty(),
          param_grad ? a.grad_bias.to(param_dtype) : empty(), preact_grad ? a.grad_preact : empty()};
}

std::tuple<Tensor, Tensor> batch_norm_backward_reduce(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                                      const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                                                      const OptTensor& residual, const OptTensor& output, double eps,
                                                      int64_t activation, double slope) {
  BackwardArgs a = backward_args("fastnorm.batch_norm_backward_reduce", grad_out, input, mean, var, weight, bias,
                                 residual, output, eps, activation, slope);
  c10::DeviceGuard guard(input.device());
  const auto acc_opts = input.options().dtype(acc_dtype(input));
  a.sum_dz = at::zeros({a.layout.C}, acc_opts);
  a.sum_dz_xmu = at::zeros({a.layout.C}, acc_opts);
  if (a.layout.numel() > 0) {
    FASTNORM_RUN_KERNEL(input.is_cuda(), batch_norm_backward_reduce, a);
  }
  return {a.sum_dz, a.sum_dz_xmu};
}

std::tuple<Tensor, Tensor> batch_norm_backward_elemt(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                                     const Tensor& var, const OptTensor& weight, const OptTensor& bias,
                                                     const OptTensor& residual, const OptTensor& output,
                                                     const Tensor& mean_dz, const Tensor& mean_dz_xmu, double eps,
                                                     int64_t activation, double slope, bool preact_grad) {
  const char* op = "fastnorm.batch_norm_backward_elemt";
  BackwardArgs a = backward_args(op, grad_out, input, mean, var, weight, bias, residual, output, eps, activation, slope);
  check_channel_tensors(op, input, {{"mean_dz", mean_dz}, {"mean_dz_xmu", mean_dz_xmu}});
  c10::DeviceGuard guard(input.device());
  a.training = true;
  a.mean_dz = to_acc(mean_dz, acc_dtype(input));
  a.mean_dz_xmu = to_acc(mean_dz_xmu, acc_dtype(input));
  a.grad_input = at::empty_like(a.input);
  a.grad_preact = preact_grad ? at::empty_like(a.input) : Tensor();
  if (a.layout.numel() > 0) {
    FASTNORM_RUN_KERNEL(input.is_cuda(), batch_norm_backward_elemt, a);
  }
  return {a.grad_input, preact_grad ? a.grad_preact : at::empty({0}, input.options())};
}

}  // namespace

#define FASTNORM_REGISTER_BATCH_NORM(m)                                \
  m.impl("batch_norm_stats", &batch_norm_stats);                       \
  m.impl("batch_norm_train", &batch_norm_train);                       \
  m.impl("batch_norm_elemt", &batch_norm_elemt);                       \
  m.impl("batch_norm_backward", &batch_norm_backward);                 \
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce);   \
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) { FASTNORM_REGISTER_BATCH_NORM(m) }

#ifdef FASTNORM_WITH_CUDA
TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) { FASTNORM_REGISTER_BATCH_NORM(m) }
#endif

}  // namespace fastnorm
