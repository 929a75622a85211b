"""Batch norm against torch: values, gradients and running statistics over the matrix of
shapes x layouts x dtypes, and the modules' torch semantics."""
import copy
import io
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastnorm
from conftest import (DEVICES, FLOAT_DTYPES, LOW_PRECISION, assert_close_to_reference, max_err,
                      param_dtype_for, with_layout)

# Awkward sizes: N=2, one channel, primes, 1023/1025, (N, C) with many rows, channels that
# are not a multiple of the vector width, big spatial sizes (several blocks per channel),
# and many channels.
SHAPES = [
    (2, 3),
    (1025, 7),
    (64, 1),
    (3, 13, 17),
    (2, 4, 1023),
    (4, 5, 1025),
    (2, 3, 5, 7),
    (3, 16, 8, 8),
    (2, 2, 96, 97),
    (2, 2051, 2, 3),
    (2, 3, 4, 5, 6),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, dtype, layout, device, mean=0.5, std=2.0):
    base = (torch.randn(shape, device=device, dtype=torch.float64) * std + mean).to(dtype)
    return with_layout(base, layout)


def make_params(C, dtype, device):
    pd = param_dtype_for(dtype)
    w = torch.randn(C, device=device, dtype=torch.float64).to(pd)
    b = torch.randn(C, device=device, dtype=torch.float64).to(pd)
    rm = torch.randn(C, device=device, dtype=torch.float64).to(pd)
    rv = (torch.rand(C, device=device, dtype=torch.float64) + 0.5).to(pd)
    return w, b, rm, rv


def run_functional(fn, x, w, b, rm, rv, g, training, momentum=0.1, eps=1e-5, upcast=False, residual=None, **kw):
    """Runs fn (fastnorm's or torch's batch_norm) forward and backward on copies of the
    inputs; returns output, grads (x, w, b) and the running statistics after the call, then
    the residual's grad when a residual is given."""
    conv = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach().clone())
    xr, wr, br = (conv(t).requires_grad_() for t in (x, w, b))
    rm_, rv_ = conv(rm), conv(rv)
    if residual is not None:
        kw["residual"] = residual = conv(residual).requires_grad_()
    out = fn(xr, rm_, rv_, wr, br, training, momentum, eps, **kw)
    out.backward(g.double() if upcast else g)
    return (out, xr.grad, wr.grad, br.grad, rm_, rv_) + ((residual.grad,) if residual is not None else ())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch(device, layout, shape, dtype, training):
    check_matches_torch(device, layout, shape, dtype, training)


def check_matches_torch(device, layout, shape, dtype, training):
    """Output, gradients and running statistics against torch in float64, within the
    tolerance table (and torch's own error in the same dtype)."""
    x = make_input(shape, dtype, layout, device)
    w, b, rm, rv = make_params(shape[1], dtype, device)
    g = torch.randn_like(x)
    ours = run_functional(fastnorm.functional.batch_norm, x, w, b, rm, rv, g, training)
    ref = run_functional(F.batch_norm, x, w, b, rm, rv, g, training, upcast=True)
    theirs = run_functional(F.batch_norm, x, w, b, rm, rv, g, training)
    names = ["output", "grad input", "grad weight", "grad bias", "running_mean", "running_var"]
    for name, o, r, t in zip(names, ours, ref, theirs):
        if name.startswith("running") and dtype in LOW_PRECISION:
            # float32 statistics of inputs that are exact in float64
            assert_close_to_reference(o, r, torch.float32, what=name)
        else:
            assert_close_to_reference(o, r, dtype, t, what=name)
    out = ours[0]
    assert out.dtype == dtype and ours[2].dtype == w.dtype
    if layout != "strided":
        assert out.stride() == x.stride(), "the output keeps the input's layout"
        assert ours[1].stride() == x.stride()


