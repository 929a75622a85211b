"""Differential fuzzing against torch with hypothesis: batch norm (functional and modules) and
weight norm over random shapes, layouts, dtypes and arguments, compared with torch in float64
(values, gradients, running buffers) within the tolerance table of fastnorm/reference.py.

CI runs a bounded, derandomized number of examples per property (CI_EXAMPLES below, about a
minute for the file on two cores). On demand, e.g. before a release::

    FASTNORM_FUZZ_EXAMPLES=10000 python -m pytest tests/test_fuzz.py -q

runs that many examples per property, randomized (``--hypothesis-seed=N`` repeats a run;
a failure prints its example and a ``@reproduce_failure`` blob). Add
``--hypothesis-show-statistics`` for hypothesis's own counts; the file prints the number of
examples each property passed at the end of the module either way.

A failing case prints as a namedtuple (BNCase, ModuleCase, WNCase) that replays outside
hypothesis: ``check_bn_functional(case, well_conditioned_examples_only)``. Differences from
torch that fuzzing found are kept at the end as explicit regression tests, and the
properties keep asserting torch's behaviour.
"""
import collections
import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastnorm
from conftest import DEVICES, FLOAT_DTYPES, LOW_PRECISION, assert_close_to_reference, param_dtype_for
from fastnorm import reference
from fastnorm.reference import TOLERANCES

# ---------------------------------------------------------------------------------------
# Settings: a bounded, reproducible run in CI; any number of examples on demand.

CI_EXAMPLES = {"bn_functional": 500, "bn_module": 200, "bn_special_values": 150, "weight_norm": 800}
_ON_DEMAND = os.environ.get("FASTNORM_FUZZ_EXAMPLES", "").strip()


def fuzz_settings(name):
    examples = int(_ON_DEMAND) if _ON_DEMAND else CI_EXAMPLES[name]
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=not _ON_DEMAND,  # CI: the same examples on every run
        database=None,  # nothing written into the checkout
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


EXAMPLES_RUN = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_example_counts(request):
    started = time.perf_counter()
    yield
    if not EXAMPLES_RUN:
        return
    line = (f"test_fuzz: {'on-demand' if _ON_DEMAND else 'CI'} profile, examples passed per property: "
            + ", ".join(f"{k}={v}" for k, v in sorted(EXAMPLES_RUN.items()))
            + f" (total {sum(EXAMPLES_RUN.values())}) in {time.perf_counter() - started:.1f}s")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n" + line)
    else:  # pragma: no cover
        print(line)


# ---------------------------------------------------------------------------------------
# Strategies: shapes, layouts, values.

SIZES = (1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17, 31, 32, 33, 64, 67, 127)
MAX_NUMEL = 2048


@st.composite
def shapes(draw, ndim, max_numel=MAX_NUMEL, empty_dims=()):
    """ndim sizes from SIZES (1, primes, powers of two and their neighbours), at most
    max_numel elements; rarely a 0 in one of empty_dims."""
    shape = []
    budget = max_numel
    for d in range(ndim):
        s = draw(st.sampled_from([s for s in SIZES if s <= budget]))
        shape.append(s)
        budget //= s
    if empty_dims and draw(st.integers(0, 24)) == 24:
        shape[draw(st.sampled_from(empty_dims))] = 0
    return tuple(shape)


Layout = collections.namedtuple("Layout", "kind perm steps pads expand")

CONTIGUOUS = "contiguous"
LAYOUT_KINDS = (CONTIGUOUS, "channels_last", "transposed", "permuted", "strided", "sliced", "expanded", "mixed")


def contiguous_layout(ndim):
    return Layout(CONTIGUOUS, tuple(range(ndim)), (1,) * ndim, (0,) * ndim, None)


@st.composite
def layouts(draw, ndim, kinds=LAYOUT_KINDS):
    """How a tensor sits in memory. perm: the storage order of the dims, outermost first;
    steps: every steps[d]-th element of a larger buffer along d (not dense); pads: the view
    starts pads[d] into the buffer along d (a slice of a bigger tensor); expand: a dim
    broadcast with stride 0."""
    kind = draw(st.sampled_from(kinds))
    ident = tuple(range(ndim))
    perm, steps, pads, expand = ident, [1] * ndim, [0] * ndim, None
    if kind == "channels_last" and ndim >= 2:  # channels innermost (3 dims too)
        perm = (0, *range(2, ndim), 1)
    elif kind == "transposed" and ndim >= 2:
        i, j = draw(st.lists(st.integers(0, ndim - 1), min_size=2, max_size=2, unique=True))
        p = list(ident)
        p[i], p[j] = p[j], p[i]
        perm = tuple(p)
    elif kind == "permuted":
        perm = tuple(draw(st.permutations(ident)))
    elif kind == "strided":  # x[..., ::2] and the like
        steps[ndim - 1 - draw(st.integers(0, ndim - 1))] = draw(st.sampled_from((2, 3)))
    elif kind == "sliced":
        pads[ndim - 1 - draw(st.integers(0, ndim - 1))] = draw(st.integers(1, 3))
    elif kind == "expanded":
        expand = draw(st.integers(0, ndim - 1))
    elif kind == "mixed":
        perm = tuple(draw(st.permutations(ident)))
        steps = draw(st.lists(st.sampled_from((1, 2)), min_size=ndim, max_size=ndim))
        pads = draw(st.lists(st.sampled_from((0, 1)), min_size=ndim, max_size=ndim))
    return Layout(kind, perm, tuple(steps), tuple(pads), expand)


