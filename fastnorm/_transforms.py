"""The ops under torch.func transforms and forward-mode automatic differentiation.

Plain eager use goes through the C++ autograd (csrc/autograd/): no Python per call. C++
autograd Functions cannot run under torch.func (grad, vjp, jvp, vmap, jacrev, jacfwd,
hessian, functional_call) or torch.autograd.forward_ad, so while one of those is active the
ops go through the Python autograd Functions here. Their forward and first-order backward
are the same fused kernels; what the kernels do not give (forward-mode derivatives, batching
rules, derivatives of the backward) comes from each op's composite twin below: the same math
in differentiable ATen ops, which every transform handles.
"""
import torch
import torch.nn.functional as F

from ._ops import _functorch_active, acc_dtype, ops


def _below_autograd():
    """The kernels directly: the Functions here are the autograd."""
    return torch._C._AutoDispatchBelowAutograd()


# ---------------------------------------------------------------------------------------
# Composite twins: what the kernels compute, as ATen ops in the accumulation dtype.

def _activate(z, act, slope):
    if act == 0:
        return z
    if act == 2:
        return F.leaky_relu(z, slope)
    return _ACTIVATIONS[act](z)


_ACTIVATIONS = {1: torch.relu, 3: F.silu, 4: F.relu6, 5: F.hardswish, 6: F.gelu,
                7: lambda z: F.gelu(z, approximate="tanh"), 8: F.elu}


def _channel_view(t, x):
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def _reduce_dims(x):
    return [0, *range(2, x.dim())]


def _batch_stats(x):
    """Per-channel mean and biased variance of x, in the accumulation dtype."""
    xf = x.to(acc_dtype(x.dtype))
    dims = _reduce_dims(x)
    return xf.mean(dims), xf.var(dims, correction=0)


def _normalize(x, mean, var, weight, bias, residual, eps, act, slope):
    acc = acc_dtype(x.dtype)
    z = (x.to(acc) - _channel_view(mean.to(acc), x)) * _channel_view(torch.rsqrt(var.to(acc) + eps), x)
    if weight is not None:
        z = z * _channel_view(weight.to(acc), x)
    if bias is not None:
        z = z + _channel_view(bias.to(acc), x)
    if residual is not None:
        z = z + residual.to(acc)
    return _activate(z, act, slope).to(x.dtype)


def _batch_norm_composite(training, x, mean, var, weight, bias, residual, eps, act, slope):
    """The output of either forward; in training the statistics come from x."""
    if training:
        mean, var = _batch_stats(x)
    return _normalize(x, mean, var, weight, bias, residual, eps, act, slope)


def _update_running(running_mean, running_var, mean, var, count, factor):
    """The running statistics' update, as the kernels make it (unbiased variance)."""
    if running_mean is None:
        return
    unbiased = var * (count / (count - 1)) if count > 1 else var
    running_mean.add_((mean - running_mean) * factor)
    running_var.add_((unbiased - running_var) * factor)


def _zeros_for(t, like):
    return torch.zeros_like(like) if t is None else t


class _Present:
    """The tensor arguments that are not None, as a flat tuple for torch.func, and back."""

    def __init__(self, *args):
        self.args = args
        self.slots = [i for i, a in enumerate(args) if a is not None]

    def primals(self):
        return tuple(self.args[i] for i in self.slots)

    def pick(self, values):
        """values (one per argument) at the present slots, zeros where None."""
        return tuple(_zeros_for(values[i], self.args[i]) for i in self.slots)

    def rebuild(self, present):
        out = list(self.args)
        for i, t in zip(self.slots, present):
            out[i] = t
        return out

    def spread(self, present):
        """Results for the present slots, None for the absent ones."""
        out = [None] * len(self.args)
        for i, t in zip(self.slots, present):
            out[i] = t
        return out


def _jvp(fn, present, tangents):
    """Forward-mode derivative of fn(*present.args) with the tangents given (None: zero):
    (outputs, output tangents). Under torch.autograd.forward_ad, which does not nest, the
    tangent is the transpose of the reverse-mode derivative (a vjp of the linear vjp)."""
    def f(*ts):
        return fn(*present.rebuild(ts))

    primals, tangents = present.primals(), present.pick(tangents)
    if _functorch_active():
        return torch.func.jvp(f, primals, tangents)
    with torch.no_grad():
        out = f(*primals)

    def pullback(u):
        return torch.func.vjp(f, *primals)[1](u)

    u = torch.zeros_like(out)
    (t_out,) = torch.func.vjp(pullback, u)[1](tangents)
    return out, t_out