EPILOGUES = [("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("silu", 0.01), ("relu6", 0.01),
             ("hardswish", 0.01), ("gelu", 0.01), ("gelu_tanh", 0.01), ("elu", 0.01)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 16, 8, 8), (2, 3, 4, 5, 6), (5, 7, 11)], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("activation,slope", EPILOGUES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_epilogue_matches_torch_composition(device, layout, shape, dtype, activation, slope, training):
    check_epilogue_matches_torch(device, layout, shape, dtype, activation, slope, training)


def check_epilogue_matches_torch(device, layout, shape, dtype, activation, slope, training):
    """act(batch_norm(x) + residual) against torch's batch_norm, add and activation: output
    and the gradients of input, weight, bias and residual, in every layout and dtype."""
    x = make_input(shape, dtype, layout, device)
    r = make_input(shape, dtype, layout, device, mean=-0.5, std=1.0)
    w, b, rm, rv = make_params(shape[1], dtype, device)
    g = torch.randn_like(x)

    def run(fn, upcast):
        out, gx, gw, gb, _, _, gr = run_functional(fn, x, w, b, rm, rv, g, training, upcast=upcast, residual=r,
                                                   activation=activation, negative_slope=slope)
        return out, gx, gw, gb, gr

    ours = run(fastnorm.functional.batch_norm, False)
    ref = run(fastnorm.reference.batch_norm, True)
    theirs = run(fastnorm.reference.batch_norm, False)
    for name, o, rf, t in zip(["output", "grad input", "grad weight", "grad bias", "grad residual"], ours, ref, theirs):
        assert_close_to_reference(o, rf, dtype, t, what=name, per_tensor=name in ("grad weight", "grad bias"))
    if layout != "strided":
        assert ours[0].stride() == x.stride() and ours[4].stride() == x.stride()


def test_running_stats_dtype_and_untouched_in_eval():
    x = torch.randn(8, 4, 3)
    w, b, rm, rv = make_params(4, torch.float32, "cpu")
    rm0, rv0 = rm.clone(), rv.clone()
    fastnorm.functional.batch_norm(x, rm, rv, w, b, training=False)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    # Training without running statistics: batch statistics, nothing to update.
    out = fastnorm.functional.batch_norm(x, None, None, w, b, training=True)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, w, b, True))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_mean_is_stable(dtype, layout):
    # Naive E[x^2] - E[x]^2 loses every digit here; two-pass/Welford keeps them. The
    # reference is computed in extended precision: torch's float64 is not exact enough.
    x = with_layout((torch.randn(16, 8, 32, 32, dtype=torch.float64) * 0.1 + 1e4).to(dtype), layout)
    xl = x.double().numpy().astype(np.longdouble)
    mean = xl.mean(axis=(0, 2, 3), keepdims=True)
    var = ((xl - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    ref = (xl - mean) / np.sqrt(var + np.longdouble(1e-5))

    def err(y):
        return float(np.abs(y.double().numpy() - ref).max())

    ours = fastnorm.functional.batch_norm(x, None, None, training=True)
    theirs = F.batch_norm(x, None, None, training=True)
    assert err(ours) <= 2 * err(theirs) + 1e-12
    _, ours_var = torch.ops.fastnorm.batch_norm_stats(x)
    rel = np.abs(ours_var.double().numpy() - var.ravel()) / var.ravel()
    assert float(rel.max()) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_rounding_is_torchs_to_the_bit(layout):
    # Eval with mean 0, variance 1, eps 0: y = x * weight + 0, exact in float32 (8-bit x
    # times 13-bit weights), then rounded to bfloat16 once. The CPU kernels may round with an
    # instruction that flushes subnormals to zero; the bits must still be torch's: ties,
    # subnormal inputs and results, overflow to inf, signed zeros (NaN: where, not which).
    C = 4
    weight = torch.tensor([1 + 2**-8, 0.75, 1 + 3 * 2**-12, 2 - 2**-12])
    x = torch.randn(3, C, 5, 67) * 4
    special = torch.tensor([2.0**-126, 2.0**-130, -(2.0**-133), 1e-39, 3.3e38, -3.3e38, 0.0, -0.0,
                            float("inf"), float("-inf"), float("nan")])
    x[0, :, 0, :special.numel()] = special
    x[1, :, 2, 40] = 2.0**-127  # one subnormal in an otherwise normal vector
    x = with_layout(x.to(torch.bfloat16), layout)
    zeros, ones = torch.zeros(C), torch.ones(C)
    ours = fastnorm.functional.batch_norm(x, zeros, ones, weight, zeros, training=False, eps=0.0)
    ref = F.batch_norm(x, zeros, ones, weight, zeros, training=False, eps=0.0)
    torch.testing.assert_close(ref, (x.float() * weight.view(1, C, 1, 1)).to(torch.bfloat16), rtol=0, atol=0,
                               equal_nan=True)  # one rounding of the exact product
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])
    assert (ref[~nan] != 0).any() and (ref.abs() < 2.0**-126).logical_and(ref != 0).any()  # subnormals present


@pytest.mark.parametrize("layout", LAYOUTS)
def test_result_does_not_depend_on_thread_count(layout):
    x = make_input((4, 6, 40, 41), torch.float32, layout, "cpu")
    w, b, rm, rv = make_params(6, torch.float32, "cpu")
    g = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            results.append(run_functional(fastnorm.functional.batch_norm, x, w, b, rm, rv, g, True))
        finally:
            torch.set_num_threads(threads)
    for a, b_ in zip(*results):
        assert torch.equal(a, b_)


