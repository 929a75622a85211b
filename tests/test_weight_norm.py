"""Weight norm against torch: the functional op for every dim, dtype and layout, its
gradients, and the module parametrization as a drop-in for torch's."""
import copy
import importlib
import io
import pickle

import pytest
import torch
from torch import nn

import fastnorm
from conftest import (DEVICES, FLOAT_DTYPES, LOW_PRECISION, assert_close_to_reference,
                      assert_compiled_autograd_matches_eager, param_dtype_for)


def torch_dim(ndim, dim):
    return -1 if dim is None or dim == -1 else dim % ndim


def make_vg(shape, dim, dtype, device, g_dtype=None):
    v = (torch.randn(shape, device=device, dtype=torch.float64) * 2).to(dtype)
    d = torch_dim(len(shape), dim)
    gshape = [1] * len(shape)
    if d != -1:
        gshape[d] = shape[d]
    g = (torch.rand(gshape, device=device, dtype=torch.float64) + 0.5).to(g_dtype or dtype)
    return v, g


def run(fn, v, g, gw, upcast=False):
    conv = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach().clone())
    vr, gr = conv(v).requires_grad_(), conv(g).requires_grad_()
    w = fn(vr, gr)
    w.backward(gw.double() if upcast else gw)
    return w, vr.grad, gr.grad