def materialize(values, layout, device):
    """values in the given layout on device: a view into a larger buffer whose other elements
    are NaN (a kernel that reads outside the view shows it). An expanded dim takes the
    values' first slice along it."""
    nd = values.dim()
    src = values
    if layout.expand is not None and values.shape[layout.expand] > 1:
        src = values.narrow(layout.expand, 0, 1)
    inner = list(src.shape)
    big = [n * s + 2 * p for n, s, p in zip(inner, layout.steps, layout.pads)]
    storage = torch.full([big[p] for p in layout.perm], math.nan, dtype=values.dtype, device=device)
    view = storage.permute([layout.perm.index(d) for d in range(nd)])
    view = view[tuple(slice(p, p + n * s, s) for n, s, p in zip(inner, layout.steps, layout.pads))]
    view.copy_(src)
    if src is not values:
        view = view.expand(values.shape)
    return view.detach()


def with_expansion(values, layout):
    """The values a tensor in this layout holds: an expanded dim repeats its first slice."""
    if layout is None or layout.expand is None or values.shape[layout.expand] <= 1:
        return values
    return values.narrow(layout.expand, 0, 1).expand(values.shape).clone()


def generator(seed):
    return torch.Generator().manual_seed(seed)


def make_values(shape, kind, scale, shift, gen):
    """float64 values: normal, small integers (many ties, exact sums) or rectified normal
    (many zeros); times scale, plus shift * scale."""
    if kind == "integers":
        v = torch.randint(-3, 4, shape, generator=gen).double()
    else:
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        if kind == "relu":
            v = v.clamp_min(0)
    return v * scale + shift * scale


def _finiteness(t):
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return t.isnan() * 1 + (t == math.inf) * 2 + (t == -math.inf) * 3


def assert_matches(ours, ref64, dtype, theirs=None, what="", per_tensor=False):
    """ours against the float64 reference (assert_close_to_reference), non-finite values
    included: NaN where the reference has NaN, the same infinities, finite elsewhere, or else
    what torch gives in dtype (theirs) where its range decides (overflow to inf, a product
    underflowing to 0 that meets an infinity); finite values within the tolerances."""
    assert tuple(ours.shape) == tuple(ref64.shape), f"{what}: shape {tuple(ours.shape)} vs torch's {tuple(ref64.shape)}"
    ours_c = ours.detach().cpu()
    ref = ref64.detach().cpu().double()
    o = ours_c.double()
    kind_ours, kind_ref = _finiteness(o), _finiteness(ref)
    # (the reference rounded to ours' dtype: beyond its range, inf is the right answer)
    bad = (kind_ours != kind_ref) & (kind_ours != _finiteness(ref.to(ours.dtype).double()))
    t = None
    if theirs is not None:
        t = theirs.detach().cpu()
        bad &= kind_ours != _finiteness(t.double())
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ in finiteness; e.g. at {i}: fastnorm "
                             f"{o[i].item()!r}, torch (float64) {ref[i].item()!r}, torch in {dtype} "
                             f"{None if t is None else t[i].item()!r}")
    keep = torch.isfinite(ref) & torch.isfinite(o)
    if t is not None:
        keep &= torch.isfinite(t.double())
        t = t.masked_fill(~keep, 0)
    o, ref = ours_c.masked_fill(~keep, 0), ref.masked_fill(~keep, 0)
    try:
        assert_close_to_reference(o, ref, dtype, t, what=what, per_tensor=per_tensor)
    except IndexError:  # conftest's message for per_tensor indexes a 0-dim allowance; the check failed
        err = (o.double() - ref).abs()
        i = tuple(int(k) for k in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(f"{what}: off; worst error {err.max().item():.3g} at {i}: fastnorm {o[i].item()!r}, "
                             f"torch (float64) {ref[i].item()!r}, torch in {dtype} "
                             f"{None if t is None else t[i].item()!r}") from None


def outcome(fn):
    """(result, None) or (None, the ValueError/RuntimeError raised)."""
    try:
        return fn(), None
    except (ValueError, RuntimeError) as e:
        return None, e


def assert_same_failure(ours_exc, theirs_exc, what):
    if theirs_exc is None:
        assert ours_exc is None, f"{what}: fastnorm raised {ours_exc!r} where torch succeeds"
        return
    assert ours_exc is not None, f"{what}: torch raises {theirs_exc!r}, fastnorm does not"
    kind = ValueError if isinstance(theirs_exc, ValueError) else RuntimeError
    assert isinstance(ours_exc, kind), f"{what}: fastnorm raised {ours_exc!r} where torch raises {theirs_exc!r}"


# ---------------------------------------------------------------------------------------
# Batch norm, functional

BNCase = collections.namedtuple(
    "BNCase",
    "device shape dtype param_dtype x_layout grad_layout residual_layout param_layout values scale shift "
    "training momentum eps weight bias running activation negative_slope specials seed")

ACTIVATIONS = (None, "relu", "leaky_relu", "silu")
SLOPES = st.sampled_from((0.01, 0.0, 0.2, -0.3, 1.0, -1.0, 2.5)) | st.floats(-3, 3, allow_nan=False)
EPS = st.sampled_from((1e-5, 1e-3, 0.1, 1.0, 1e-8, 4.0)) | st.floats(1e-7, 10.0)
MOMENTA = st.sampled_from((0.1, 0.0, 1.0, -0.5, 0.9, 1.5)) | st.floats(-1.0, 2.0, allow_nan=False)
SCALES = st.sampled_from((1.0, 1e-2, 30.0, 1e-4))
SHIFTS = st.sampled_from((0.0, 0.5, -3.0, 10.0, 100.0))
VALUE_KINDS = st.sampled_from(("normal", "integers", "relu"))
PARAM_LAYOUTS = (CONTIGUOUS, "strided", "sliced")
SPECIALS = (math.nan, math.inf, -math.inf)


def param_dtypes(dtype):
    return st.sampled_from((param_dtype_for(dtype), dtype))


@st.composite
def bn_cases(draw, specials=False):
    ndim = draw(st.integers(2, 5))
    shape = draw(shapes(ndim, empty_dims=[0] + list(range(2, ndim))))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    residual = draw(st.booleans())
    activation = draw(st.sampled_from(ACTIVATIONS))
    return BNCase(
        device=draw(st.sampled_from(DEVICES)),
        shape=shape,
        dtype=dtype,
        param_dtype=draw(param_dtypes(dtype)),
        x_layout=draw(layouts(ndim)),
        grad_layout=draw(layouts(ndim)),
        residual_layout=draw(layouts(ndim)) if residual else None,
        param_layout=draw(layouts(1, PARAM_LAYOUTS)),
        values=draw(VALUE_KINDS),
        scale=draw(SCALES),
        shift=draw(SHIFTS),
        training=draw(st.booleans()),
        momentum=draw(MOMENTA),
        eps=draw(EPS),
        weight=draw(st.booleans()),
        bias=draw(st.booleans()),
        running=draw(st.booleans()),
        activation=activation,
        negative_slope=draw(SLOPES) if activation == "leaky_relu" else 0.01,
        specials=tuple(draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=4))) if specials else (),
        seed=draw(st.integers(0, 2**16)),
    )


