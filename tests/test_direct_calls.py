"""The direct entry points (fastnorm._ops.calls, csrc/direct_calls.cpp): the same results,
errors, autograd and dispatch behaviour as the torch.ops path, which Python-level
overrides (__torch_function__ modes and subclasses) still take."""
import contextlib
import threading

import numpy as np

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastnorm
from fastnorm._ops import calls, ops, weight_norm_w

from conftest import DEVICES, RecordDispatch


def _args(name, device):
    """Fresh random arguments for each op (running buffers cloned per call by the caller)."""
    if name in ("weight_norm", "weight_norm_norms"):
        v = torch.randn(6, 5, 3, device=device)
        g = torch.rand(6, 1, 1, device=device) + 0.5
        return (v, g, 0, 1e-3) if name == "weight_norm" else (v, -1, 0.0)
    x = torch.randn(4, 3, 5, 2, device=device)
    w, b, r = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device), torch.randn_like(x)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    if name == "batch_norm_train":
        return (x, w, b, r, rm, rv, None, 0.1, False, 1e-5, 2, 0.2)
    return (x, rm, rv, w, b, r, 1e-5, 1, 0.01)


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


OPS = ["weight_norm", "weight_norm_norms", "batch_norm_train", "batch_norm_elemt"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_same_results_and_buffer_updates_as_torch_ops(name, device):
    args = _args(name, device)
    a, b = _clone(args), _clone(args)
    direct = _as_tuple(getattr(calls, name)(*a))
    boxed = _as_tuple(getattr(ops, name).default(*b))
    assert len(direct) == len(boxed)
    for d, o in zip(direct, boxed):
        torch.testing.assert_close(d, o, rtol=0, atol=0)
    for x, y in zip(a, b):  # running statistics updated alike
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [0, 1, 2, -1, None, -2, -3])
def test_weight_norm_w_same_as_torch_ops(dim, device):
    """The functional's entry (w alone, dim as the public API takes it) against the op."""
    v = torch.randn(6, 5, 3, device=device)
    op_dim = -1 if dim in (None, -1) else dim % 3
    g = torch.rand([v.size(d) if d == op_dim else 1 for d in range(3)], device=device) + 0.5
    w = weight_norm_w(v, g, dim, 1e-3)
    torch.testing.assert_close(w, ops.weight_norm.default(v, g, op_dim, 1e-3)[0], rtol=0, atol=0)


def test_weight_norm_w_bad_dim():
    v, g = torch.randn(3, 4), torch.rand(3)
    for dim in (2, -3):
        with pytest.raises(IndexError, match=f"dim {dim} is out of range for a weight of 2 dimensions"):
            weight_norm_w(v, g, dim, 0.0)
        with pytest.raises(IndexError, match=f"dim {dim} is out of range for a weight of 2 dimensions"):
            with _RecordFunctions():  # the torch.ops path
                weight_norm_w(v, g, dim, 0.0)
    for mode in (contextlib.nullcontext, _RecordFunctions):  # the direct path, the torch.ops path
        with mode():
            with pytest.raises(TypeError, match="dim must be an int or None, got 0.5"):
                weight_norm_w(v, g, 0.5, 0.0)
            with pytest.raises(TypeError, match="eps must be a float, got 'a'"):
                weight_norm_w(v, g, 0, "a")
            with pytest.raises(TypeError, match="v and g must be Tensors, got list and Tensor"):
                fastnorm.functional.weight_norm([1.0, 2.0], g)
    g1 = torch.rand(4)
    w = fastnorm.functional.weight_norm(v, g1, np.int64(1), eps=np.float32(0.5))  # numbers of numpy's types
    torch.testing.assert_close(w, weight_norm_w(v, g1, 1, 0.5), rtol=0, atol=0)


def test_bad_input_same_error_both_paths():
    v, g = torch.randn(3, 4), torch.randn(5)
    errors = []
    for fn in (calls.weight_norm, ops.weight_norm.default):
        with pytest.raises(RuntimeError) as info:
            fn(v, g, 0, 0.0)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert "does not fit v of shape [3, 4]" in errors[0]
    assert "Exception raised from" not in errors[0]  # no C++ backtrace in the message


class _RecordFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_torch_function_mode_sees_the_op():
    v, g = torch.randn(4, 3), torch.rand(4, 1)
    with _RecordFunctions() as mode:
        w = fastnorm.functional.weight_norm(v, g)
        fastnorm.functional.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True)
    assert "fastnorm.weight_norm.default" in mode.seen
    assert "fastnorm.batch_norm_train.default" in mode.seen
    torch.testing.assert_close(w, torch._weight_norm(v, g, 0))


def test_dispatch_mode_sees_forward_and_backward():
    v = torch.randn(4, 3, requires_grad=True)
    g = torch.rand(4, 1, requires_grad=True)
    grad_w = torch.randn(4, 3)
    with RecordDispatch() as mode:
        w = fastnorm.functional.weight_norm(v, g)
        w.backward(grad_w)
    assert "fastnorm.weight_norm.default" in mode.seen
    assert "fastnorm.weight_norm_backward.default" in mode.seen
    vr, gr = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    torch._weight_norm(vr, gr, 0).backward(grad_w.double())
    torch.testing.assert_close(v.grad, vr.grad.float())
    torch.testing.assert_close(g.grad, gr.grad.float())


def test_subclass_with_torch_function_takes_the_python_path():
    class Logged(torch.Tensor):
        calls_seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls_seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    v, g = torch.randn(4, 3), torch.rand(4, 1)
    w = fastnorm.functional.weight_norm(v.as_subclass(Logged), g)
    assert "fastnorm.weight_norm.default" in Logged.calls_seen
    torch.testing.assert_close(w.as_subclass(torch.Tensor), torch._weight_norm(v, g, 0))


def test_fake_and_meta_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = fastnorm.functional.weight_norm(torch.randn(5, 4), torch.rand(5, 1))
        assert w.shape == (5, 4)
    w = fastnorm.functional.weight_norm(torch.randn(5, 4, device="meta"), torch.rand(5, 1, device="meta"))
    assert w.shape == (5, 4) and w.device.type == "meta"


def test_threads_run_concurrently_and_agree():
    """The direct calls release the GIL: calls from several threads at once stay correct."""
    vs = [torch.randn(64, 257) for _ in range(8)]
    gs = [torch.rand(64, 1) + 0.5 for _ in range(8)]
    expected = [torch._weight_norm(v.double(), g.double(), 0) for v, g in zip(vs, gs)]
    results = [None] * 8

    def work(i):
        for _ in range(20):
            results[i] = fastnorm.functional.weight_norm(vs[i], gs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, e in zip(results, expected):
        torch.testing.assert_close(r.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strict", [True, False])
def test_export_records_the_op(strict):
    """Strict export traces with dynamo (the torch.ops path), non-strict export below Python
    (the direct path, through the dispatcher): the graph holds the op either way."""
    layer = fastnorm.weight_norm(torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    program = torch.export.export(layer, (x,), strict=strict)
    targets = [str(node.target) for node in program.graph.nodes]
    assert "fastnorm.weight_norm.default" in targets
    torch.testing.assert_close(program.module()(x), layer(x))