CASES = [  # shape, dim: 0, last, middle, negative, whole tensor (None and -1)
    ((37, 19), 0), ((37, 19), 1), ((6, 5, 7), 1), ((6, 5, 7), -2), ((4, 3, 2, 5), 2),
    ((16, 8, 3, 3), 0), ((16, 8, 3, 3), 3), ((7, 13), None), ((3, 4, 5), -1), ((1025,), 0), ((2, 4097), 0),
    # the CPU kernel's paths: slices of single values or short runs (scalar), runs of 40;
    # short runs walked by rows over several row blocks and column chunks, inner 1 and 3;
    # short runs in slices of fewer than 32 values (exact products)
    ((1, 50), 1), ((500, 3), 0), ((4, 70, 40), 1), ((300, 4100), 1), ((600, 40, 3), 1),
    ((20, 30), 1), ((3, 40, 2), 1),
    # dim 0 of dense rows: in batches of one row per vector lane (forward up to 256 values a
    # row, backward 32 to 128), the last batch short; longer rows one at a time (backward)
    ((40, 48), 0), ((300, 2, 16), 0), ((45, 128), 0), ((19, 256), 0), ((64, 200), 0),
    # CUDA: slices too few to fill the GPU, shared by several blocks (on an H100/H200 the
    # whole tensor takes 150 blocks in float32; 3 slices: 6 blocks each)
    ((300, 4100), None), ((3, 50000), 0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dim", CASES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_functional_matches_torch(device, shape, dim, dtype):
    v, g = make_vg(shape, dim, dtype, device)
    gw = torch.randn(shape, device=device).to(dtype)
    d = torch_dim(len(shape), dim)
    ours = run(lambda a, b: fastnorm.functional.weight_norm(a, b, dim), v, g, gw)
    # The float64 reference is taken on the CPU: torch's CUDA kernel for dim 0 and the last
    # dim takes its square root in float32 (sqrtf) even for float64, 1e-7 off.
    ref = run(lambda a, b: torch._weight_norm(a, b, d), v.cpu(), g.cpu(), gw.cpu(), upcast=True)
    theirs = run(lambda a, b: torch._weight_norm(a, b, d), v, g, gw)
    for name, o, r, t in zip(["w", "grad v", "grad g"], ours, ref, theirs):
        assert o.dtype == dtype and o.shape == r.shape
        # No allowance for torch's own error in float64: the reference is exact there.
        assert_close_to_reference(o.cpu(), r, dtype, None if dtype == torch.float64 else t.cpu(), what=name)


# (the CPU's paths: short rows grouped, batched, and one at a time in the backward)
@pytest.mark.parametrize("shape", [(12, 9), (40, 48), (12, 300)], ids=str)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_float32_g_with_low_precision_v(dtype, shape):
    v, g = make_vg(shape, 0, dtype, "cpu", g_dtype=torch.float32)
    gw = torch.randn(shape).to(dtype)
    w, gv, gg = run(lambda a, b: fastnorm.functional.weight_norm(a, b, 0), v, g, gw)
    ref = run(lambda a, b: torch._weight_norm(a, b, 0), v, g, gw, upcast=True)
    assert w.dtype == dtype and gv.dtype == dtype and gg.dtype == torch.float32
    assert_close_to_reference(w, ref[0], dtype, what="w")
    assert_close_to_reference(gv, ref[1], dtype, what="grad v")
    assert_close_to_reference(gg, ref[2], dtype, what="grad g")


@pytest.mark.parametrize("device", DEVICES)
def test_memory_format_kept(device):
    v = torch.randn(16, 8, 3, 3, device=device).to(memory_format=torch.channels_last)
    g = torch.rand(16, 1, 1, 1, device=device)
    w = fastnorm.functional.weight_norm(v, g, 0)
    assert w.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(w, torch._weight_norm(v, g, 0))
    vt = torch.randn(9, 12, device=device).t()  # non-contiguous, dim 1
    gt = torch.rand(1, 9, device=device)
    torch.testing.assert_close(fastnorm.functional.weight_norm(vt, gt, 1), torch._weight_norm(vt, gt, 1))


@pytest.mark.parametrize("dim", [0, 1, -2, None])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_gradcheck_and_gradgradcheck(dim, eps):
    v, g = make_vg((5, 4, 3), dim, torch.float64, "cpu")
    v.requires_grad_(), g.requires_grad_()

    def fn(v, g):
        return fastnorm.functional.weight_norm(v, g, dim, eps=eps)

    assert torch.autograd.gradcheck(fn, (v, g))
    assert torch.autograd.gradgradcheck(fn, (v, g))


def test_zero_norm_slices():
    v = torch.randn(4, 6, dtype=torch.float64)
    v[1] = 0
    g = torch.rand(4, 1, dtype=torch.float64)
    ours, theirs = fastnorm.functional.weight_norm(v, g, 0), torch._weight_norm(v, g, 0)
    assert torch.isnan(ours[1]).all() and torch.isnan(theirs[1]).all()  # as torch
    torch.testing.assert_close(ours[[0, 2, 3]], theirs[[0, 2, 3]])
    v.requires_grad_(), g.requires_grad_()
    w = fastnorm.functional.weight_norm(v, g, 0, eps=1e-6)
    assert torch.isfinite(w).all() and (w[1] == 0).all()
    w.sum().backward()
    assert torch.isfinite(v.grad).all() and torch.isfinite(g.grad).all()
    # eps sits under the square root
    expected = g * v / (v.detach().square().sum(1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(w, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_slices_of_no_values(device, eps):
    """A (4, 0) weight: empty w, and norms of empty slices (sqrt(eps), 0 as torch) from the
    forward as from the norms op; the backward's grad_g is 0 (w does not depend on g), as
    torch >= 2.15's (older torch: NaN at eps=0)."""
    v = torch.empty(4, 0, device=device)
    g = torch.rand(4, 1, device=device).requires_grad_()
    w, n = torch.ops.fastnorm.weight_norm(v, g, 0, eps)
    assert w.shape == (4, 0)
    torch.testing.assert_close(n, torch.full((4,), eps ** 0.5, device=device))
    torch.testing.assert_close(torch.ops.fastnorm.weight_norm_norms(v, 0, eps), n)
    if eps == 0.0:
        torch.testing.assert_close(n, torch._weight_norm_interface(v, g.detach(), 0)[1].reshape(4))
    fastnorm.functional.weight_norm(v, g, 0, eps=eps).sum().backward()
    torch.testing.assert_close(g.grad, torch.zeros_like(g))
    if eps == 0.0:
        gt = g.detach().clone().requires_grad_()
        torch._weight_norm(v, gt, 0).sum().backward()
        newer_torch = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 15)
        assert torch.equal(gt.grad, g.grad) if newer_torch else torch.isnan(gt.grad).all()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's forward_ad import
def test_bad_input():
    v = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"g of shape \[3, 1\].*does not fit v of shape \[4, 6\].*with dim=0"):
        fastnorm.functional.weight_norm(v, torch.ones(3, 1), 0)
    with pytest.raises(RuntimeError, match="floating-point weight"):
        fastnorm.functional.weight_norm(torch.ones(4, 6, dtype=torch.long), torch.ones(4, 1), 0)
    with pytest.raises(RuntimeError, match="g on v's device|expected g on"):
        fastnorm.functional.weight_norm(v, torch.ones(4, 1, device="meta"), 0)
    with pytest.raises(IndexError, match="out of range"):
        fastnorm.functional.weight_norm(v, torch.ones(4, 1), 2)
    with pytest.raises(RuntimeError, match="expected g of dtype torch.float32"):
        fastnorm.functional.weight_norm(v, torch.ones(4, 1, dtype=torch.float64), 0)
    import torch.autograd.forward_ad as fwAD
    # The op's C++ autograd has no forward mode (the public API takes it through
    # fastnorm/_transforms.py, tests/test_transforms.py): called directly, it says so.
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="forward-mode"):
        torch.ops.fastnorm.weight_norm(fwAD.make_dual(v, torch.randn_like(v)), torch.ones(4, 1), 0, 0.0)


def test_graph_node_semantics():
    """The backward node frees what it saved, and refuses v changed in place after the forward."""
    v = torch.randn(5, 3, requires_grad=True)
    g = torch.rand(5, 1, requires_grad=True)
    w = fastnorm.functional.weight_norm(v, g, 0)
    assert "WeightNorm" in w.grad_fn.name()
    w.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        w.sum().backward()
    w = fastnorm.functional.weight_norm(v, g, 0)
    with torch.no_grad():
        v.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w.sum().backward()
    if hasattr(torch.autograd.graph, "node_creation_hook"):  # newer torch: the node is announced
        seen = []
        with torch.autograd.graph.node_creation_hook(lambda node: seen.append(node.name())):
            fastnorm.functional.weight_norm(v, g, 0)
        assert any("WeightNorm" in name for name in seen), seen
    only_g = fastnorm.functional.weight_norm(v.detach(), g, 0)  # one input needs a gradient
    (grad_g,) = torch.autograd.grad(only_g.sum(), [g])
    expected = torch.autograd.grad(torch._weight_norm(v.detach(), g, 0).sum(), [g])[0]
    torch.testing.assert_close(grad_g, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    v = torch.randn(6, 5, 3, device=device, requires_grad=True)
    g = torch.rand(6, 1, 1, device=device, requires_grad=True)
    ops = torch.ops.fastnorm
    torch.library.opcheck(ops.weight_norm.default, (v, g, 0, 0.0))
    torch.library.opcheck(ops.weight_norm.default, (v, torch.rand(1, 1, 3, device=device, requires_grad=True), 2, 1e-4))
    torch.library.opcheck(ops.weight_norm_norms.default, (v, 1, 0.0))
    w, n = ops.weight_norm(v.detach(), g.detach(), 0, 0.0)
    torch.library.opcheck(ops.weight_norm_backward.default, (torch.randn_like(w), v.detach(), g.detach(), n, 0))
    gw = torch.randn_like(w)
    grad_v, grad_g = ops.weight_norm_backward(gw, v.detach(), g.detach(), n, 0)
    torch.library.opcheck(ops.weight_norm_backward_.default, (gw.clone(), v.detach(), g.detach(), n, 0))
    assert torch.equal(ops.weight_norm_backward_(gw, v.detach(), g.detach(), n, 0), grad_g)
    assert torch.equal(gw, grad_v)  # written in place


# ---------------------------------------------------------------------------------------
# Modules

MODULES = [
    ("linear", lambda: nn.Linear(20, 12), lambda: torch.randn(4, 20)),
    ("linear wide batch", lambda: nn.Linear(6, 5), lambda: torch.randn(64, 6)),  # materializes w
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, padding=1), lambda: torch.randn(2, 4, 9)),
    ("conv2d", lambda: nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), lambda: torch.randn(2, 8, 6, 6)),
    ("conv2d big output", lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: torch.randn(2, 3, 16, 16)),
    ("conv2d reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), lambda: torch.randn(2, 3, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(3, 5, 2), lambda: torch.randn(2, 3, 4, 4, 4)),
    ("convtranspose1d", lambda: nn.ConvTranspose1d(4, 6, 3), lambda: torch.randn(2, 4, 7)),
    ("convtranspose2d", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2), lambda: torch.randn(2, 4, 5, 5)),
    ("convtranspose3d", lambda: nn.ConvTranspose3d(2, 3, 2), lambda: torch.randn(2, 2, 3, 3, 3)),
    ("embedding", lambda: nn.Embedding(30, 8), lambda: torch.randint(0, 30, (4, 5))),
]


