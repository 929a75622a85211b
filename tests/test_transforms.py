"""torch.func transforms and forward-mode AD: fastnorm's layers against torch's under grad,
vjp, jvp, jacrev, jacfwd, hessian, vmap and functional_call, in float64.

The reference is torch's own layer, or where fastnorm adds a residual and an activation,
torch's batch norm followed by the same residual and activation.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, replace_all_batch_norm_modules_, vjp, vmap

import fastnorm
import fastnorm.functional as FF

TOL = dict(rtol=1e-7, atol=1e-9)
ACTS = {None: lambda z, s: z, "relu": lambda z, s: F.relu(z), "leaky_relu": F.leaky_relu, "silu": lambda z, s: F.silu(z),
        "gelu_tanh": lambda z, s: F.gelu(z, approximate="tanh"), "hardswish": lambda z, s: F.hardswish(z)}


def torch_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None,
                     activation=None, negative_slope=0.01):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return ACTS[activation](y, negative_slope)


def pair(cls_name, *args, **kwargs):
    """torch's module and fastnorm's, with the same random parameters and buffers, float64."""
    ref = getattr(torch.nn, cls_name)(*args, **kwargs).double()
    with torch.no_grad():
        for t in list(ref.parameters()) + [b for b in ref.buffers() if b.is_floating_point()]:
            t.uniform_(0.5, 1.5)
    ours = getattr(fastnorm, cls_name)(*args, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def state(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}, {k: v.clone() for k, v in m.named_buffers()}


def assert_tree_close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_close(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tree_close(x, y)
    else:
        torch.testing.assert_close(a, b, **TOL)


SHAPES = {"BatchNorm1d": (6, 3, 5), "BatchNorm2d": (4, 3, 3, 5), "BatchNorm3d": (3, 3, 2, 3, 2)}
MODES = ["train", "eval", "no_stats"]


def modules(cls_name, mode):
    ref, ours = pair(cls_name, 3, track_running_stats=(mode != "no_stats"))
    for m in (ref, ours):
        m.train(mode != "eval")
    return ref, ours


@pytest.mark.parametrize("cls_name", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
def test_module_grad_over_params_and_input(cls_name, mode):
    """functional_call + grad over parameters and input; buffers passed in, updated as torch's."""
    ref, ours = modules(cls_name, mode)
    x = torch.randn(SHAPES[cls_name], dtype=torch.float64)
    results = []
    for m in (ref, ours):
        params, buffers = state(m)

        def loss(p, x, b):  # the buffers an argument: torch refuses to update captured ones
            return functional_call(m, {**p, **b}, (x,)).sin().sum()

        g = grad(loss, argnums=(0, 1))(params, x, buffers)
        results.append((g, buffers))
    assert_tree_close(results[0], results[1])


@pytest.mark.parametrize("cls_name", list(SHAPES))
@pytest.mark.parametrize("mode", ["eval", "no_stats"])
def test_module_vjp_jvp_jacobians(cls_name, mode):
    ref, ours = modules(cls_name, mode)
    x = torch.randn(SHAPES[cls_name], dtype=torch.float64)
    t = torch.randn_like(x)
    out = []
    for m in (ref, ours):
        params, buffers = state(m)

        def f(w, b, x):
            return functional_call(m, {"weight": w, "bias": b, **copy.deepcopy(buffers)}, (x,))

        w, b = params["weight"], params["bias"]
        y, pullback = vjp(f, w, b, x)
        cot = torch.cos(y)
        r = {"vjp": pullback(cot), "jvp": jvp(f, (w, b, x), (torch.ones_like(w), -torch.ones_like(b), t))[1],
             "jacrev": jacrev(f, argnums=(0, 1))(w, b, x), "jacfwd": jacfwd(f, argnums=(0, 1))(w, b, x),
             "hessian_w": hessian(lambda w: f(w, b, x).sin().sum())(w),
             "hessian_x": hessian(lambda x: f(w, b, x).sin().sum())(x[:2] if mode == "eval" else x).sum(0)}
        out.append(r)
    assert_tree_close(out[0], out[1])