def bn_tensors(case):
    """The case's values, float64 on the CPU: x, residual, grad, weight, bias, running mean
    and var (None where the case has none)."""
    gen = generator(case.seed)
    C = case.shape[1]
    x = make_values(case.shape, case.values, case.scale, case.shift, gen)
    if case.specials and x.numel():
        idx = torch.randint(0, x.numel(), (len(case.specials),), generator=gen)
        x.view(-1)[idx] = torch.tensor(case.specials, dtype=torch.float64)
    r = torch.randn(case.shape, generator=gen, dtype=torch.float64) if case.residual_layout else None
    g = torch.randn(case.shape, generator=gen, dtype=torch.float64)
    w = torch.randn(C, generator=gen, dtype=torch.float64) if case.weight else None
    b = torch.randn(C, generator=gen, dtype=torch.float64) if case.bias else None
    rm = rv = None
    if case.running or not case.training:
        rm = (case.shift + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)) * case.scale
        rv = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.25) * case.scale**2
    return x, r, g, w, b, rm, rv


def run_bn_functional(case, mode):
    """mode "ours": fastnorm in the case's dtypes and layouts; "torch": torch likewise;
    "ref": torch on float64 copies (of the values rounded to the case's dtypes) on the CPU.
    Returns the results (None if it raised), the exception, the running buffers before and
    after, and the inputs."""
    x, r, g, w, b, rm, rv = bn_tensors(case)
    dtype, pdtype = case.dtype, case.param_dtype
    if mode == "ref":  # the same values, rounded to the case's dtypes, in float64

        def put(t, layout, dt):
            return None if t is None else with_expansion(t, layout).to(dt).double()
    else:

        def put(t, layout, dt):
            return None if t is None else materialize(t.to(dt), layout, case.device)
    x = put(x, case.x_layout, dtype).requires_grad_()
    r = put(r, case.residual_layout, dtype)
    if r is not None:
        r.requires_grad_()
    g = put(g, case.grad_layout, dtype)
    w, b = (put(t, case.param_layout, pdtype) for t in (w, b))
    for t in (w, b):
        if t is not None:
            t.requires_grad_()
    rm, rv = (put(t, case.param_layout, pdtype) for t in (rm, rv))
    fn = fastnorm.functional.batch_norm if mode == "ours" else reference.batch_norm

    def call():
        out = fn(x, rm, rv, w, b, case.training, case.momentum, case.eps, residual=r,
                 activation=case.activation, negative_slope=case.negative_slope)
        out.backward(g)
        return out

    before = [None if t is None else t.clone() for t in (rm, rv)]
    out, exc = outcome(call)
    results = None
    if exc is None:
        results = {"output": out, "grad input": x.grad, "grad weight": w.grad if w is not None else None,
                   "grad bias": b.grad if b is not None else None,
                   "grad residual": r.grad if r is not None else None,
                   "running_mean": rm, "running_var": rv}
    inputs = {"x": x.detach(), "grad": g, "residual": None if r is None else r.detach(),
              "weight": None if w is None else w.detach(), "bias": None if b is None else b.detach(),
              "running_mean": before[0], "running_var": before[1]}
    return results, exc, (before, [rm, rv]), inputs