@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("name,make,make_input", MODULES, ids=[m[0] for m in MODULES])
def test_module_matches_torch_weight_norm(name, make, make_input, dim):
    torch.manual_seed(0)
    ours = make()
    theirs = copy.deepcopy(ours)
    fastnorm.weight_norm(ours, dim=dim)
    torch.nn.utils.parametrizations.weight_norm(theirs, dim=dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = make_input()
    xs = [x.clone().requires_grad_() if x.is_floating_point() else x for _ in range(2)]
    ys = [m(xi) for m, xi in zip((ours, theirs), xs)]
    g = torch.randn_like(ys[0])
    for y in ys:
        y.backward(g)
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
    if x.is_floating_point():
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture
def scaled_everywhere(monkeypatch):
    """Every Linear/Conv with dim=0 scales its output (the size rule off), so that small
    layers test that path."""
    module = importlib.import_module("fastnorm.weight_norm")
    monkeypatch.setattr(module, "_SCALED_MIN_WEIGHT", 0)
    monkeypatch.setattr(module, "_SCALED_FAN_IN_PER_POSITION", {"linear": 1, "conv": 1})


def ops_run(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


@pytest.mark.parametrize("make,x_shape,scaled", [
    (lambda: nn.Linear(1024, 1024), (8, 1024), True),
    (lambda: nn.Linear(1024, 1024), (2, 4, 1024), True),
    (lambda: nn.Linear(1024, 1024), (128, 1024), False),  # many rows against the fan-in
    (lambda: nn.Linear(256, 256), (2, 256), False),  # a small weight
    (lambda: nn.Conv2d(512, 64, 3, padding=1), (2, 512, 1, 1), True),
    (lambda: nn.Conv2d(512, 64, 3, padding=1), (2, 512, 4, 4), False),
    (lambda: nn.Conv2d(512, 64, 3, stride=2, padding=1), (2, 512, 4, 4), True),  # a 2x2 output
    (lambda: nn.Conv2d(512, 64, 3, padding=1, dilation=2), (2, 512, 4, 4), True),  # a 2x2 output
    (lambda: nn.Linear(1024, 1024), (1024,), True),
], ids=["linear", "linear 3-d", "linear many rows", "linear small", "conv 1x1 map", "conv 4x4 map",
        "conv stride 2", "conv dilation 2", "linear 1-d"])
def test_scaled_output_selection(make, x_shape, scaled):
    ours = make()
    theirs = copy.deepcopy(ours)
    fastnorm.weight_norm(ours)
    torch.nn.utils.parametrizations.weight_norm(theirs)
    x = torch.randn(x_shape)
    y, names = ops_run(lambda: ours(x))
    assert ("fastnorm::weight_norm" not in names) == scaled
    assert "fastnorm::weight_norm_norms" in names or not scaled
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_scaled_output_on_cuda():
    """On a GPU, w is materialized even where the CPU would scale the output."""
    layer = fastnorm.weight_norm(nn.Linear(1024, 1024).cuda())
    _, names = ops_run(lambda: layer(torch.randn(8, 1024, device="cuda")))
    assert "fastnorm::weight_norm" in names and "fastnorm::weight_norm_norms" not in names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype,g_dtype", [(d, None) for d in FLOAT_DTYPES] + [(d, torch.float32) for d in LOW_PRECISION],
                         ids=str)
@pytest.mark.parametrize("dim", [None, 0, 1], ids=["whole", "dim 0", "last dim"])
def test_cuda_one_launch_per_direction(dim, dtype, g_dtype):
    """The forward is one kernel launch and so is the backward, g (and grad_g) in v's dtype
    or in float32."""
    v, g = make_vg((300, 4100), dim, dtype, "cuda", g_dtype=g_dtype)
    vr, gr = v.requires_grad_(), g.requires_grad_()
    gw = torch.randn_like(v)

    def launches(fn):
        fn()  # warm-up
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    assert len(launches(lambda: fastnorm.functional.weight_norm(vr, gr, dim))) == 1
    w = fastnorm.functional.weight_norm(vr, gr, dim)
    assert len(launches(lambda: torch.autograd.grad(w, (vr, gr), gw, retain_graph=True))) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dim", [None, 0, 1], ids=["whole (blocks share the slice)", "dim 0", "last dim"])
def test_cuda_graph_capture(dim):
    """Every CUDA kernel (the cooperative launch of shared slices too) replays from a graph."""
    v, g = make_vg((300, 4100), dim, torch.float32, "cuda")
    gw = torch.randn_like(v)
    vr, gr = v.clone().requires_grad_(), g.clone().requires_grad_()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch's docs ask
        fastnorm.functional.weight_norm(vr, gr, dim).backward(gw)
    torch.cuda.current_stream().wait_stream(stream)
    vr.grad = gr.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w = fastnorm.functional.weight_norm(vr, gr, dim)
        gv, gg = torch.autograd.grad(w, (vr, gr), gw)
    v.mul_(1.5).add_(0.25)  # new values in the captured inputs
    with torch.no_grad():
        vr.copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    d = torch_dim(2, dim)
    ref = run(lambda a, b: torch._weight_norm(a, b, d), v.cpu(), g.cpu(), gw.cpu(), upcast=True)
    for name, o, r in zip(["w", "grad v", "grad g"], (w, gv, gg), ref):
        assert_close_to_reference(o.cpu(), r, torch.float32, what=name)


SCALED_LAYERS = [  # layers that scale their output by g / ||v|| (with scaled_everywhere)
    ("linear", lambda dt: nn.Linear(40, 24, dtype=dt), (6, 40)),
    ("linear 3-d input", lambda dt: nn.Linear(40, 24, dtype=dt), (2, 3, 40)),
    ("linear no bias", lambda dt: nn.Linear(40, 24, bias=False, dtype=dt), (5, 40)),
    ("linear 1-d input", lambda dt: nn.Linear(40, 24, dtype=dt), (40,)),
    ("conv2d", lambda dt: nn.Conv2d(8, 12, 3, padding=1, dtype=dt), (2, 8, 3, 3)),
    ("conv2d strided dilated grouped",
     lambda dt: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=2, dtype=dt), (2, 8, 5, 5)),
    ("conv1d", lambda dt: nn.Conv1d(6, 10, 3, padding=1, dtype=dt), (2, 6, 4)),
]