def _vjp(fn, present, cotangents):
    """Reverse-mode derivative of fn(*present.args) (outputs a tuple) for the given
    cotangents (None: zero); None for absent arguments."""
    absent = []

    def f(*ts):
        out = fn(*present.rebuild(ts))
        absent[:] = [o is None for o in out]
        return tuple(o for o in out if o is not None)

    outputs, pullback = torch.func.vjp(f, *present.primals())
    given = (c for c, a in zip(cotangents, absent) if not a)
    cots = tuple(_zeros_for(c, o) for c, o in zip(given, outputs))
    return present.spread(pullback(cots))


def _vmap(fn, in_dims, args, randomness):
    """fn batched over args; outputs that fn gives as None stay None (out_dims too)."""
    absent = []

    def tensors_only(*a):
        out = fn(*a)
        if not isinstance(out, tuple):
            return out
        absent[:] = [o is None for o in out]
        return tuple(o for o in out if o is not None)

    out = torch.func.vmap(tensors_only, in_dims=tuple(in_dims), randomness=randomness)(*args)
    if not absent:
        return out, 0
    it = iter(out)
    out = tuple(None if a else next(it) for a in absent)
    return out, tuple(None if a else 0 for a in absent)


# ---------------------------------------------------------------------------------------
# Batch norm

def _first_order(training, eps, act, slope, want):
    """(grad_out, x, mean, var, weight, bias, residual) -> (grad_x, grad_weight, grad_bias,
    grad_preact) through the composite forward; `want` says which of those are asked."""
    def grads(grad_out, x, mean, var, weight, bias, residual):
        def forward(x, weight, bias, residual):
            return _batch_norm_composite(training, x, mean, var, weight, bias, residual, eps, act, slope)

        present = _Present(x, weight, bias, residual)

        def f(*ts):
            return forward(*present.rebuild(ts))

        _, pullback = torch.func.vjp(f, *present.primals())
        g = present.spread(pullback(grad_out))
        out = [g[0] if want[0] else None, g[1] if want[1] else None, g[2] if want[1] else None,
               g[3] if want[2] else None]
        return tuple(out)

    return grads


class _BatchNormBackward(torch.autograd.Function):
    """The fused backward; its own derivatives come from the composite."""

    @staticmethod
    def forward(grad_out, x, mean, var, weight, bias, residual, output, eps, training, act, slope, want):
        want_x, want_params, want_preact = want
        with _below_autograd():
            gx, gw, gb, gz = ops.batch_norm_backward(grad_out, x, mean, var, weight, bias, residual, output, eps,
                                                     training, act, slope, want_x, want_params, want_preact)
        return (gx if want_x else None, gw if want_params and weight is not None else None,
                gb if want_params and bias is not None else None, gz if want_preact else None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_out, x, mean, var, weight, bias, residual, _, eps, training, act, slope, want = inputs
        ctx.save_for_backward(grad_out, x, mean, var, weight, bias, residual)
        ctx.save_for_forward(grad_out, x, mean, var, weight, bias, residual)
        ctx.args = (eps, training, act, slope, want)

    @staticmethod
    def _twin(ctx):
        """The composite first-order backward as a function of the saved tensors, the
        statistics held constant (absent among its differentiable arguments)."""
        eps, training, act, slope, want = ctx.args
        fn = _first_order(training, eps, act, slope, want)
        saved = ctx.saved_tensors
        present = _Present(saved[0], saved[1], None, None, saved[4], saved[5], saved[6])
        return (lambda go, x, m, v, w, b, r: fn(go, x, saved[2], saved[3], w, b, r)), present

    @staticmethod
    def backward(ctx, *grads):
        g = _vjp(*_BatchNormBackward._twin(ctx), grads)
        return (g[0], g[1], None, None, g[4], g[5], g[6], None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, *tangents):
        return _jvp(*_BatchNormBackward._twin(ctx), tangents[:7])[1]

    @staticmethod
    def vmap(info, in_dims, grad_out, x, mean, var, weight, bias, residual, output, eps, training, act, slope,
             want):
        fn = _first_order(training, eps, act, slope, want)
        return _vmap(fn, in_dims[:7], (grad_out, x, mean, var, weight, bias, residual), info.randomness)


def _backward(ctx, grad_out, training):
    """Gradients of (input, weight, bias, residual) from the saved tensors."""
    x, weight, bias, residual, output, mean, var = ctx.saved_tensors
    eps, act, slope = ctx.args
    need_x, need_w, need_b, need_res = ctx.wants
    want_params = need_w or need_b
    want_preact = need_res and act != 0
    gx, gw, gb, gz = _BatchNormBackward.apply(grad_out, x, mean, var, weight, bias, residual, output, eps, training,
                                              act, slope, (need_x, want_params, want_preact))
    g_res = (gz if want_preact else grad_out) if need_res else None
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, g_res)


