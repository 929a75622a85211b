// Autograd for weight norm in C++: first-order gradients from the fused backward kernel;
// a graph of the backward (double backward) from differentiable ATen ops. weight_norm_norms
// gets its gradient too (grad_v = grad_norm * v / norm), for compositions built on it.
//
// weight_norm's graph node is a plain autograd Node, as torch's generated ones are, rather
// than a custom Function's CppNode (no context object, saved-data map or per-call output
// wrapping): the op is called once per weight per step, often on small weights, where that
// bookkeeping costs as much as the kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

namespace fastnorm {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using WeightNormFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, int64_t, double);
using BackwardFn = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);
using NormsFn = Tensor(const Tensor&, int64_t, double);
using BackwardInPlaceFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t);

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

// A graph edge's pointer: std::shared_ptr<Node> in older torch, c10::intrusive_ptr<Node> in
// newer; each branch compiles only against the torch that has it.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename N>
NodePtr make_node() {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N(), [](N* node) { deleteNode(node); });  // torch's deleter (found by ADL)
  } else {
    return c10::make_intrusive<N>();
  }
}

// Node-creation hooks (torch.autograd.graph): newer torch lets each creation site fire them
// once the node is complete; older torch has no such function. Dependent on P so that the
// call is looked up (by ADL) only where it exists.
template <typename P, typename = void>
struct HasCreationHooks : std::false_type {};
template <typename P>
struct HasCreationHooks<P, std::void_t<decltype(fire_node_creation_hooks(std::declval<const P&>()))>>
    : std::true_type {};

template <typename P>
void fire_creation_hooks(const P& node) {
  if constexpr (HasCreationHooks<P>::value) fire_node_creation_hooks(node);
}

// Whether the incoming gradient can take grad_v in place: a plain dense tensor on memory of
// its own (not a vmap-batched, functional or Python-subclass wrapper), laid out as v, and
// reachable by nothing but the engine's reference (the test AccumulateGrad makes before it
// steals a gradient: a hook or anyone else holding it, or another tensor on its memory,
// counts as a reference; a view counts only its base, when the view alone holds that).
bool reusable(const Tensor& grad_w, const Tensor& v) {
  const c10::TensorImpl* impl = grad_w.unsafeGetTensorImpl();
  if (typeid(*impl) != typeid(c10::TensorImpl) || !impl->has_storage() || grad_w.layout() != at::kStrided ||
      grad_w.key_set().has(c10::DispatchKey::Python) || grad_w.use_count() != 1 ||
      grad_w.scalar_type() != v.scalar_type() || grad_w.strides() != v.strides() ||
      !grad_w.is_non_overlapping_and_dense()) {
    return false;
  }
  const auto storage_refs = grad_w.storage().use_count();
  if (!grad_w.is_view()) return storage_refs == 1;
  const at::TensorBase& base = grad_w._base();
  return storage_refs == 2 && base.use_count() == 1 && !base.is_view();
}

// Compiled autograd (torch._dynamo.compiled_autograd) asks a node for its state through
// compiled_args, const in newer torch and not in older; the base matching this torch's
// signature forwards it to collect_args. (A partial specialization, so that only the one
// chosen is compiled.)
using torch::dynamo::autograd::CompiledNodeArgs;
using torch::dynamo::autograd::SwapSavedVariables;
constexpr bool kConstCompiledArgs =
    std::is_same_v<decltype(&torch::autograd::Node::compiled_args),
                   void (torch::autograd::Node::*)(CompiledNodeArgs&) const>;

template <bool kConst, typename Base = torch::autograd::Node>
struct CompiledArgsNode;
template <typename Base>
struct CompiledArgsNode<true, Base> : Base {
  void compiled_args(CompiledNodeArgs& args) const override { collect_args(args); }
  virtual void collect_args(CompiledNodeArgs& args) const = 0;
};
template <typename Base>
struct CompiledArgsNode<false, Base> : Base {
  void compiled_args(CompiledNodeArgs& args) override { collect_args(args); }
  virtual void collect_args(CompiledNodeArgs& args) const = 0;
};