@pytest.mark.parametrize("cls_name", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
def test_module_vmap(cls_name, mode):
    """vmap over a batch of inputs after replace_all_batch_norm_modules_ (train) or as is
    (eval), and per-sample gradients (vmap of grad)."""
    ref, ours = modules(cls_name, mode)
    xs = torch.randn(2, *SHAPES[cls_name], dtype=torch.float64)
    out = []
    for m in (ref, ours):
        if mode == "train":
            replace_all_batch_norm_modules_(m)
        params, buffers = state(m)

        def loss(p, x):
            return functional_call(m, {**p, **buffers}, (x,)).sin().sum()

        out.append((vmap(m)(xs), vmap(grad(loss), in_dims=(None, 0))(params, xs),
                    vmap(jvp, in_dims=(None, (0,), (0,)))(m, (xs,), (torch.ones_like(xs),))))
    assert_tree_close(out[0], out[1])


@pytest.mark.parametrize("cls_name", ["BatchNorm2d"])
def test_vmap_unbatched_running_stats_raise(cls_name):
    """Training with running statistics shared by every sample of a vmap: torch raises, so
    does fastnorm (RuntimeError), and its buffers stay as they were (torch's count goes up)."""
    ref, ours = modules(cls_name, "train")
    xs = torch.randn(2, *SHAPES[cls_name], dtype=torch.float64)
    for m in (ref, ours):
        before = {k: v.clone() for k, v in m.named_buffers()}
        with pytest.raises(RuntimeError, match="running_mean"):
            vmap(m)(xs)
        if m is ref:
            del before["num_batches_tracked"]
        assert_tree_close({k: v for k, v in m.named_buffers() if k in before}, before)


def test_vmap_batched_running_stats():
    """Each sample with its own running statistics: updated per sample, as torch's."""
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    w, b = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    stats = torch.rand(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64) + 0.5
    results = []
    for fn in (F.batch_norm, FF.batch_norm):
        rm, rv = (t.clone() for t in stats)
        y = vmap(lambda x, rm, rv: fn(x, rm, rv, w, b, True, 0.3, 1e-3))(x, rm, rv)
        results.append((y, rm, rv))
    assert_tree_close(results[0], results[1])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "silu", "gelu_tanh", "hardswish"])
@pytest.mark.parametrize("residual", [False, True])
def test_functional_with_epilogue(training, activation, residual):
    """The functional with a residual and a fused activation under grad, jvp, vmap and
    hessian, against torch's batch norm followed by the same ops."""
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    res = torch.randn_like(x) if residual else None
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    slope = -0.2 if activation == "leaky_relu" else 0.01
    stats = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    tangents = (torch.randn_like(x), torch.randn_like(w), torch.randn_like(b))
    out = []
    for fn in (torch_batch_norm, FF.batch_norm):
        rm, rv = (t.clone() for t in stats)

        def f(x, w, b, res):
            return fn(x, rm, rv, w, b, training, 0.1, 1e-3, residual=res, activation=activation,
                      negative_slope=slope)

        args = (x, w, b, res)
        argnums = (0, 1, 2, 3) if residual else (0, 1, 2)
        r = {
            "grad": grad(lambda *a: f(*a).sin().sum(), argnums=argnums)(*args),
            "jvp": jvp(lambda x, w, b: f(x, w, b, res), (x, w, b), tangents)[1],
            "vmap": vmap(lambda x: fn(x, None if training else rm, None if training else rv, w, b, training, 0.1,
                                      1e-3, residual=res, activation=activation, negative_slope=slope)
                         )(torch.stack([x, 2 * x])),
            "hessian": hessian(lambda w: f(x, w, b, res).sin().sum())(w),
        }
        out.append((r, rm, rv))
    assert_tree_close(out[0], out[1])


