"""Shared test setup: devices, the tolerance table, input makers and comparisons."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastnorm

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# The tolerance table lives with the references (fastnorm/reference.py), shared with
# `python -m fastnorm check`; see assert_close_to_reference for the low-precision rule.
from fastnorm.reference import TOLERANCES  # noqa: E402
FLOAT_DTYPES = list(TOLERANCES)
LOW_PRECISION = (torch.float16, torch.bfloat16)


class RecordDispatch(TorchDispatchMode):
    """A dispatch mode that records the name of every op it sees (``seen``)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("FASTNORM_RUNSLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def param_dtype_for(dtype):
    """Parameters are float32 for low-precision input (the usual mixed precision)."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def with_layout(x, layout):
    """x (any values) re-laid out: contiguous, channels_last (channels innermost, for any
    ndim >= 2), or strided (not dense: a slice of a larger tensor)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        perm = (0, *range(2, x.dim()), 1)
        back = (0, x.dim() - 1, *range(1, x.dim() - 1))
        return x.permute(perm).contiguous().permute(back)
    if layout == "strided":
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big.normal_()
        view = big[..., ::2]
        view.copy_(x)
        return view
    raise ValueError(layout)


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(ours, ref64, dtype, torch_result=None, what="", per_tensor=False):
    """ours (in dtype) against a float64 reference, within the tolerance table. Given
    torch's own result in the same dtype, each element may also be off by twice torch's own
    error there (ill-conditioned values), and for float16/bfloat16 the largest error may be
    at most twice torch's (plus one rounding). per_tensor holds the tensor as a whole: rtol
    scales with its largest value and torch's error is its largest, for results that are
    sums of many products (weight gradients), where an element can cancel to near zero
    (exactly zero, for a bias before a batch norm) while its rounding error cannot."""
    assert ours.dtype == dtype or dtype in LOW_PRECISION, (ours.dtype, dtype)
    tol = TOLERANCES[dtype]
    assert torch.isfinite(ours).all() == torch.isfinite(ref64).all(), f"{what}: non-finite values differ"
    ref = ref64.double()
    err = (ours.double() - ref).abs()
    magnitude = ref.abs().max() if per_tensor and ref.numel() else ref.abs()
    allowed = tol["atol"] + tol["rtol"] * magnitude
    if torch_result is not None:
        torch_err = (torch_result.double() - ref).abs()
        allowed = allowed + 2 * (torch_err.max() if per_tensor and ref.numel() else torch_err)
        if dtype in LOW_PRECISION:
            scale = ref.abs().max().item() if ref.numel() else 0.0
            floor = torch.finfo(dtype).eps * max(1.0, scale)
            worst, worst_torch = max_err(ours, ref), max_err(torch_result, ref)
            assert worst <= 2 * worst_torch + floor, f"{what}: error {worst:.3g} vs torch's {worst_torch:.3g} in {dtype}"
    finite = torch.isfinite(ref)
    allowed = allowed.expand_as(err)  # (a 0-dim bound when per_tensor)
    bad = (err > allowed) & finite
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {ref.numel()} elements off; worst error "
                           f"{err[bad].max().item():.3g} where {allowed[bad].min().item():.3g} is allowed")


def assert_compiled_autograd_matches_eager(eager, traced, x):
    """traced (a copy of eager) gets eager's parameter gradients when its backward runs
    through torch's compiled autograd (the graph traced and run by dynamo's eager backend)."""
    from torch._dynamo import compiled_autograd

    enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable  # (renamed in newer torch)
    torch._dynamo.reset()
    eager(x).square().sum().backward()
    loss = traced(x).square().sum()
    with enable(torch.compile(backend="eager")):
        loss.backward()
    for (name, pe), pt in zip(eager.named_parameters(), traced.parameters()):
        torch.testing.assert_close(pt.grad, pe.grad, rtol=1e-5, atol=1e-6, msg=name)
