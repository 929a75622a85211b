"""The compiled ops (torch.ops.fastnorm.*) and their fake implementations for torch.compile.

Kernels and autograd are registered by the C++ extension; this module loads it and tells
torch the shapes, dtypes and strides of every op's outputs.
"""
import operator

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _C  # noqa: F401  (loading the extension registers torch.ops.fastnorm)

ops = torch.ops.fastnorm

# Whether dynamo is tracing (it must see torch.ops calls). Other tracers (make_fx, non-strict
# export, FakeTensorMode) work below Python, through the dispatcher, on either path.
_is_compiling = (getattr(torch.compiler, "is_dynamo_compiling", None) or getattr(torch.compiler, "is_compiling", None)
                 or torch._dynamo.is_compiling)


_functorch_active = torch._C._are_functorch_transforms_active


@torch.compiler.assume_constant_result  # (dynamo before 2.5 cannot trace the functorch query)
def transforms_active():
    """Whether a torch.func transform or a forward-mode AD level is active: then the ops go
    through fastnorm/_transforms.py's Python autograd (C++ autograd cannot run there)."""
    return _functorch_active() or _forward_ad._current_level >= 0


def _fast_call(name):
    """The op ``name`` called through ``_C``'s direct entry point (csrc/direct_calls.cpp: the
    dispatcher unboxed, several microseconds less per call than torch.ops), or through
    torch.ops where Python must see the call: while dynamo traces (torch.compile, export)
    and for arguments or modes with ``__torch_function__``; under torch.func transforms and
    forward-mode AD, through the op's autograd in fastnorm/_transforms.py."""
    direct = getattr(_C, name)
    overload = getattr(ops, name).default
    has_torch_function = torch._C._has_torch_function

    def call(*args):
        if _is_compiling() or has_torch_function(args):
            return overload(*args)
        if transforms_active():
            return getattr(_transforms, name)(*args)
        return direct(*args)

    call.__name__ = call.__qualname__ = name
    return call


class calls:
    """The ops the layers call on every step, by their fastest safe path (``_fast_call``)."""
    weight_norm = staticmethod(_fast_call("weight_norm"))
    weight_norm_norms = staticmethod(_fast_call("weight_norm_norms"))
    batch_norm_train = staticmethod(_fast_call("batch_norm_train"))
    batch_norm_elemt = staticmethod(_fast_call("batch_norm_elemt"))


def weight_norm_w(v, g, dim, eps):
    """w of the weight norm alone (``calls.weight_norm(...)[0]``), dim as the public API takes
    it (None, negative), by the direct path where ``_fast_call`` would take it: one Python
    call, no Python object made for the norms, and argument types checked by the binding
    (here only when it refuses them, to say which)."""
    if _is_compiling() or _has_torch_function_variadic(v, g):
        _check_weight_norm_types(v, g, dim, eps)
        return ops.weight_norm.default(v, g, wn_dim(v, dim), float(eps))[0]
    if transforms_active():
        _check_weight_norm_types(v, g, dim, eps)
        return _transforms.weight_norm(v, g, wn_dim(v, dim), float(eps))[0]
    try:
        return _weight_norm_w(v, g, dim, eps)
    except TypeError:  # pybind's message for an argument of the wrong type lists overloads
        _check_weight_norm_types(v, g, dim, eps)
        raise


def _check_weight_norm_types(v, g, dim, eps):
    if not isinstance(v, torch.Tensor) or not isinstance(g, torch.Tensor):
        raise TypeError(f"weight_norm: v and g must be Tensors, got {type(v).__name__} and {type(g).__name__}")
    try:
        dim is None or operator.index(dim)
    except TypeError:
        raise TypeError(f"weight_norm: dim must be an int or None, got {dim!r}") from None
    try:
        float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"weight_norm: eps must be a float, got {eps!r}") from None


_has_torch_function_variadic = torch._C._has_torch_function_variadic
_weight_norm_w = _C.weight_norm_w

ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "relu6": 4, "hardswish": 5, "gelu": 6,
               "gelu_tanh": 7, "elu": 8}


def activation_needs_z(act, slope):
    """Whether the activation's derivative needs its input z (else the output's sign does),
    as activation_needs_z in csrc/common/batch_norm_math.h."""
    return act not in (0, 1) and not (act == 2 and slope >= 0)


def activation_code(activation):
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation must be one of {', '.join(repr(a) for a in ACTIVATIONS)}; got {activation!r}"
        ) from None


def acc_dtype(dtype):
    """Statistics' dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels_innermost(x):
    if x.dim() < 3:
        return x.is_contiguous()
    return x.permute(0, *range(2, x.dim()), 1).is_contiguous()


def dense_like(x):
    """An empty tensor in the layout the kernels give their full-size outputs (mirrors
    dense_input in csrc/batch_norm.cpp)."""
    if x.is_contiguous() or _channels_innermost(x):
        return torch.empty_like(x)
    channel_stride_smallest = all(
        x.stride(d) > x.stride(1) for d in range(x.dim()) if d != 1 and x.size(d) > 1
    )
    if channel_stride_smallest:
        perm = (0, *range(2, x.dim()), 1)
        back = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return x.new_empty([x.size(p) for p in perm]).permute(back)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_devices(op, input, **tensors):
    """The fake kernels run where no real kernel does (meta tensors, tracing): they check
    devices as the real ones do."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"fastnorm.{op}: expected {name} on the input's device {input.device}, got {name} "
                f"of shape {list(t.shape)}, dtype {t.dtype}, device {t.device}")