def composite_layer(layer, x, v, g, bias):
    """The layer's op on w = g * v / ||v|| (dim 0) composed from torch ops."""
    w = torch._weight_norm(v, g, 0)
    if isinstance(layer, nn.Linear):
        return torch.nn.functional.linear(x, w, bias)
    conv = torch.nn.functional.conv1d if isinstance(layer, nn.Conv1d) else torch.nn.functional.conv2d
    return conv(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


SCALED_NEEDS = [(layer, need) for layer in SCALED_LAYERS for need in ("all", "x", "v", "g", "v g", "bias")
                if need != "bias" or "no bias" not in layer[0]]


@pytest.mark.parametrize("layer_case,need", SCALED_NEEDS, ids=[f"{c[0]}-{n}" for c, n in SCALED_NEEDS])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scaled_output_layers_against_float64(layer_case, need, dtype, scaled_everywhere):
    """The scaled-output path (no w materialized), for every subset of needed gradients."""
    name, make, x_shape = layer_case
    layer = fastnorm.weight_norm(make(torch.float64))
    p = layer.parametrizations.weight
    with torch.no_grad():  # g away from ||v|| so that the scale matters
        p.original0.mul_(torch.rand_like(p.original0) + 0.5)
    if dtype != torch.float64:
        layer.to(dtype)
    x = torch.randn(x_shape, dtype=torch.float64).to(dtype)
    tensors = {"x": x, "v": p.original1, "g": p.original0, "bias": layer.bias}
    wanted = list(tensors) if need == "all" else need.split()
    for key, t in tensors.items():
        if t is not None:
            t.requires_grad_(key in wanted)
    wanted = [k for k in wanted if tensors[k] is not None]
    y, names = ops_run(lambda: layer(x))
    assert "fastnorm::weight_norm_norms" in names and "fastnorm::weight_norm" not in names
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [tensors[k] for k in wanted], gy)

    def results(up):
        ts = {k: (t.detach().to(up).requires_grad_() if t is not None else None) for k, t in tensors.items()}
        out = composite_layer(layer, ts["x"], ts["v"], ts["g"], ts["bias"])
        return out, torch.autograd.grad(out, [ts[k] for k in wanted], gy.to(up))

    ref_y, ref_grads = results(torch.float64)
    torch_y, torch_grads = results(dtype)
    assert_close_to_reference(y, ref_y, dtype, torch_y, what="output", per_tensor=True)
    for k, ours, ref, theirs in zip(wanted, grads, ref_grads, torch_grads):
        assert ours.dtype == tensors[k].dtype, k
        assert_close_to_reference(ours, ref, dtype, theirs, what=f"grad {k}", per_tensor=True)


