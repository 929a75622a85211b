"""gradcheck / gradgradcheck in float64, torch.library.opcheck on every op, and
torch.compile(fullgraph=True) against eager."""
import pytest
import torch

import fastnorm
from conftest import DEVICES, RecordDispatch, assert_compiled_autograd_matches_eager, with_layout

ACTIVATIONS = [(None, 0.01), ("relu", 0.01), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("silu", 0.01),
               ("relu6", 0.01), ("hardswish", 0.01), ("gelu", 0.01), ("gelu_tanh", 0.01), ("elu", 0.01)]


def f64(*shape, device="cpu", requires_grad=True):
    return torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=requires_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation,slope", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
def test_gradcheck_and_gradgradcheck(device, training, layout, activation, slope, residual):
    x = with_layout(f64(3, 4, 5, 2, device=device, requires_grad=False), layout).requires_grad_()
    w = f64(4, device=device)
    b = f64(4, device=device)
    r = f64(3, 4, 5, 2, device=device) if residual else None
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def fn(x, w, b, *res):
        return fastnorm.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training,
                                              residual=res[0] if res else None, activation=activation,
                                              negative_slope=slope)

    inputs = (x, w, b) + ((r,) if residual else ())
    assert torch.autograd.gradcheck(fn, inputs)
    if activation not in ("relu", "leaky_relu", "relu6", "hardswish", "elu"):
        # (a kink makes finite differences of the second derivative meaningless at it: relu's,
        # relu6's, hardswish's, elu's at 0; keep gradgradcheck to the smooth cases and one
        # leaky case below)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_gradgradcheck_through_masked_activation():
    x, w, b = f64(4, 3, 6), f64(3), f64(3)
    r = f64(4, 3, 6)

    def fn(x, w, b, r):
        return fastnorm.functional.batch_norm(x, None, None, w, b, training=True, residual=r,
                                              activation="leaky_relu", negative_slope=0.1)

    assert torch.autograd.gradgradcheck(fn, (x, w, b, r))


def test_partial_requires_grad():
    x = torch.randn(4, 3, 5)
    w = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    out = fastnorm.functional.batch_norm(x, None, None, w, b, training=True)
    out.sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    torch.nn.functional.batch_norm(x, None, None, ref_w, b, training=True).sum().backward()
    torch.testing.assert_close(w.grad, ref_w.grad)
    x = torch.randn(4, 3, 5, requires_grad=True)
    fastnorm.functional.batch_norm(x, None, None, None, b, training=True).sum().backward()
    assert x.grad is not None


def test_backward_fills_no_zero_gradients():
    """The statistics' gradients (never used) are not materialized: the backward is the
    backward op alone, and its gradients match torch's."""
    x = torch.randn(4, 3, 5, 2, requires_grad=True)
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    g = torch.randn_like(x)
    for training in (True, False):
        out = fastnorm.functional.batch_norm(x, torch.zeros(3), torch.ones(3), w, b, training=training)
        with RecordDispatch() as mode:
            grads = torch.autograd.grad(out, (x, w, b), g)
        assert "fastnorm.batch_norm_backward.default" in mode.seen
        assert not [op for op in mode.seen if "zero" in op or "fill" in op], mode.seen
        xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
        ref = torch.nn.functional.batch_norm(xr, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                                             wr, br, training=training)
        for got, want in zip(grads, torch.autograd.grad(ref, (xr, wr, br), g.double())):
            torch.testing.assert_close(got, want.float())


def _op_samples(device):
    x = torch.randn(4, 3, 5, 6, device=device)
    xcl = x.to(memory_format=torch.channels_last)
    w, b = torch.randn(3, device=device), torch.randn(3, device=device)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    nbt = torch.zeros((), dtype=torch.long, device=device)
    mean, var = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    g = torch.randn_like(x)
    out = torch.randn_like(x)
    ops = torch.ops.fastnorm
    yield ops.batch_norm_stats.default, (xcl,)
    yield ops.batch_norm_train.default, (x, w, b, None, rm, rv, nbt, 0.1, False, 1e-5, 0, 0.0)
    yield ops.batch_norm_train.default, (xcl, w.clone().requires_grad_(), b.clone().requires_grad_(),
                                         torch.randn_like(xcl), None, None, None, 0.1, False, 1e-5, 3, 0.0)
    yield ops.batch_norm_train.default, (x.clone().requires_grad_(), None, None, None, rm, rv, nbt, 0.0, True,
                                         1e-5, 1, 0.0)
    yield ops.batch_norm_elemt.default, (x.clone().requires_grad_(), mean, var, w, b, None, 1e-5, 2, 0.1)
    yield ops.batch_norm_backward.default, (g, x, mean, var, w, b, None, out, 1e-5, True, 1, 0.0, True, True, True)
    yield ops.batch_norm_backward.default, (g, xcl, mean, var, None, None, None, None, 1e-5, False, 0, 0.0, True,
                                            False, False)
    yield ops.batch_norm_backward_reduce.default, (g, x, mean, var, w, b, torch.randn_like(x), None, 1e-5, 3, 0.0)
    yield ops.batch_norm_backward_elemt.default, (g, x, mean, var, w, b, None, out, torch.randn(3, device=device),
                                                  torch.randn(3, device=device), 1e-5, 2, 0.1, True)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


class _Net(torch.nn.Module):
    def __init__(self, momentum):
        super().__init__()
        # No conv bias: before a batch norm its gradient is zero, rounding noise that no
        # tolerance relative to it can compare.
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = fastnorm.BatchNorm2d(8, momentum=momentum, activation="relu")
        self.bn2 = fastnorm.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn2(y, residual=y)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph_matches_eager(momentum):
    torch._dynamo.reset()
    eager = _Net(momentum)
    compiled_net = _Net(momentum)
    compiled_net.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_net, fullgraph=True)
    for _ in range(2):
        x = torch.randn(4, 3, 8, 8)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled_net.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, be), bc in zip(eager.named_buffers(), compiled_net.buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=name)
    compiled_net.eval()
    eager.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_compiled_autograd_matches_eager(momentum):
    """The backward through compiled autograd (an eager forward, the backward graph traced
    through the batch-norm nodes) gives eager's gradients; the statistics the op returns have
    no gradient either way."""
    eager = _Net(momentum)
    traced = _Net(momentum)
    traced.load_state_dict(eager.state_dict())
    x = torch.randn(4, 3, 8, 8)
    assert_compiled_autograd_matches_eager(eager, traced, x)
    _, mean, var = torch.ops.fastnorm.batch_norm_train(x.requires_grad_(), None, None, None, None, None, None, 0.1,
                                                      False, 1e-5, 0, 0.01)
    assert not mean.requires_grad and not var.requires_grad and mean.grad_fn is None