def well_conditioned(dtype, use_batch_stats, eps, activation, negative_slope, x, grad, residual=None, weight=None,
                     bias=None, running_mean=None, running_var=None):
    """False where rounding in any kernel may legitimately decide the result, so that no
    kernel could be held to the float64 reference (arguments: the float64 inputs):
    - a channel whose mean is large against its spread (|mean| / sqrt(var + eps) in the
      hundreds in float32; nearly constant with a tiny eps in low precision): x * a + b with
      a = weight / sqrt(var + eps), b = bias - mean * a (torch's vectorized CPU path and
      fastnorm's) loses the digits that (x - mean) * a keeps (torch's scalar path), so
      torch's own error, which depends on the path it takes, is no guide;
    - relu/leaky_relu with a pre-activation within rounding of 0 (x equal to the mean): the
      side of the kink, so the gradient, is a coin toss;
    - silu where its gradient is near 0 (pre-activation near -1.28) on a large scale
      a = weight / sqrt(var + eps): the rounding of the pre-activation, times a * silu'',
      outweighs the tolerance there;
    - training on two values per channel with a mean large against their spread: the input
      gradient is a * (g1 - g2) / 2 * eps / (var + eps), all but eps cancelling, so the
      rounding of the mean decides it."""
    if x.numel() == 0:
        return True
    C = x.shape[1]
    shape = [1, C] + [1] * (x.dim() - 2)
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    if use_batch_stats:
        dims = [0] + list(range(2, x.dim()))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        # a computed mean is off by a rounding of the values' magnitude, not of the mean's
        mean_size = x.abs().amax(dims).nan_to_num(0.0, 0.0, 0.0)
    else:
        mean, var = running_mean, running_var
        mean_size = mean.abs()
    w = weight if weight is not None else torch.ones(C, dtype=torch.float64)
    b = bias if bias is not None else torch.zeros(C, dtype=torch.float64)
    a = (w / (var + eps).sqrt()).view(shape)
    mean, b, mean_size = mean.view(shape), b.view(shape), mean_size.view(shape)
    terms = (x.abs() + mean_size) * a.abs() + b.abs()
    z = (x - mean) * a + b
    if residual is not None:
        terms = terms + residual.abs()
        z = z + residual
    rounding = 8 * acc_eps * terms
    rounding = rounding.masked_fill(~torch.isfinite(rounding), 0.0)  # NaN and inf are judged as such
    if use_batch_stats and x.numel() == 2 * C:
        slope = max(1.0, abs(negative_slope)) if activation == "leaky_relu" else 1.0
        kappa = mean.abs().view(C) / (var + eps).sqrt() + 1
        cancelled = 16 * acc_eps * kappa * a.abs().view(C) * slope
        if (cancelled.nan_to_num(0.0) > TOLERANCES[dtype]["atol"] / 2).any():
            return False
    if dtype in LOW_PRECISION:
        if (rounding > min(TOLERANCES[dtype]["atol"], torch.finfo(dtype).eps)).any():
            return False
    elif (rounding / 4 > TOLERANCES[dtype]["atol"]).any():
        return False
    if activation == "relu" or (activation == "leaky_relu" and negative_slope != 1):
        tiny = torch.finfo(dtype).tiny if dtype in LOW_PRECISION else 0.0
        if (z.abs() <= rounding + tiny).any():
            return False
    if activation == "silu":
        sig = torch.sigmoid(z)
        d1 = sig * (1 + z * (1 - sig))  # silu'
        d2 = sig * (1 - sig) * (2 + z * (1 - 2 * sig))  # silu''
        scale = a.abs() * grad.abs()
        tol = TOLERANCES[dtype]
        off = rounding * d2.abs() * scale > tol["atol"] + tol["rtol"] * d1.abs() * scale
        if (off & torch.isfinite(z)).any():
            return False
    return True


def well_conditioned_examples_only(ok):
    """The explicit examples below must be well conditioned (in a property: assume)."""
    assert ok, "an ill-conditioned example (see well_conditioned)"


def check_bn_functional(case, require=assume):
    ref, ref_exc, _, inputs = run_bn_functional(case, "ref")
    ours, ours_exc, (before, after), ours_inputs = run_bn_functional(case, "ours")
    x = ours_inputs["x"]
    assert_same_failure(ours_exc, ref_exc, "batch_norm")
    if ref_exc is not None:
        for b0, b1 in zip(before, after):
            assert b0 is None or torch.equal(b0, b1), "a failed call changed a running buffer"
        return
    require(well_conditioned(case.dtype, case.training, case.eps, case.activation, case.negative_slope, **inputs))
    theirs, theirs_exc, _, _ = run_bn_functional(case, "torch")
    assert theirs_exc is None, theirs_exc
    compare_bn_results(case.dtype, case.param_dtype, ours, ref, theirs, case.momentum)
    out = ours["output"]
    assert out.dtype == case.dtype
    if case.x_layout.kind in (CONTIGUOUS, "channels_last") and out.numel() > 1:
        assert out.stride() == x.stride(), f"the output keeps the input's layout: {out.stride()} vs {x.stride()}"