@pytest.mark.parametrize("name,make,x_shape", SCALED_LAYERS, ids=[c[0] for c in SCALED_LAYERS])
def test_scaled_output_layers_gradcheck(name, make, x_shape, scaled_everywhere):
    layer = fastnorm.weight_norm(make(torch.float64))
    p = layer.parametrizations.weight
    params = [p.original1, p.original0] + ([layer.bias] if layer.bias is not None else [])
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)

    def fn(x, v, g, *bias):
        return torch.func.functional_call(layer, {"parametrizations.weight.original1": v,
                                                  "parametrizations.weight.original0": g,
                                                  **({"bias": bias[0]} if bias else {})}, (x,))

    inputs = (x, *(t.detach().clone().requires_grad_() for t in params))
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_checkpoints_move_both_ways_and_legacy_keys_load():
    torch_wn = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    ours = fastnorm.weight_norm(nn.Conv2d(3, 4, 3))
    ours.load_state_dict(torch_wn.state_dict())
    back = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3))
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours(x), torch_wn(x))
    torch.testing.assert_close(back(x), torch_wn(x))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3))  # the deprecated hook: weight_g / weight_v
    assert {"weight_g", "weight_v"} <= set(old.state_dict())
    legacy = fastnorm.weight_norm(nn.Conv2d(3, 4, 3))
    legacy.load_state_dict(old.state_dict())
    torch.testing.assert_close(legacy(x), old(x))