def _save(ctx, x, weight, bias, residual, output, mean, var, eps, act, slope, needs):
    ctx.save_for_backward(x, weight, bias, residual, output, mean, var)
    ctx.save_for_forward(x, weight, bias, residual, output, mean, var)
    ctx.args = (eps, act, slope)
    ctx.wants = needs


class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, cumulative,
                eps, act, slope):
        with _below_autograd():
            return ops.batch_norm_train(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                        momentum, cumulative, eps, act, slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, _, _, _, _, _, eps, act, slope = inputs
        out, mean, var = output
        ctx.mark_non_differentiable(mean, var)
        needs = ctx.needs_input_grad[:4]
        _save(ctx, x, weight, bias, residual, out, mean, var, eps, act, slope, needs)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        return (*_backward(ctx, grad_out, True), None, None, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, t_x, t_w, t_b, t_res, *_):
        x, weight, bias, residual = ctx.saved_tensors[:4]
        eps, act, slope = ctx.args
        present = _Present(x, weight, bias, residual)
        _, t = _jvp(lambda x, w, b, r: _batch_norm_composite(True, x, None, None, w, b, r, eps, act, slope),
                    present, (t_x, t_w, t_b, t_res))
        return t, None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
             cumulative, eps, act, slope):
        x_dim, w_dim, b_dim, r_dim, rm_dim, rv_dim, n_dim = in_dims[:7]
        if running_mean is not None and x_dim is not None and (rm_dim is None or rv_dim is None):
            raise RuntimeError(
                "fastnorm.batch_norm under vmap: the input is batched but running_mean and running_var, which "
                "training updates in place, are not. Give each sample its own running statistics, or use "
                "batch statistics alone (track_running_stats=False, or "
                "torch.func.replace_all_batch_norm_modules_ on the model)")
        if n_dim is not None:
            raise RuntimeError("fastnorm.batch_norm under vmap: num_batches_tracked cannot be batched")
        if running_mean is not None and cumulative:
            num_batches_tracked.add_(1)
            factor = 1.0 / float(num_batches_tracked.item())
        else:
            factor = momentum

        def one(x, weight, bias, residual, running_mean, running_var):
            mean, var = _batch_stats(x)
            out = _normalize(x, mean, var, weight, bias, residual, eps, act, slope)
            with torch.no_grad():
                _update_running(running_mean, running_var, mean, var, x.numel() // x.shape[1], factor)
            return out, mean, var

        return _vmap(one, (x_dim, w_dim, b_dim, r_dim, rm_dim, rv_dim),
                     (x, weight, bias, residual, running_mean, running_var), info.randomness)


class _BatchNormElemt(torch.autograd.Function):
    @staticmethod
    def forward(x, mean, var, weight, bias, residual, eps, act, slope):
        with _below_autograd():
            return ops.batch_norm_elemt(x, mean, var, weight, bias, residual, eps, act, slope)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mean, var, weight, bias, residual, eps, act, slope = inputs
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:6])
        _save(ctx, x, weight, bias, residual, output, mean, var, eps, act, slope, needs)

    @staticmethod
    def backward(ctx, grad_out):
        gx, gw, gb, g_res = _backward(ctx, grad_out, False)
        # The statistics are constants of the evaluation: no gradient for mean and var.
        return gx, None, None, gw, gb, g_res, None, None, None

    @staticmethod
    def jvp(ctx, t_x, _t_mean, _t_var, t_w, t_b, t_res, *_):
        x, weight, bias, residual, _, mean, var = ctx.saved_tensors
        eps, act, slope = ctx.args
        present = _Present(x, weight, bias, residual)
        _, t = _jvp(lambda x, w, b, r: _normalize(x, mean, var, w, b, r, eps, act, slope), present,
                    (t_x, t_w, t_b, t_res))
        return t

    @staticmethod
    def vmap(info, in_dims, x, mean, var, weight, bias, residual, eps, act, slope):
        return _vmap(lambda *t: _normalize(*t, eps, act, slope), in_dims[:6], (x, mean, var, weight, bias, residual),
                     info.randomness)


