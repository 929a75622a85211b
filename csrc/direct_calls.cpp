// Direct Python entry points to the ops the layers call on every step: the same
// torch.ops.fastnorm ops, called through the dispatcher unboxed. A call through
// torch.ops converts every argument to an IValue, matches the schema and unboxes again
// for the kernel, which made a small weight-normed Linear's forward op 1.6x torch's
// (a 128x128 weight: 14.7 us against 9.1 us between the layer's other ops, most of it
// the cost of that longer path's cold code and data; through here 10.0 us).
//
// Everything below Python still happens: autograd, the tracer, dispatch modes (fake and
// meta tensors), functorch transforms. What is skipped is Python-level: fastnorm/_ops.py
// takes the torch.ops path under torch.compile and for __torch_function__ overrides.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace fastnorm {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Binds `py_name` to the op `op_name` of signature Sig as torch binds its own functions:
// errors become the Python exception torch raises for them (message without the C++
// backtrace), warnings Python warnings, and the GIL is released during the call (a kernel
// that needs Python, a dispatch mode's, takes it back).
template <class Sig>
struct Direct;

template <class R, class... Args>
struct Direct<R(Args...)> {
  static void bind(pybind11::module& m, const char* py_name, const char* op_name) {
    const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(op_name, "").typed<R(Args...)>();
    m.def(py_name, [op](Args... args) -> R {
      HANDLE_TH_ERRORS
      pybind11::gil_scoped_release no_gil;
      return op.call(args...);
      END_HANDLE_TH_ERRORS_PYBIND
    });
  }
};

// w alone, dim as torch's weight norm takes it (None or -1: the whole tensor; negative: from
// the end), for fastnorm.functional.weight_norm and the parametrization: the Python side
// is then one call, and the norms never become a Python object. The dim handling mirrors
// wn_dim in fastnorm/_ops.py (the torch.ops path), error included.
void bind_weight_norm_w(pybind11::module& m) {
  using Fn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double);
  const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastnorm::weight_norm", "").typed<Fn>();
  m.def("weight_norm_w", [op](const Tensor& v, const Tensor& g, std::optional<int64_t> dim, double eps) -> Tensor {
    HANDLE_TH_ERRORS
    int64_t d = dim.value_or(-1);
    if (d != -1) {
      TORCH_CHECK_INDEX(d >= -v.dim() && d < v.dim(), "weight_norm: dim ", d, " is out of range for a weight of ",
                        v.dim(), " dimensions");
      d = d < 0 ? d + v.dim() : d;
    }
    pybind11::gil_scoped_release no_gil;
    return std::get<0>(op.call(v, g, d, eps));
    END_HANDLE_TH_ERRORS_PYBIND
  });
}

}  // namespace

void bind_direct_calls(pybind11::module& m) {
  using WeightNormFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double);
  using NormsFn = Tensor(const Tensor&, int64_t, double);
  using TrainFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&,
                                                     const OptTensor&, const OptTensor&, const OptTensor&,
                                                     const OptTensor&, double, bool, double, int64_t, double);
  using ElemtFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, double, int64_t, double);
  Direct<WeightNormFn>::bind(m, "weight_norm", "fastnorm::weight_norm");
  Direct<NormsFn>::bind(m, "weight_norm_norms", "fastnorm::weight_norm_norms");
  Direct<TrainFn>::bind(m, "batch_norm_train", "fastnorm::batch_norm_train");
  Direct<ElemtFn>::bind(m, "batch_norm_elemt", "fastnorm::batch_norm_elemt");
  bind_weight_norm_w(m);
}

}  // namespace fastnorm