def test_stats_op_matches_torch():
    x = make_input((5, 7, 9, 11), torch.float32, "channels_last", "cpu")
    mean, var = torch.ops.fastnorm.batch_norm_stats(x)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), x64.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    assert mean.dtype == torch.float32


def test_empty_batch_leaves_running_stats():
    bn = fastnorm.BatchNorm1d(3)
    ref = torch.nn.BatchNorm1d(3)
    x = torch.randn(0, 3, 4, requires_grad=True)
    out = bn(x)
    ref(x)
    assert out.shape == x.shape
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    out.sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------------------
# Modules

MODULES = [
    (fastnorm.BatchNorm1d, torch.nn.BatchNorm1d, (6, 5)),
    (fastnorm.BatchNorm1d, torch.nn.BatchNorm1d, (6, 5, 7)),
    (fastnorm.BatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 6, 7)),
    (fastnorm.BatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 4, 5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ours_cls,torch_cls,shape", MODULES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_module_training_steps_match_torch(device, ours_cls, torch_cls, shape, momentum, affine, track):
    check_module_steps_match_torch(device, ours_cls, torch_cls, shape, momentum, affine, track)


def check_module_steps_match_torch(device, ours_cls, torch_cls, shape, momentum, affine, track):
    """Three training steps and an evaluation in float64: outputs, gradients and every
    buffer (running statistics, num_batches_tracked) equal to torch's module."""
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, device=device, dtype=torch.float64)
    ours, ref = ours_cls(shape[1], **kw), torch_cls(shape[1], **kw)
    if affine:
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
                m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64, device=device) * (step + 1) + step
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        g = torch.randn_like(yo)
        yo.backward(g)
        yr.backward(g)
        torch.testing.assert_close(yo, yr)
        torch.testing.assert_close(xo.grad, xr.grad)
        if affine:
            torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
            torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ours.eval()
    ref.eval()
    x = torch.randn(shape, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours(x), ref(x))


def test_module_is_a_drop_in():
    ours, ref = fastnorm.BatchNorm2d(8), torch.nn.BatchNorm2d(8)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert repr(ours) == repr(ref)
    assert "activation='relu'" in repr(fastnorm.BatchNorm2d(8, activation="relu"))
    with pytest.raises(ValueError, match="activation"):
        fastnorm.BatchNorm2d(8, activation="tanh")


def test_checkpoints_load_both_ways():
    ref = torch.nn.BatchNorm2d(4)
    ref.train()
    for _ in range(2):
        ref(torch.randn(3, 4, 5, 5))
    ours = fastnorm.BatchNorm2d(4)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 5, 5)
    for m in (ref, ours, back):
        m.eval()
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(back(x), ref(x))
    # A checkpoint from before num_batches_tracked existed (state_dict version 1) still loads.
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    old = fastnorm.BatchNorm2d(4)
    old.load_state_dict(sd)
    assert old.num_batches_tracked.item() == 0


def test_module_copies_and_pickles():
    bn = fastnorm.BatchNorm2d(3, activation="leaky_relu", negative_slope=0.2)
    bn(torch.randn(2, 3, 4, 4))
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert type(clone) is fastnorm.BatchNorm2d and clone.negative_slope == 0.2
        assert torch.equal(clone.running_mean, bn.running_mean)
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 4, 4)
    bn.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(x), bn(x))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_module_low_precision_input_float_params(dtype):
    ours, ref = fastnorm.BatchNorm2d(5), torch.nn.BatchNorm2d(5)
    x = torch.randn(4, 5, 6, 6).to(dtype).to(memory_format=torch.channels_last)
    yo, yr = ours(x), ref(x)
    y64 = torch.nn.BatchNorm2d(5, dtype=torch.float64)(x.double())
    assert yo.dtype == dtype and ours.running_mean.dtype == torch.float32
    assert yo.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(yo, y64, dtype, yr, what="output")
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_parameters(dtype):
    """Parameters and running statistics may also be in the input's dtype."""
    ours = fastnorm.BatchNorm2d(5, dtype=dtype)
    ref = torch.nn.BatchNorm2d(5, dtype=dtype)
    x = torch.randn(4, 5, 6, 6).to(dtype)
    y64 = F.batch_norm(x.double(), None, None, training=True)
    assert_close_to_reference(ours(x), y64, dtype, ref(x), what="output")
    assert ours.running_mean.dtype == dtype
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


# ---------------------------------------------------------------------------------------
# Parity cases found by PyTorch's ModuleInfo/OpInfo samples (tests/test_torch_db.py runs
# them all); here each on its own, on every device.