@pytest.mark.parametrize("training", [True, False])
def test_forward_ad(training):
    """torch.autograd.forward_ad: dual inputs give torch's tangent."""
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    tx = torch.randn_like(x)
    w, tw = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out = []
    for fn in (F.batch_norm, FF.batch_norm):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        with forward_ad.dual_level():
            y = fn(forward_ad.make_dual(x, tx), rm, rv, forward_ad.make_dual(w, tw), None, training, 0.1, 1e-5)
            p, t = forward_ad.unpack_dual(y)
            out.append((p.clone(), t.clone(), rm, rv))
    assert_tree_close(out[0], out[1])


# ---------------------------------------------------------------------------------------
# Weight norm

WN_CASES = [((5, 4), 0), ((5, 4), 1), ((4, 3, 2), 1), ((4, 3, 2), -2), ((4, 3, 2), None), ((3, 2, 2, 2), 2)]


def torch_weight_norm(v, g, dim):
    """torch._weight_norm's math in differentiable ops (torch's op has no forward-mode AD)."""
    if dim is None:
        return v * (g / torch.linalg.vector_norm(v))
    d = dim % v.dim()
    return v * (g / torch.linalg.vector_norm(v, dim=[i for i in range(v.dim()) if i != d], keepdim=True))


def g_for(v, dim):
    if dim is None:
        return torch.rand((), dtype=v.dtype) + 0.5
    shape = [1] * v.dim()
    d = dim % v.dim()
    shape[d] = v.shape[d]
    return torch.rand(shape, dtype=v.dtype) + 0.5


@pytest.mark.parametrize("shape,dim", WN_CASES)
def test_weight_norm_functional(shape, dim):
    v = torch.randn(shape, dtype=torch.float64)
    g = g_for(v, dim)
    out = []
    for fn in (torch_weight_norm, lambda v, g, dim: FF.weight_norm(v, g, dim)):
        def f(v, g):
            return fn(v, g, dim)

        r = {"grad": grad(lambda v, g: f(v, g).sin().sum(), argnums=(0, 1))(v, g),
             "jvp": jvp(f, (v, g), (torch.ones_like(v), torch.ones_like(g)))[1],
             "vjp": vjp(f, v, g)[1](torch.cos(v)),
             "jacrev": jacrev(f, argnums=1)(v, g), "jacfwd": jacfwd(f, argnums=1)(v, g),
             "hessian": hessian(lambda v: f(v, g).sin().sum())(v),
             "vmap": vmap(f)(torch.stack([v, -2 * v]), torch.stack([g, g + 1])),
             "vmap_grad": vmap(grad(lambda v, g: f(v, g).sin().sum()), in_dims=(0, None))(torch.stack([v, 3 * v]), g)}
        with forward_ad.dual_level():
            r["forward_ad"] = forward_ad.unpack_dual(f(forward_ad.make_dual(v, torch.ones_like(v)), g)).tangent.clone()
        out.append(r)
    assert_tree_close(out[0], out[1])


@pytest.mark.parametrize("layer", ["linear", "conv1d"])
def test_weight_norm_module_functional_call(layer):
    """A weight-normed layer under functional_call + grad, vmap of grad and jacfwd, against
    torch's parametrization (same state_dict keys)."""
    torch.manual_seed(1)
    make = (lambda: torch.nn.Linear(6, 4)) if layer == "linear" else (lambda: torch.nn.Conv1d(3, 4, 3))
    base = make().double()
    ref = torch.nn.utils.parametrizations.weight_norm(copy.deepcopy(base))
    ours = fastnorm.weight_norm(copy.deepcopy(base))
    assert dict(ref.named_parameters()).keys() == dict(ours.named_parameters()).keys()
    x = torch.randn((2, 5, 6) if layer == "linear" else (2, 3, 7), dtype=torch.float64)
    out = []
    for m in (ref, ours):
        params = {k: v.detach() for k, v in m.named_parameters()}

        def loss(p, x):
            return functional_call(m, p, (x,)).sin().sum()

        out.append((grad(loss)(params, x), vmap(grad(loss), in_dims=(None, 0))(params, x),
                    jacfwd(lambda x: functional_call(m, params, (x,)))(x[0])))
    assert_tree_close(out[0], out[1])


# ---------------------------------------------------------------------------------------
# Meta-learning, kernels under grad, eager unchanged