def test_copy_pickle_save_and_remove():
    m = fastnorm.weight_norm(nn.Linear(7, 5), eps=1e-4)
    x = torch.randn(3, 7)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        torch.testing.assert_close(clone(x), m(x))
        assert clone.parametrizations.weight[0].eps == 1e-4
        assert list(clone.state_dict()) == list(m.state_dict())
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), m(x))
    y, w = m(x), m.weight
    kept = copy.deepcopy(m)  # shares parametrize's class with m: removing on m must not touch it
    fastnorm.remove_weight_norm(m)
    torch.testing.assert_close(kept(x), y)
    torch.testing.assert_close(kept.weight, w)
    assert type(m) is nn.Linear and isinstance(m.weight, nn.Parameter)
    torch.testing.assert_close(m(x), y)
    with pytest.raises(ValueError, match="has no fastnorm weight norm"):
        fastnorm.remove_weight_norm(m)
    with pytest.raises(ValueError, match="has no tensor named 'kernel'"):
        fastnorm.weight_norm(nn.Linear(2, 2), name="kernel")


def _reference_grads(v, g, grad_w, dim=0):
    vr, gr = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    torch._weight_norm(vr, gr, dim).backward(grad_w.double())
    return vr.grad.to(v.dtype), gr.grad.to(g.dtype)


@pytest.mark.parametrize("make,x_shape", [
    (lambda: nn.Linear(16, 8), (4, 16)),  # grad_w arrives as a view (the transpose of a GEMM's output)
    (lambda: nn.Conv2d(3, 8, 3), (2, 3, 8, 8)),
])
def test_backward_writes_grad_v_over_an_unshared_grad_w(make, x_shape):
    """The engine's own gradient, held by nothing else, takes grad_v in place; the
    gradients stay those of torch's parametrization (in float64)."""
    base = make()
    m = fastnorm.weight_norm(copy.deepcopy(base))
    ref = torch.nn.utils.parametrizations.weight_norm(copy.deepcopy(base).double())
    x = torch.randn(x_shape)
    grad_y = torch.randn_like(base(x))
    y = m(x)
    _, ran = ops_run(lambda: y.backward(grad_y))
    assert "fastnorm::weight_norm_backward_" in ran
    ref(x.double()).backward(grad_y.double())
    p, q = m.parametrizations.weight, ref.parametrizations.weight
    torch.testing.assert_close(p.original1.grad, q.original1.grad.float())
    torch.testing.assert_close(p.original0.grad, q.original0.grad.float())