def compare_bn_results(dtype, param_dtype, ours, ref, theirs, momentum):
    """momentum outside [0, 1] makes the running-buffer update (1 - m) * old + m * batch a
    difference that can cancel: those buffers are then held as a whole (per_tensor)."""
    extrapolated = momentum is not None and not 0 <= momentum <= 1
    for name, r in ref.items():
        o, t = ours[name], theirs[name]
        if r is None:
            assert o is None, name
            continue
        assert o is not None, f"{name}: none from fastnorm, torch has one"
        if name.startswith("running"):
            assert o.dtype == param_dtype, (name, o.dtype)
            assert_matches(o, r, param_dtype, t, what=name, per_tensor=extrapolated)
        else:
            assert o.dtype == (param_dtype if name in ("grad weight", "grad bias") else dtype), (name, o.dtype)
            assert_matches(o, r, dtype, t, what=name, per_tensor=name in ("grad weight", "grad bias"))


@fuzz_settings("bn_functional")
@given(case=bn_cases())
def test_batch_norm_functional_matches_torch(case):
    """fastnorm.functional.batch_norm against torch's F.batch_norm (+ residual, activation)
    in float64: output, the gradients of input, weight, bias and residual, and the running
    buffers after the call; torch's error (ValueError/RuntimeError) where torch raises."""
    check_bn_functional(case)
    EXAMPLES_RUN["bn_functional"] += 1


@fuzz_settings("bn_special_values")
@given(case=bn_cases(specials=True))
def test_batch_norm_special_values_match_torch(case):
    """As above with NaN and infinities in the input: NaN and infinities where torch has
    them (a channel with one in training is NaN throughout, as in torch), finite elsewhere."""
    check_bn_functional(case)
    EXAMPLES_RUN["bn_special_values"] += 1


# ---------------------------------------------------------------------------------------
# Batch norm, modules

ModuleCase = collections.namedtuple(
    "ModuleCase",
    "device shape dtype param_dtype x_layout grad_layout residual eps momentum affine track activation "
    "negative_slope modes num_batches_tracked values scale shift seed")

MODULES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