class ConvNet(torch.nn.Module):
    def __init__(self, ns):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = ns.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = ns.BatchNorm2d(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def test_maml_inner_loop():
    """MAML: an inner SGD loop by torch.func.grad through conv + BatchNorm2d (batch
    statistics, as MAML uses them), then the outer gradient through it: fastnorm's net gives
    torch's adapted parameters and meta-gradient."""
    torch.manual_seed(0)
    ref = ConvNet(torch.nn).double()
    ours = ConvNet(fastnorm).double()
    ours.load_state_dict(ref.state_dict())
    x_support, y_support = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    x_query, y_query = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    out = []
    for net in (ref, ours):
        replace_all_batch_norm_modules_(net)
        params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}

        def inner_loss(p, x, y):
            return F.cross_entropy(functional_call(net, p, (x,)), y)

        def adapted(p):
            for _ in range(3):
                g = grad(inner_loss)(p, x_support, y_support)
                p = {k: p[k] - 0.1 * g[k] for k in p}
            return p

        fast = adapted(params)
        meta_loss = inner_loss(fast, x_query, y_query)
        meta_grad = torch.autograd.grad(meta_loss, list(params.values()))
        out.append(({k: v.detach() for k, v in fast.items()}, meta_loss.detach(), meta_grad))
    assert_tree_close(out[0], out[1])


def _profiled_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_fused_kernels_run_under_grad_and_vjp():
    """Under torch.func.grad and vjp the forward and the first-order backward are fastnorm's
    kernels (the composite is for what they do not give)."""
    m = fastnorm.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    params, buffers = state(m)
    seen = _profiled_ops(lambda: grad(lambda p: functional_call(m, {**p, **buffers}, (x,)).square().sum())(params))
    assert {"fastnorm::batch_norm_train", "fastnorm::batch_norm_backward"} <= seen, seen
    assert "aten::var" not in seen and "aten::var_mean" not in seen
    m.eval()
    seen = _profiled_ops(lambda: vjp(lambda x: m(x), x)[1](torch.ones_like(x)))
    assert {"fastnorm::batch_norm_elemt", "fastnorm::batch_norm_backward"} <= seen, seen
    v, g = torch.randn(6, 5), torch.rand(6, 1)
    seen = _profiled_ops(lambda: grad(lambda v: FF.weight_norm(v, g).square().sum())(v))
    assert {"fastnorm::weight_norm", "fastnorm::weight_norm_backward"} <= seen, seen


def test_eager_keeps_the_cpp_autograd():
    """Outside transforms the layers' autograd is the C++ one (no Python Function per call)."""
    m = fastnorm.BatchNorm2d(3)
    y = m(torch.randn(4, 3, 2, 2, requires_grad=True))
    assert "python" not in type(y.grad_fn).__name__.lower()
    assert type(y.grad_fn).__module__ != "fastnorm._transforms" and "_BatchNorm" not in type(y.grad_fn).__name__
    w = FF.weight_norm(torch.randn(3, 2, requires_grad=True), torch.rand(3, 1))
    assert "WeightNormBackward" in w.grad_fn.name() and "_WeightNorm" not in type(w.grad_fn).__name__


def test_mean_only_batch_norm_under_grad_and_vmap():
    m = fastnorm.MeanOnlyBatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)

    def reference(bias, x, training):
        mean = x.mean((0, 2, 3), keepdim=True) if training else torch.zeros(1, 3, 1, 1, dtype=x.dtype)
        return x - mean + bias.view(1, 3, 1, 1)

    params, buffers = state(m)
    g = grad(lambda p, x, b: functional_call(m, {**p, **b}, (x,)).sin().sum(), argnums=(0, 1))(params, x, buffers)
    g_ref = grad(lambda b, x: reference(b, x, True).sin().sum(), argnums=(0, 1))(params["bias"], x)
    assert_tree_close((g[0]["bias"], g[1]), g_ref)
    m.eval()
    xs = torch.stack([x, x + 1])
    assert_tree_close(vmap(m)(xs), vmap(lambda x: reference(params["bias"], x, False))(xs))