def test_backward_leaves_a_shared_grad_w_alone():
    """A gradient anyone else can see (the caller's, a retained .grad, a hook's, a post
    hook's view of the node's inputs) is not overwritten."""
    v, g = torch.randn(6, 5, requires_grad=True), (torch.rand(6, 1) + 0.5).requires_grad_()
    grad_w = torch.randn(6, 5)
    kept = grad_w.clone()
    _, ran = ops_run(lambda: fastnorm.functional.weight_norm(v, g).backward(grad_w))
    torch.testing.assert_close(grad_w, kept, rtol=0, atol=0)
    assert "fastnorm::weight_norm_backward_" not in ran
    ref_v, ref_g = _reference_grads(v, g, grad_w)
    torch.testing.assert_close(v.grad, ref_v)
    torch.testing.assert_close(g.grad, ref_g)

    w = fastnorm.functional.weight_norm(v, g)
    w.retain_grad()
    (w * 3).sum().backward()
    torch.testing.assert_close(w.grad, torch.full_like(w, 3.0), rtol=0, atol=0)

    seen = []
    w = fastnorm.functional.weight_norm(v, g)
    w.register_hook(lambda grad: seen.append(grad))
    (w * 3).sum().backward()
    torch.testing.assert_close(seen[0], torch.full_like(w, 3.0), rtol=0, atol=0)

    seen = []
    w = fastnorm.functional.weight_norm(v, g)
    w.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_outputs[0]))
    (w * 3).sum().backward()
    torch.testing.assert_close(seen[0], torch.full_like(w, 3.0), rtol=0, atol=0)


def test_batched_gradients_through_the_node():
    """vmap-batched incoming gradients (jacobian(vectorize=True), is_grads_batched) take
    the out-of-place backward and match torch's."""
    v = torch.randn(4, 3, dtype=torch.float64)
    g = torch.rand(4, 1, dtype=torch.float64) + 0.5
    ours = torch.autograd.functional.jacobian(lambda v, g: fastnorm.functional.weight_norm(v, g) * 2, (v, g),
                                              vectorize=True)
    ref = torch.autograd.functional.jacobian(lambda v, g: torch._weight_norm(v, g, 0) * 2, (v, g), vectorize=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_weight_getter_direct_and_generic_paths(monkeypatch):
    """module.weight calls the weight norm directly, and falls back to parametrize's generic
    getter wherever that does more: parametrize.cached(), a stacked parametrization, hooks on
    the parametrization module or global module hooks. Setting the weight still works."""
    from torch.nn.utils import parametrize

    m = fastnorm.weight_norm(nn.Linear(7, 5))
    p = m.parametrizations.weight

    def expected():
        return torch._weight_norm(p.original1.detach().double(), p.original0.detach().double(), 0).float()

    generic_forward = parametrize.ParametrizationList.forward
    with monkeypatch.context() as patch:  # the direct path does not go through the ParametrizationList
        patch.setattr(parametrize.ParametrizationList, "forward", lambda *args: pytest.fail("generic path taken"))
        torch.testing.assert_close(m.weight, expected())
    assert parametrize.ParametrizationList.forward is generic_forward

    with parametrize.cached():
        first = m.weight
        assert m.weight is first
    torch.testing.assert_close(first, expected())

    seen = []
    handle = p[0].register_forward_hook(lambda mod, args, out: seen.append("module"))
    torch.testing.assert_close(m.weight, expected())
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(type(mod)))
    torch.testing.assert_close(m.weight, expected())
    handle.remove()
    assert seen[0] == "module" and type(p[0]) in seen[1:]

    new = torch.randn(5, 7)
    m.weight = new  # right_inverse: g and v from the new weight
    torch.testing.assert_close(m.weight, new)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(m, "weight", Double())
    torch.testing.assert_close(m.weight, 2 * expected())


def test_recurrent_layer_trained_over_sequences():
    torch.manual_seed(0)
    ours = nn.LSTM(6, 8, num_layers=1, batch_first=True)
    theirs = copy.deepcopy(ours)
    fastnorm.weight_norm(ours, name="weight_hh_l0")
    torch.nn.utils.parametrizations.weight_norm(theirs, name="weight_hh_l0")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    for step in range(5):
        x = torch.randn(4, 10, 6)
        losses = []
        for m, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            out, _ = m(x)
            loss = out.square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("scaled", [False, True], ids=["materialized", "scaled output"])