// A saved variable into the node's state: newer torch says whether it is the node's
// output, torch 2.4 takes the variable alone.
template <typename Args, typename = void>
struct CollectTakesOutputFlag : std::false_type {};
template <typename Args>
struct CollectTakesOutputFlag<Args, std::void_t<decltype(std::declval<Args&>().collect(
                                        std::declval<const torch::autograd::SavedVariable&>(), false))>>
    : std::true_type {};

template <typename Args>
void collect_input(Args& args, const torch::autograd::SavedVariable& v) {
  if constexpr (CollectTakesOutputFlag<Args>::value) {
    args.collect(v, /*is_output=*/false);
  } else {
    args.collect(v);
  }
}

// The gradient of w = g * v / norm with respect to v and g.
struct WeightNormBackward : public CompiledArgsNode<kConstCompiledArgs> {
  torch::autograd::SavedVariable v, g, norm;
  int64_t dim = 0;
  double eps = 0;

  std::string name() const override { return "fastnorm::WeightNormBackward"; }

  // Compiled autograd: the node's state, and apply() with the saved tensors swapped for the
  // tracer's (the ops apply() calls go into the compiled graph; their fake kernels are in
  // fastnorm/_ops.py).
  void collect_args(CompiledNodeArgs& args) const override {
    collect_input(args, v);
    collect_input(args, g);
    collect_input(args, norm);
    args.collect(dim);
    args.collect(eps);
  }
  variable_list apply_with_saved(const variable_list& grads, SwapSavedVariables& saved) override {
    saved.before(v);
    saved.before(g);
    saved.before(norm);
    variable_list out = apply(variable_list(grads));
    saved.after(v);
    saved.after(g);
    saved.after(norm);
    return out;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    v.reset_data();
    g.reset_data();
    norm.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list out(2);
    const Tensor& grad_w = grads[0];
    const bool need_v = should_compute_output(0), need_g = should_compute_output(1);
    if (!grad_w.defined() || !(need_v || need_g)) return out;
    const Tensor v_ = v.unpack(), g_ = g.unpack();
    if (at::GradMode::is_enabled()) {  // a graph of the backward: double backward
      auto grads_vg = composite_backward(grad_w, v_, g_, dim, eps);
      out[0] = std::move(grads_vg[0]);
      out[1] = std::move(grads_vg[1]);
    } else {
      static const auto bwd = op<BackwardFn>("fastnorm::weight_norm_backward");
      static const auto bwd_in_place = op<BackwardInPlaceFn>("fastnorm::weight_norm_backward_");
      at::AutoDispatchBelowADInplaceOrView guard;  // straight to the kernel
      if (reusable(grad_w, v_)) {  // grad_v over grad_w, while both are in cache
        out[1] = bwd_in_place.call(grad_w, v_, g_, norm.unpack(), dim);
        out[0] = grad_w;
      } else {
        std::tie(out[0], out[1]) = bwd.call(grad_w, v_, g_, norm.unpack(), dim);
      }
    }
    if (!need_v) out[0] = Tensor();
    if (!need_g) out[1] = Tensor();
    return out;
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

// The Autograd kernel of weight_norm: the kernels below autograd, then (when v or g needs
// a gradient) w's history. norm is returned without one: it is not differentiable.
std::tuple<Tensor, Tensor> weight_norm_autograd(const Tensor& v, const Tensor& g, int64_t dim, double eps) {
  TORCH_CHECK(!v._fw_grad(/*level=*/0).defined() && !g._fw_grad(/*level=*/0).defined(),
              "fastnorm.weight_norm: forward-mode automatic differentiation is not supported");
  static const auto fwd = op<WeightNormFn>("fastnorm::weight_norm");
  Tensor w, norm;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(w, norm) = fwd.call(v, g, dim, eps);
  }
  if (torch::autograd::compute_requires_grad(v, g)) {
    NodePtr node = make_node<WeightNormBackward>();
    auto& backward = static_cast<WeightNormBackward&>(*node);
    backward.set_next_edges(torch::autograd::collect_next_edges(v, g));
    backward.v = torch::autograd::SavedVariable(v, /*is_output=*/false);
    backward.g = torch::autograd::SavedVariable(g, /*is_output=*/false);
    backward.norm = torch::autograd::SavedVariable(norm, /*is_output=*/false);
    backward.dim = dim;
    backward.eps = eps;
    torch::autograd::set_history(w, node);
    fire_creation_hooks(node);
  }
  return {w, norm};
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