def torch_accepts(kwarg):
    import inspect

    return kwarg in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters


@pytest.mark.skipif(not torch_accepts("bias"), reason="this torch's BatchNorm takes no bias argument")
@pytest.mark.parametrize("device", DEVICES)
def test_bias_false(device):
    """torch's modules take bias=False (newer torch): no bias parameter, same keys, same output."""
    ref = torch.nn.BatchNorm2d(3, bias=False, device=device)
    ours = fastnorm.BatchNorm2d(3, bias=False, device=device, activation="relu")
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5, device=device, dtype=torch.float64).float()
    torch.testing.assert_close(ours(x), F.relu(ref(x)))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def torch_checks_eps():
    try:
        F.batch_norm(torch.ones(2, 1), None, None, training=True, eps=0.0)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("training,eps", [(True, 0.0), (True, -1e-5), (False, -1e-5)])
def test_eps_out_of_range_raises_and_leaves_buffers(training, eps):
    """As torch.nn.functional.batch_norm: eps must be positive in training, non-negative in
    evaluation; a ValueError, the running statistics untouched."""
    x = torch.randn(4, 3, 2)
    # (torch 2.4 does not check eps; fastnorm does on every torch)
    fns = (F.batch_norm,) if torch_checks_eps() else ()
    for fn in fns + (fastnorm.functional.batch_norm,):
        rm, rv = torch.zeros(3), torch.ones(3)
        with pytest.raises(ValueError, match="eps"):
            fn(x, rm, rv, None, None, training, 0.1, eps)
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    m = fastnorm.BatchNorm1d(3, eps=eps)
    m.train(training)
    with pytest.raises(ValueError, match="eps"):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(3)) and int(m.num_batches_tracked) == 0
    # eps = 0 in evaluation is allowed, as torch's
    out = fastnorm.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=0.0)
    torch.testing.assert_close(out, F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=0.0))


@pytest.mark.parametrize("training", [True, False])
def test_one_dimensional_input_as_torch(training):
    """A 1-D input has no channel dimension: torch answers an empty one with an empty result
    and refuses the others; so does fastnorm."""
    empty = torch.empty(0)
    ours = fastnorm.functional.batch_norm(empty, torch.zeros(0), torch.ones(0), None, None, training)
    ref = F.batch_norm(empty, torch.zeros(0), torch.ones(0), None, None, training)
    assert ours.shape == ref.shape == (0,)
    x = torch.randn(5)
    with pytest.raises(Exception) as ref_err:
        F.batch_norm(x, torch.zeros(5), torch.ones(5), None, None, training)
    with pytest.raises(type(ref_err.value)):
        fastnorm.functional.batch_norm(x, torch.zeros(5), torch.ones(5), None, None, training)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu", "silu", "relu6", "hardswish", "gelu", "gelu_tanh",
                                        "elu"])
def test_non_finite_input_gradient_in_evaluation(device, layout, dtype, activation):
    """In evaluation the input gradient is dy * act' * weight / sqrt(var + eps): a NaN or inf
    in the input reaches it only through the activation, exactly where it does in torch's."""
    x = with_layout(torch.randn(4, 3, 4, 5, device=device, dtype=torch.float64), layout).to(dtype)
    x[0, 0, 0, 0], x[1, 2, 1, 1], x[2, 0, 3, 4] = float("nan"), float("inf"), float("-inf")
    w, b, rm, rv = make_params(3, dtype, device)
    g = torch.randn(x.shape, device=device, dtype=dtype)

    def composed(x, rm, rv, w, b, training, momentum, eps):
        y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
        return fastnorm.reference.activate(y, activation)

    ours = run_functional(fastnorm.functional.batch_norm, x, w, b, rm, rv, g, False, activation=activation)
    ref = run_functional(composed, x, w, b, rm, rv, g, False, upcast=True)
    for i, (o, r) in enumerate(zip(ours[:2], ref[:2])):  # output and input gradient
        if i == 1 and activation in NAN_GRADIENT_BY_PATH:
            keep = ~x.isnan()
            o, r = o[keep], r[keep]
        assert torch.equal(o.isnan(), r.isnan()) and torch.equal(o.isinf(), r.isinf())
        finite = torch.isfinite(r)
        assert_close_to_reference(o[finite], r[finite], dtype)
    assert torch.isfinite(ours[1]).any()


# torch's own gradient of these at a NaN input depends on where the element falls: its
# vectorized loop body gives 0 (relu6, hardswish) or dy * exp(NaN) (elu), its scalar tail dy.
NAN_GRADIENT_BY_PATH = ("relu6", "hardswish", "elu")