@st.composite
def module_cases(draw):
    ndim = draw(st.integers(2, 5))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    activation = draw(st.sampled_from(ACTIVATIONS))
    return ModuleCase(
        device=draw(st.sampled_from(DEVICES)),
        shape=draw(shapes(ndim, max_numel=MAX_NUMEL // 2, empty_dims=[0] + list(range(2, ndim)))),
        dtype=dtype,
        param_dtype=draw(param_dtypes(dtype)),
        x_layout=draw(layouts(ndim)),
        grad_layout=draw(layouts(ndim)),
        residual=draw(st.booleans()),
        eps=draw(EPS),
        momentum=draw(st.none() | MOMENTA),
        affine=draw(st.booleans()),
        track=draw(st.booleans()),
        activation=activation,
        negative_slope=draw(SLOPES) if activation == "leaky_relu" else 0.01,
        modes=tuple(draw(st.lists(st.sampled_from(("train", "eval")), min_size=1, max_size=3))),
        num_batches_tracked=draw(st.sampled_from((0, 1, 7))),
        values=draw(VALUE_KINDS),
        scale=draw(SCALES),
        shift=draw(SHIFTS),
        seed=draw(st.integers(0, 2**16)),
    )


def check_module(case, require=assume):
    C = case.shape[1]
    name = MODULES[len(case.shape)]
    kw = dict(eps=case.eps, momentum=case.momentum, affine=case.affine, track_running_stats=case.track)
    act = dict(activation=case.activation, negative_slope=case.negative_slope)
    ours = getattr(fastnorm, name)(C, device=case.device, dtype=case.param_dtype, **act, **kw)
    ref = reference.batch_norm_module(getattr(torch.nn, name), C, dtype=torch.float64, **act, **kw)
    theirs = reference.batch_norm_module(getattr(torch.nn, name), C, device=case.device, dtype=case.param_dtype,
                                         **act, **kw)
    gen = generator(case.seed)
    with torch.no_grad():  # a state as after some training
        if case.affine:
            ours.weight.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
            ours.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
        if case.track:
            rm = (case.shift + 0.5 * torch.randn(C, generator=gen, dtype=torch.float64)) * case.scale
            ours.running_mean.copy_(rm)
            ours.running_var.copy_((torch.rand(C, generator=gen, dtype=torch.float64) + 0.25) * case.scale**2)
            ours.num_batches_tracked.fill_(case.num_batches_tracked)
    for step, mode in enumerate(case.modes):
        what = f"step {step} ({mode})"
        for m in (ours, ref, theirs):
            m.train(mode == "train")
            m.zero_grad(set_to_none=True)
        x = make_values(case.shape, case.values, case.scale, case.shift, gen)
        r = torch.randn(case.shape, generator=gen, dtype=torch.float64) if case.residual else None
        g = torch.randn(case.shape, generator=gen, dtype=torch.float64)

        def run(module, device, dtype, layouts):
            """dtype None: the reference, the values rounded to the case's dtype, in float64."""
            def put(t, layout):
                t = t.to(case.dtype)
                if dtype is None:
                    return with_expansion(t, layout).double()
                return materialize(t, layout, device)

            xs = put(x, layouts[0]).requires_grad_()
            rs = None if r is None else put(r, layouts[0]).requires_grad_()
            gs = put(g, layouts[1])

            def call():
                out = module(xs, rs) if rs is not None else module(xs)
                out.backward(gs)
                return out

            out, exc = outcome(call)
            bn = getattr(module, "bn", module)
            res = None
            if exc is None:
                res = {"output": out, "grad input": xs.grad,
                       "grad weight": bn.weight.grad if case.affine else None,
                       "grad bias": bn.bias.grad if case.affine else None,
                       "grad residual": rs.grad if rs is not None else None,
                       "running_mean": bn.running_mean, "running_var": bn.running_var}
            return res, exc

        # Every step starts torch's modules from fastnorm's state (in the parameters' dtype),
        # so that each step is judged alone and rounding does not pile up over steps.
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        ref.bn.load_state_dict(state)
        theirs.bn.load_state_dict(state)
        state = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
        buffers_before = {k: v.clone() for k, v in ours.named_buffers()}
        ref_res, ref_exc = run(ref, "cpu", None, [case.x_layout, case.grad_layout])
        ours_res, ours_exc = run(ours, case.device, case.dtype, [case.x_layout, case.grad_layout])
        assert_same_failure(ours_exc, ref_exc, what)
        if ref_exc is None:
            use_batch_stats = mode == "train" or not case.track
            x64 = with_expansion(x, case.x_layout).to(case.dtype).double()
            r64 = None if r is None else with_expansion(r, case.x_layout).to(case.dtype).double()
            g64 = with_expansion(g, case.grad_layout).to(case.dtype).double()
            require(well_conditioned(case.dtype, use_batch_stats, case.eps, case.activation, case.negative_slope, x64,
                                    g64, r64, state.get("weight"), state.get("bias"), state.get("running_mean"),
                                    state.get("running_var")))
            theirs_res, theirs_exc = run(theirs, case.device, case.dtype, [case.x_layout, case.grad_layout])
            assert theirs_exc is None, theirs_exc
            try:
                compare_bn_results(case.dtype, case.param_dtype, ours_res, ref_res, theirs_res, case.momentum)
            except AssertionError as e:
                raise AssertionError(f"{what}: {e}") from None
            if case.track:
                assert ours.num_batches_tracked.item() == ref.bn.num_batches_tracked.item(), what
        else:
            # torch's module counts the batch before F.batch_norm raises; fastnorm leaves every
            # buffer as it was (shared/API.md: buffers untouched when a call fails)
            for k, v in ours.named_buffers():
                assert torch.equal(v, buffers_before[k]), f"{what}: a failed call changed {k}"
        assert list(ours.state_dict()) == list(ref.bn.state_dict())


@fuzz_settings("bn_module")
@given(case=module_cases())
def test_batch_norm_modules_match_torch(case):
    """fastnorm.BatchNorm1d/2d/3d against torch's modules (+ residual, activation) over one
    to three steps in train or eval mode, from a trained-looking state: outputs, gradients,
    running buffers and num_batches_tracked (momentum None: the cumulative average)."""
    check_module(case)
    EXAMPLES_RUN["bn_module"] += 1


# ---------------------------------------------------------------------------------------
# Weight norm

WNCase = collections.namedtuple(
    "WNCase", "device shape dim dtype g_dtype g_scalar eps v_layout g_layout grad_layout scale zero_slices seed")


@st.composite
def wn_cases(draw):
    ndim = draw(st.integers(1, 4))
    shape = draw(shapes(ndim))
    dim = draw(st.sampled_from([0, None, -1, ndim - 1, ndim // 2, -ndim] + list(range(-ndim, 0))))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    whole = dim is None or dim == -1
    return WNCase(
        device=draw(st.sampled_from(DEVICES)),
        shape=shape,
        dim=dim,
        dtype=dtype,
        g_dtype=draw(st.sampled_from((dtype, torch.float32))) if dtype in LOW_PRECISION else dtype,
        g_scalar=draw(st.booleans()) if whole else False,
        eps=draw(st.sampled_from((0.0, 1e-12, 1e-6, 1e-2, 1.0)) | st.floats(1e-8, 10.0)),
        v_layout=draw(layouts(ndim)),
        g_layout=draw(layouts(ndim, (CONTIGUOUS, "strided", "sliced"))),
        grad_layout=draw(layouts(ndim)),
        scale=draw(st.sampled_from((1.0, 1e-3, 1e3))),
        zero_slices=draw(st.integers(0, 3)) if draw(st.integers(0, 5)) == 0 else 0,
        seed=draw(st.integers(0, 2**16)),
    )


def torch_wn_dim(case):
    return -1 if case.dim is None else case.dim


def norm_dim(case):
    """The normalized dim (-1: the whole tensor)."""
    return -1 if case.dim is None or case.dim == -1 else case.dim % len(case.shape)


def wn_tensors(case):
    gen = generator(case.seed)
    v = torch.randn(case.shape, generator=gen, dtype=torch.float64) * case.scale
    d = norm_dim(case)
    if case.zero_slices:
        if d == -1:
            v.zero_()
        elif v.numel():
            idx = torch.randint(0, case.shape[d], (case.zero_slices,), generator=gen)
            v.index_fill_(d, idx, 0.0)
    gshape = [1] * len(case.shape)
    if d != -1:
        gshape[d] = case.shape[d]
    g = torch.rand(gshape, generator=gen, dtype=torch.float64) * 2 - 0.5  # some negative
    if case.g_scalar:
        g = g.reshape(())
    gw = torch.randn(case.shape, generator=gen, dtype=torch.float64)
    return v, g, gw


def wn_by_hand(v, g, d, eps, acc_dtype):
    """g * v / sqrt(sum(v^2) + eps) in torch's ops, the sum over every dim but d, accumulated
    in acc_dtype, the norm rounded to v's dtype (as torch._weight_norm's norm is)."""
    dims = [i for i in range(v.dim()) if i != d] if d != -1 else list(range(v.dim()))
    sq = v.to(acc_dtype).pow(2).sum(dims, keepdim=True) if dims else v.to(acc_dtype).pow(2)
    norm = (sq + eps).sqrt().to(v.dtype)
    return v * (g / norm)


def run_wn(case, mode):
    v, g, gw = wn_tensors(case)
    if mode == "ref":  # the same values, rounded to the case's dtypes, in float64
        v = with_expansion(v, case.v_layout).to(case.dtype).double()
        g = with_expansion(g, case.g_layout if g.dim() else None).to(case.g_dtype).double()
        gw = with_expansion(gw, case.grad_layout).to(case.dtype).double()
    else:
        # torch._weight_norm refuses float32 g with bfloat16 v: torch's own error in that
        # dtype is then taken with g in v's dtype (g's values are the same: rounded first)
        g_dtype = case.dtype if mode == "torch" else case.g_dtype
        v = materialize(v.to(case.dtype), case.v_layout, case.device)
        g = materialize(g.to(case.g_dtype).to(g_dtype), case.g_layout if g.dim() else contiguous_layout(0),
                        case.device)
        gw = materialize(gw.to(case.dtype), case.grad_layout, case.device)
    v.requires_grad_()
    g.requires_grad_()
    if mode == "ours":
        fn = lambda: fastnorm.functional.weight_norm(v, g, case.dim, eps=case.eps)  # noqa: E731
    elif case.eps == 0:
        fn = lambda: torch._weight_norm(v, g, torch_wn_dim(case))  # noqa: E731
    else:
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        fn = lambda: wn_by_hand(v, g, norm_dim(case), case.eps, acc)  # noqa: E731

    def call():
        w = fn()
        w.backward(gw.to(w.dtype))
        return w

    w, exc = outcome(call)
    return (None if exc else {"w": w, "grad v": v.grad, "grad g": g.grad}), exc, (v.detach(), g.detach(), gw)


def wn_well_conditioned(case, v, g, gw, grad_v):
    """False where the gradient of v is lost to cancellation in any kernel (float64 inputs):
    grad_v = g / n * (gw - v / n * sum(gw * v / n)) with terms far larger than the result,
    as in a slice of one element (exactly g * eps / (v^2 + eps)^1.5, 0 for eps=0)."""
    d = norm_dim(case)
    dims = [i for i in range(v.dim()) if i != d] if d != -1 else list(range(v.dim()))
    if v.numel() == 0:
        return True
    n = (v.pow(2).sum(dims, keepdim=True) + case.eps).sqrt() if dims else (v.pow(2) + case.eps).sqrt()
    vhat = v / n
    s = (gw * vhat).abs().sum(dims, keepdim=True) if dims else (gw * vhat).abs()
    terms = g.abs() / n * (gw.abs() + vhat.abs() * s)
    acc_eps = torch.finfo(torch.float64 if case.dtype == torch.float64 else torch.float32).eps
    rounding = 8 * acc_eps * terms
    tol = TOLERANCES[case.dtype]
    bad = rounding > tol["atol"] + tol["rtol"] * grad_v.abs()
    return not (bad & torch.isfinite(rounding) & torch.isfinite(grad_v)).any()


def check_wn(case, require=assume):
    ref, ref_exc, inputs = run_wn(case, "ref")
    ours, ours_exc, _ = run_wn(case, "ours")
    assert_same_failure(ours_exc, ref_exc, "weight_norm")
    if ref_exc is not None:
        return
    require(wn_well_conditioned(case, *inputs, ref["grad v"]))
    theirs, _, _ = run_wn(case, "torch")
    assert ours["w"].dtype == case.dtype
    assert ours["grad g"].dtype == case.g_dtype
    for name in ("w", "grad v", "grad g"):
        # No allowance for torch's own error in float64: the reference is exact there.
        t = None if case.dtype == torch.float64 else theirs[name]
        assert_matches(ours[name], ref[name], case.dtype, t, what=name, per_tensor=name == "grad g")


@fuzz_settings("weight_norm")
@given(case=wn_cases())
def test_weight_norm_matches_torch(case):
    """fastnorm.functional.weight_norm against torch._weight_norm in float64 (eps > 0:
    g * v / sqrt(sum(v^2) + eps) by hand): w and the gradients of v and g, for every dim
    (None and -1: the whole tensor; other negative dims from the end), NaN for zero-norm
    slices with eps=0 as in torch."""
    check_wn(case)
    EXAMPLES_RUN["weight_norm"] += 1


# ---------------------------------------------------------------------------------------
# Differences from torch found by the properties above, as minimal explicit examples.

def _bn_both(x, rm, rv, w, b, training, g, residual=None, **kw):
    """fastnorm's and torch's (reference.batch_norm) output, input/weight/bias/residual grads
    and running buffers on copies of the same float64 inputs."""
    results = []
    for fn in (fastnorm.functional.batch_norm, reference.batch_norm):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        rs = None if residual is None else residual.clone().requires_grad_()
        rms, rvs = rm.clone(), rv.clone()
        out = fn(xs, rms, rvs, ws, bs, training, 0.1, 1e-5, residual=rs, **kw)
        out.backward(g)
        results.append({"output": out, "grad input": xs.grad, "grad weight": ws.grad, "grad bias": bs.grad,
                        "grad residual": None if rs is None else rs.grad, "running_mean": rms, "running_var": rvs})
    return results


def _assert_same(ours, theirs, names=None):
    for name in names or theirs:
        if theirs[name] is not None:
            torch.testing.assert_close(ours[name], theirs[name], equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf], ids=str)
def test_eval_input_grad_does_not_depend_on_nonfinite_input(special, activation):
    # Found by test_batch_norm_special_values_match_torch. In evaluation the input gradient
    # is g * act'(y) * weight / sqrt(running_var + eps): torch's is finite where the input is
    # NaN or infinite (torch's relu passes the gradient where y is NaN, y <= 0 being false;
    # leaky_relu takes the slope there, y > 0 being false).
    x = torch.tensor([[special, 0.5], [1.0, -2.0]], dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    w, b = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)
    g = torch.tensor([[0.25, -1.0], [0.5, 2.0]], dtype=torch.float64)
    ours, theirs = _bn_both(x, rm, rv, w, b, False, g, activation=activation, negative_slope=0.2)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("special", [math.inf, -math.inf], ids=str)
def test_training_running_mean_of_infinite_input_is_infinite(special):
    # Found by test_batch_norm_special_values_match_torch: a channel holding an infinity has
    # an infinite batch mean, so torch's running_mean becomes that infinity (not NaN); its
    # running_var is NaN.
    x = torch.tensor([[special, 0.5], [1.0, -2.0]], dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    w, b = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    ours, theirs = _bn_both(x, rm, rv, w, b, True, torch.ones_like(x))
    assert theirs["running_mean"][0].item() == special
    _assert_same(ours, theirs)


@pytest.mark.parametrize("special", [math.nan, math.inf], ids=str)
def test_training_relu_passes_the_gradient_where_the_output_is_nan(special):
    # Found by test_batch_norm_special_values_match_torch: a NaN or infinity in a channel
    # makes its whole output NaN in training; torch's relu backward (threshold_backward:
    # 0 where y <= 0) passes the gradient where y is NaN, so grad bias is the sum of the
    # channel's output gradient, not 0.
    x = torch.tensor([[special, 0.5], [1.0, -2.0]], dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    w, b = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    g = torch.tensor([[0.25, -1.0], [0.5, 2.0]], dtype=torch.float64)
    ours, theirs = _bn_both(x, rm, rv, w, b, True, g, activation="relu")
    assert theirs["grad bias"][0].item() == 0.75
    _assert_same(ours, theirs, ["output", "grad input", "grad weight", "grad bias"])


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_eval_relu_gradient_where_a_negative_running_var_makes_nan(activation):
    # Found by test_batch_norm_modules_match_torch: a negative momentum (torch's own module
    # samples use -0.5) can leave running_var negative; evaluation then gives NaN in that
    # channel, where torch's relu passes the gradient (leaky_relu takes the slope): grad bias
    # and grad residual are g there (0.2 * g), not 0.
    x = torch.tensor([[0.5, 1.0], [1.5, -2.0]], dtype=torch.float64)
    rm = torch.zeros(2, dtype=torch.float64)
    rv = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    w, b = torch.tensor([2.0, 3.0], dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)
    g = torch.tensor([[0.25, -1.0], [0.5, 2.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 0.5], [-0.5, 0.25]], dtype=torch.float64)
    ours, theirs = _bn_both(x, rm, rv, w, b, False, g, residual=r, activation=activation, negative_slope=0.2)
    assert theirs["output"][:, 0].isnan().all() and theirs["grad bias"][0].item() != 0
    _assert_same(ours, theirs)