def test_compile_fullgraph_matches_eager(scaled, request):
    if scaled:
        request.getfixturevalue("scaled_everywhere")
    torch._dynamo.reset()
    torch.manual_seed(0)
    size = 3 if scaled else 6  # a 1x1 conv output: both layers scale (with scaled_everywhere)

    def make():
        return nn.Sequential(fastnorm.weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Flatten(),
                             fastnorm.weight_norm(nn.Linear(8 * (size - 2) ** 2, 10)))

    eager = make()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, size, size)
    ye, names = ops_run(lambda: eager(x))
    assert ("fastnorm::weight_norm" in names) != scaled
    yc = compiled(x)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
    ye.square().sum().backward()
    yc.square().sum().backward()
    for (k, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_wraps_a_weight_normed_model(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(fastnorm.weight_norm(nn.Linear(5, 3)))
        model(torch.randn(4, 5)).sum().backward()
        assert model.module.parametrizations.weight.original1.grad is not None
    finally:
        dist.destroy_process_group()


def test_data_dependent_init_layer_by_layer():
    torch.manual_seed(0)
    model = nn.Sequential(fastnorm.weight_norm(nn.Conv2d(3, 6, 3)), nn.ReLU(), nn.Flatten(),
                          fastnorm.weight_norm(nn.Linear(6 * 4 * 4, 5)))
    x = torch.randn(64, 3, 6, 6) * 3 + 2
    fastnorm.data_dependent_init(model, x, init_scale=0.5)
    h = model[0](x)
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(h.std(dim=(0, 2, 3), unbiased=False), torch.full((6,), 0.5), atol=1e-4, rtol=0)
    y = model(x)  # the second layer was initialized on the first's initialized output
    torch.testing.assert_close(y.mean(dim=0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=0, unbiased=False), torch.full((5,), 0.5), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no weight-normed"):
        fastnorm.data_dependent_init(nn.Linear(2, 2), torch.randn(3, 2))


# ---------------------------------------------------------------------------------------
# Mean-only batch norm

@pytest.mark.parametrize("cls,shape", [(fastnorm.MeanOnlyBatchNorm1d, (8, 5)), (fastnorm.MeanOnlyBatchNorm1d, (4, 5, 7)),
                                       (fastnorm.MeanOnlyBatchNorm2d, (4, 5, 3, 3)),
                                       (fastnorm.MeanOnlyBatchNorm3d, (2, 5, 2, 3, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_mean_only_batch_norm(cls, shape, momentum):
    bn = cls(5, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.bias.copy_(torch.linspace(-1, 1, 5))
    dims = [0] + list(range(2, len(shape)))
    view = [1, -1] + [1] * (len(shape) - 2)
    means = []
    for step in range(3):
        x = (torch.randn(shape, dtype=torch.float64) * 2 + step).requires_grad_()
        y = bn(x)
        mean = x.detach().mean(dim=dims)
        means.append(mean)
        torch.testing.assert_close(y, x.detach() - mean.view(view) + bn.bias.detach().view(view))
        g = torch.randn_like(y)
        y.backward(g)
        torch.testing.assert_close(x.grad, g - g.mean(dim=dims, keepdim=True))
        torch.testing.assert_close(bn.bias.grad, g.sum(dim=dims))
        bn.bias.grad = None
    expected = torch.zeros(5, dtype=torch.float64)
    for i, m in enumerate(means):
        f = 1.0 / (i + 1) if momentum is None else momentum
        expected = expected + f * (m - expected)
    torch.testing.assert_close(bn.running_mean, expected)
    assert bn.num_batches_tracked.item() == 3
    bn.eval()
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(bn(x), x.detach() - bn.running_mean.view(view) + bn.bias.detach().view(view))
    assert torch.autograd.gradcheck(lambda t: bn(t), (x,))
    with pytest.raises(ValueError, match="channels"):
        bn(torch.randn(*shape[:1], 4, *shape[2:], dtype=torch.float64))


@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("make,x_shape", [(lambda: nn.Linear(8, 6), (3, 8)), (lambda: nn.Conv2d(3, 4, 3), (2, 3, 6, 6))],
                         ids=["linear", "conv"])
def test_compiled_autograd_matches_eager(make, x_shape, dim):
    """The backward through compiled autograd (the weight-norm node traced into the graph)
    gives eager's gradients."""
    eager = fastnorm.weight_norm(make(), dim=dim)
    assert_compiled_autograd_matches_eager(eager, copy.deepcopy(eager), torch.randn(x_shape))
