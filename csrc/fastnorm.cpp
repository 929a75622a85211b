// Op schemas of the fastnorm library and the Python module with the build's description.
// Kernels are registered per device in batch_norm.cpp, autograd in autograd/.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef FASTNORM_CPU_CAPABILITY
#define FASTNORM_CPU_CAPABILITY "DEFAULT"
#endif
#ifndef FASTNORM_VERSION
#define FASTNORM_VERSION "unknown"
#endif
#ifndef FASTNORM_TORCH_VERSION
#define FASTNORM_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fastnorm, m) {
  // Per-channel mean and biased variance (accumulation dtype: float64 for float64 input,
  // float32 otherwise).
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // Training forward: batch statistics, running-statistics update (momentum, or the
  // cumulative average 1/num_batches_tracked), out = act(norm(input) + residual).
  // activation: 0 none, 1 relu, 2 leaky_relu (negative_slope), 3 silu, 4 relu6, 5 hardswish,
  // 6 gelu, 7 gelu_tanh, 8 elu (alpha 1).
  m.def(
      "batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, Tensor? residual, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float momentum, bool cumulative, float eps, "
      "int activation, float negative_slope) -> (Tensor out, Tensor save_mean, Tensor save_var)");
  // Normalization with given statistics (evaluation, synchronized batch norm).
  m.def(
      "batch_norm_elemt(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, Tensor? residual, "
      "float eps, int activation, float negative_slope) -> Tensor");
  // Backward of either forward; grad_preact is the gradient before the activation (the
  // residual's). Tensors not asked for come back empty.
  m.def(
      "batch_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, "
      "Tensor? residual, Tensor? output, float eps, bool training, int activation, float negative_slope, "
      "bool input_grad, bool param_grad, bool preact_grad) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_preact)");
  // The backward in two halves, for statistics reduced across processes in between.
  m.def(
      "batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, Tensor? residual, Tensor? output, float eps, int activation, float negative_slope) -> "
      "(Tensor sum_dz, Tensor sum_dz_xmu)");
  m.def(
      "batch_norm_backward_elemt(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, Tensor? residual, Tensor? output, Tensor mean_dz, Tensor mean_dz_xmu, float eps, "
      "int activation, float negative_slope, bool preact_grad) -> (Tensor grad_input, Tensor grad_preact)");

  // Weight norm: w = g * v / sqrt(sum(v^2) + eps), the sum over every dimension but dim
  // (dim -1: the whole tensor). norm is sqrt(sum(v^2) + eps) per slice, float32 (float64
  // for float64 v).
  m.def("weight_norm(Tensor v, Tensor g, int dim, float eps) -> (Tensor w, Tensor norm)");
  m.def(
      "weight_norm_backward(Tensor grad_w, Tensor v, Tensor g, Tensor norm, int dim) -> "
      "(Tensor grad_v, Tensor grad_g)");
  m.def("weight_norm_norms(Tensor v, int dim, float eps) -> Tensor norm");
  // The backward writing grad_v over grad_w (a temporary the caller owns): no second
  // weight-sized buffer.
  m.def("weight_norm_backward_(Tensor(a!) grad_w, Tensor v, Tensor g, Tensor norm, int dim) -> Tensor grad_g");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = FASTNORM_VERSION;
  d["cpu"] = true;
  d["cpu_capability"] = FASTNORM_CPU_CAPABILITY;
#ifdef FASTNORM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = FASTNORM_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
  d["torch"] = FASTNORM_TORCH_VERSION;  // the torch it was compiled against
  return d;
}

}  // namespace

namespace fastnorm {
void bind_direct_calls(pybind11::module& m);  // direct_calls.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnorm kernels (ops live under torch.ops.fastnorm)";
  m.def("build_info", &build_info, "How this extension was built");
  fastnorm::bind_direct_calls(m);
}