def batch_norm_train(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
                     cumulative, eps, act, slope):
    return _BatchNormTrain.apply(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                                 momentum, cumulative, eps, act, slope)


def batch_norm_elemt(x, mean, var, weight, bias, residual, eps, act, slope):
    return _BatchNormElemt.apply(x, mean, var, weight, bias, residual, eps, act, slope)


# ---------------------------------------------------------------------------------------
# Weight norm

def _weight_norm_composite(v, g, dim, eps):
    """w = g * v / sqrt(sum(v^2) + eps) over every dimension but dim (-1: all), in v's dtype."""
    acc = acc_dtype(v.dtype)
    vf = v.to(acc)
    if dim == -1:
        norm = (vf.square().sum() + eps).sqrt()
        scale = g.to(acc).reshape(()) / norm
    else:
        dims = [d for d in range(v.dim()) if d != dim]
        norm = (vf.square().sum(dims, keepdim=True) + eps).sqrt()
        shape = [1] * v.dim()
        shape[dim] = v.shape[dim]
        scale = g.to(acc).reshape(shape) / norm
    return (vf * scale).to(v.dtype)


def _weight_norm_grads(grad_w, v, g, dim, eps):
    _, pullback = torch.func.vjp(lambda v, g: _weight_norm_composite(v, g, dim, eps), v, g)
    return pullback(grad_w)


class _WeightNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad_w, v, g, norm, dim, eps):
        with _below_autograd():
            return ops.weight_norm_backward(grad_w, v, g, norm, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_w, v, g, _, dim, eps = inputs
        ctx.save_for_backward(grad_w, v, g)
        ctx.save_for_forward(grad_w, v, g)
        ctx.args = (dim, eps)

    @staticmethod
    def backward(ctx, gg_v, gg_g):
        grad_w, v, g = ctx.saved_tensors
        dim, eps = ctx.args
        g3 = _vjp(lambda gw, v, g: _weight_norm_grads(gw, v, g, dim, eps), _Present(grad_w, v, g), (gg_v, gg_g))
        return g3[0], g3[1], g3[2], None, None, None

    @staticmethod
    def jvp(ctx, t_gw, t_v, t_g, *_):
        grad_w, v, g = ctx.saved_tensors
        dim, eps = ctx.args
        _, t = _jvp(lambda gw, v, g: _weight_norm_grads(gw, v, g, dim, eps), _Present(grad_w, v, g),
                    (t_gw, t_v, t_g))
        return t

    @staticmethod
    def vmap(info, in_dims, grad_w, v, g, norm, dim, eps):
        return _vmap(lambda gw, v, g: _weight_norm_grads(gw, v, g, dim, eps), in_dims[:3], (grad_w, v, g),
                     info.randomness)


class _WeightNorm(torch.autograd.Function):
    @staticmethod
    def forward(v, g, dim, eps):
        with _below_autograd():
            return ops.weight_norm(v, g, dim, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, g, dim, eps = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(v, g, output[1])
        ctx.save_for_forward(v, g, output[1])
        ctx.args = (dim, eps)

    @staticmethod
    def backward(ctx, grad_w, _grad_norm):
        v, g, norm = ctx.saved_tensors
        dim, eps = ctx.args
        grad_v, grad_g = _WeightNormBackward.apply(grad_w, v, g, norm, dim, eps)
        return grad_v, grad_g, None, None

    @staticmethod
    def jvp(ctx, t_v, t_g, *_):
        v, g, _ = ctx.saved_tensors
        dim, eps = ctx.args
        _, t = _jvp(lambda v, g: _weight_norm_composite(v, g, dim, eps), _Present(v, g), (t_v, t_g))
        return t, None

    @staticmethod
    def vmap(info, in_dims, v, g, dim, eps):
        def one(v, g):
            return _weight_norm_composite(v, g, dim, eps), weight_norm_norms(v, dim, eps)

        return _vmap(one, in_dims[:2], (v, g), info.randomness)


def weight_norm(v, g, dim, eps):
    """(w, norm) of the weight norm; dim already in the ops' convention (-1: whole tensor)."""
    return _WeightNorm.apply(v, g, dim, eps)


def weight_norm_norms(v, dim, eps):
    """sqrt(sum(v^2) + eps) per slice, in the accumulation dtype (composite: differentiable
    by every transform)."""
    vf = v.to(acc_dtype(v.dtype))
    dims = list(range(v.dim())) if dim == -1 else [d for d in range(v.dim()) if d != dim]
    return (vf.square().sum(dims) + eps).sqrt().reshape(-1)