def _channel_vector(x):
    return x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))


def _empty(x):
    return x.new_empty(0)


@torch.library.register_fake("fastnorm::batch_norm_stats")
def _stats_fake(input):
    return _channel_vector(input), _channel_vector(input)


@torch.library.register_fake("fastnorm::batch_norm_train")
def _train_fake(input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                momentum, cumulative, eps, activation, negative_slope):
    _check_devices("batch_norm", input, weight=weight, bias=bias, residual=residual,
                   running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked)
    return dense_like(input), _channel_vector(input), _channel_vector(input)


@torch.library.register_fake("fastnorm::batch_norm_elemt")
def _elemt_fake(input, mean, var, weight, bias, residual, eps, activation, negative_slope):
    _check_devices("batch_norm", input, mean=mean, var=var, weight=weight, bias=bias, residual=residual)
    return dense_like(input)


@torch.library.register_fake("fastnorm::batch_norm_backward")
def _backward_fake(grad_out, input, mean, var, weight, bias, residual, output, eps, training,
                   activation, negative_slope, input_grad, param_grad, preact_grad):
    _check_devices("batch_norm_backward", input, grad_out=grad_out, mean=mean, var=var,
                   weight=weight, bias=bias, residual=residual, output=output)
    param = weight if weight is not None else bias
    param_dtype = param.dtype if param is not None else acc_dtype(input.dtype)
    grad_param = input.new_empty(input.shape[1], dtype=param_dtype) if param_grad else _empty(input)
    return (
        dense_like(input) if input_grad else _empty(input),
        grad_param,
        grad_param.clone() if param_grad else _empty(input),
        dense_like(input) if preact_grad else _empty(input),
    )


@torch.library.register_fake("fastnorm::batch_norm_backward_reduce")
def _backward_reduce_fake(grad_out, input, mean, var, weight, bias, residual, output, eps,
                          activation, negative_slope):
    return _channel_vector(input), _channel_vector(input)


@torch.library.register_fake("fastnorm::batch_norm_backward_elemt")
def _backward_elemt_fake(grad_out, input, mean, var, weight, bias, residual, output, mean_dz,
                         mean_dz_xmu, eps, activation, negative_slope, preact_grad):
    return dense_like(input), dense_like(input) if preact_grad else _empty(input)


def _is_dense(t):
    try:
        from torch._prims_common import is_non_overlapping_and_dense
    except ImportError:  # pragma: no cover
        return t.is_contiguous()
    return is_non_overlapping_and_dense(t)


def wn_dense_like(v, dim):
    """An empty tensor in the layout of weight_norm's full-size outputs (mirrors dense_view
    in csrc/weight_norm.cpp: dim 0 with each slice a block of memory keeps v's layout)."""
    numel = v.numel()
    slice_blocks = dim == 0 and (v.size(0) <= 1 or v.stride(0) * v.size(0) == numel)
    if (dim == -1 or slice_blocks) and _is_dense(v):
        return torch.empty_like(v)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _wn_slices(v, dim):
    return 1 if dim == -1 else v.shape[dim]


@torch.library.register_fake("fastnorm::weight_norm")
def _weight_norm_fake(v, g, dim, eps):
    _check_devices("weight_norm", v, g=g)
    return wn_dense_like(v, dim), v.new_empty(_wn_slices(v, dim), dtype=acc_dtype(v.dtype))


@torch.library.register_fake("fastnorm::weight_norm_backward")
def _weight_norm_backward_fake(grad_w, v, g, norm, dim):
    _check_devices("weight_norm_backward", v, grad_w=grad_w, g=g, norm=norm)
    return wn_dense_like(v, dim), torch.empty_like(g, memory_format=torch.contiguous_format)


@torch.library.register_fake("fastnorm::weight_norm_norms")
def _weight_norm_norms_fake(v, dim, eps):
    return v.new_empty(_wn_slices(v, dim), dtype=acc_dtype(v.dtype))


def wn_dim(v, dim):
    """torch's convention: None and -1 take the norm over the whole tensor; other negative
    dims count from the end."""
    if dim is None or dim == -1:
        return -1
    if not -v.dim() <= dim < v.dim():
        raise IndexError(f"weight_norm: dim {dim} is out of range for a weight of {v.dim()} dimensions")
    return dim % v.dim()


@torch.library.register_fake("fastnorm::weight_norm_backward_")
def _weight_norm_backward_inplace_fake(grad_w, v, g, norm, dim):
    _check_devices("weight_norm_backward_", v, grad_w=grad_w, g=g, norm=norm)
    return torch.empty_like(g, memory_format=torch.contiguous_format)


from . import _transforms  # noqa: E402  (it builds on this module)
