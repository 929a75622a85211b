"""PyTorch's own test databases for batch norm, run against fastnorm.

The cases are read at collection time from the installed torch, so a new torch brings its new
cases with it:
- ``common_modules.module_db``: the ModuleInfo entries of torch.nn.BatchNorm1d/2d/3d. Each
  ModuleInput (training and eval) builds torch's module and fastnorm's with the same
  constructor arguments and the same (randomized) state; both run on the same input,
  contiguous and channels-last (channels innermost, also for 3-D input), and the output, the
  buffers after the call and the gradients of input, weight and bias must match. Error inputs:
  fastnorm raises where torch does, the same exception type and message.
- ``common_methods_invocations.op_db``: the OpInfo entries named nn.functional.batch_norm
  (every variant). Each sample runs through fastnorm.functional.batch_norm and the entry's op;
  output, mutated running statistics and gradients must match.

Results are held against torch on float64-upcast copies, within the tolerance table (and, for
float16/bfloat16, at most twice torch's own error in that dtype): see
conftest.assert_close_to_reference. Where torch gives NaN/inf, fastnorm must give it at the
same places.
"""
import contextlib
import copy

import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal imports it
_flags_frozen = torch.backends.flags_frozen()
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

if not _flags_frozen:  # importing torch's test modules froze torch.backends' flags for the process
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    assert not torch.backends.flags_frozen()

import fastnorm  # noqa: E402
from conftest import DEVICES, FLOAT_DTYPES, assert_close_to_reference, with_layout  # noqa: E402

MODULES = {
    torch.nn.BatchNorm1d: fastnorm.BatchNorm1d,
    torch.nn.BatchNorm2d: fastnorm.BatchNorm2d,
    torch.nn.BatchNorm3d: fastnorm.BatchNorm3d,
}
OP_NAME = "nn.functional.batch_norm"

MODULE_INFOS = [m for m in module_db if m.module_cls in MODULES]
OP_INFOS = [op for op in op_db if op.name == OP_NAME]


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _device_type(device):
    return torch.device(device).type


def _module_dtypes(info, device):
    """float32 and float64, and whatever else the entry lists for this device that fastnorm
    supports (ModuleInfo.supported_dtypes in newer torch, .dtypes before)."""
    listed = (info.supported_dtypes(_device_type(device)) if hasattr(info, "supported_dtypes")
              else info.dtypes)
    return [d for d in FLOAT_DTYPES if d in set(listed) | {torch.float32, torch.float64}]


def _op_dtypes(op, device):
    listed = set(op.supported_dtypes(_device_type(device)))
    return [d for d in FLOAT_DTYPES if d in listed]


def _trainings(info):
    return (True, False) if info.train_and_eval_differ else (True,)


def _layouts(x):
    """contiguous always; channels-last where it differs from contiguous (3 or more dims)."""
    return ["contiguous"] + (["channels_last"] if x.dim() >= 3 else [])


def _module_inputs(info, device, dtype, training):
    return list(info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True,
                                        training=training))


def _module_cases():
    cases = []
    for info in MODULE_INFOS:
        for device in DEVICES:
            for dtype in _module_dtypes(info, device):
                for training in _trainings(info):
                    for i, mi in enumerate(_module_inputs(info, device, dtype, training)):
                        desc = f"{i}_{mi.desc or 'default'}"
                        for layout in _layouts(mi.forward_input.args[0]):
                            cases.append(pytest.param(
                                info, device, dtype, training, i, layout,
                                id=f"{info.name}-{device}-{_dtype_name(dtype)}-"
                                   f"{'train' if training else 'eval'}-{desc}-{layout}"))
    return cases


def _module_error_cases():
    cases = []
    for info in MODULE_INFOS:
        if info.module_error_inputs_func is None:
            continue
        for device in DEVICES:
            for dtype in _module_dtypes(info, device):
                for training in _trainings(info):
                    errors = info.module_error_inputs_func(info, device=device, dtype=dtype,
                                                           requires_grad=False, training=training)
                    for i, _ in enumerate(errors):
                        cases.append(pytest.param(
                            info, device, dtype, training, i,
                            id=f"{info.name}-{device}-{_dtype_name(dtype)}-"
                               f"{'train' if training else 'eval'}-{i}"))
    return cases


def _op_label(op):
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def _op_cases():
    cases = []
    for op in OP_INFOS:
        for device in DEVICES:
            for dtype in _op_dtypes(op, device):
                for i, s in enumerate(op.sample_inputs(device, dtype, requires_grad=True)):
                    shape = "x".join(map(str, s.input.shape))
                    for layout in _layouts(s.input):
                        cases.append(pytest.param(
                            op, device, dtype, i, layout,
                            id=f"{_op_label(op)}-{device}-{_dtype_name(dtype)}-{i}_{shape}-{layout}"))
    return cases


def _op_error_cases():
    cases = []
    for op in OP_INFOS:
        if op.error_inputs_func is None:
            continue
        for device in DEVICES:
            for i, _ in enumerate(op.error_inputs(device)):
                cases.append(pytest.param(op, device, i, id=f"{_op_label(op)}-{device}-{i}"))
    return cases


def _torch_flags(op):
    """The variant named without_cudnn runs torch with cuDNN off (its OpInfo says so with a
    decorator that only our pytest run would otherwise miss)."""
    if "cudnn" in op.variant_test_name:
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------
# comparisons

def _assert_same(ours, ref64, theirs, dtype, what, per_tensor=False):
    """ours against torch's float64 result ref64 and torch's result theirs in the same dtype:
    same shape and dtype as torch's, NaN/inf where torch's are, values within tolerance."""
    assert (ours is None) == (theirs is None), f"{what}: fastnorm gives {ours!r}, torch {theirs!r}"
    if ours is None:
        return
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, torch's {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype}, torch's {theirs.dtype}"
    ours, ref64, theirs = ours.detach(), ref64.detach(), theirs.detach()
    if not ours.is_floating_point():
        assert torch.equal(ours, theirs), f"{what}: {ours.tolist()}, torch's {theirs.tolist()}"
        return
    for kind, test in (("NaN", torch.isnan), ("inf", torch.isinf)):
        mine, torchs = test(ours), test(theirs)
        assert torch.equal(mine, torchs), (f"{what}: {kind} at {int(mine.sum())} places, torch's at "
                                           f"{int(torchs.sum())} ({int((mine != torchs).sum())} differ)")
    finite = torch.isfinite(theirs)
    assert_close_to_reference(ours[finite], ref64[finite], dtype, torch_result=theirs[finite], what=what,
                              per_tensor=per_tensor)


def _to(t, dtype=None, requires_grad=None):
    """A fresh copy of tensor t (strides kept; dtype changed for floating tensors when given),
    a leaf requiring grad when t does; other values unchanged."""
    if not isinstance(t, torch.Tensor):
        return t
    c = t.detach().to(dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
    return c.requires_grad_(t.requires_grad if requires_grad is None else requires_grad)


def _grad_seed(out, seed=1):
    """Weights of the random-weighted sum whose backward gives the gradients (float64)."""
    gen = torch.Generator(device=out.device).manual_seed(seed)
    return torch.randn(out.shape, dtype=torch.float64, device=out.device, generator=gen)


def _randomize_state(m, seed=2):
    """Non-trivial parameters and buffers (the constructor's are ones and zeros), and a few
    batches already tracked (for momentum=None, the cumulative average)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            t = getattr(m, name, None)
            if t is not None:
                t.copy_(torch.randn(t.shape, dtype=torch.float64, generator=gen))
        if getattr(m, "running_var", None) is not None:
            m.running_var.copy_(torch.rand(m.running_var.shape, dtype=torch.float64, generator=gen) + 0.5)
        if getattr(m, "num_batches_tracked", None) is not None:
            m.num_batches_tracked.fill_(3)


# ---------------------------------------------------------------------------------------
# the databases themselves

def test_databases_hold_batch_norm_entries():
    """The entries this file runs are there (a rename in torch would otherwise leave it
    running nothing), and each yields cases on CPU."""
    assert {m.module_cls for m in MODULE_INFOS} == set(MODULES), [m.name for m in MODULE_INFOS]
    assert OP_INFOS, f"no OpInfo named {OP_NAME!r} in op_db"
    for info in MODULE_INFOS:
        assert _module_inputs(info, "cpu", torch.float32, True), info.name
    assert any(list(op.sample_inputs("cpu", d, requires_grad=True)) for op in OP_INFOS for d in _op_dtypes(op, "cpu"))


# ---------------------------------------------------------------------------------------
# module_db

@pytest.mark.parametrize("info, device, dtype, training, index, layout", _module_cases())
def test_module_db(info, device, dtype, training, index, layout):
    mi = _module_inputs(info, device, dtype, training)[index]
    c_args, c_kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    f_args, f_kwargs = mi.forward_input.args, mi.forward_input.kwargs

    theirs_m = info.module_cls(*c_args, **c_kwargs).to(device).to(dtype)
    _randomize_state(theirs_m)
    ours_m = MODULES[info.module_cls](*c_args, **c_kwargs).to(device).to(dtype)
    ours_m.load_state_dict(theirs_m.state_dict())
    ref_m = copy.deepcopy(theirs_m).to(torch.float64)
    for m in (theirs_m, ours_m, ref_m):
        m.train(training)

    x = with_layout(f_args[0].detach(), layout)
    rest = f_args[1:]

    def run(m, to_dtype=None):
        xi = _to(x, to_dtype, requires_grad=True)
        out = m(xi, *(_to(a, to_dtype) for a in rest), **{k: _to(v, to_dtype) for k, v in f_kwargs.items()})
        return xi, out

    ours_x, ours = run(ours_m)
    theirs_x, theirs = run(theirs_m)
    ref_x, ref = run(ref_m, torch.float64)
    assert ours_x.stride() == x.stride()
    assert torch.equal(ours_x.detach(), x), "the input was changed"

    _assert_same(ours, ref, theirs, dtype, "output")
    if x.dim() >= 4:
        cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert ours.is_contiguous(memory_format=cl) == theirs.is_contiguous(memory_format=cl), \
            f"output strides {ours.stride()}, torch's {theirs.stride()}"
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _assert_same(getattr(ours_m, name), getattr(ref_m, name), getattr(theirs_m, name), dtype, name)

    g = _grad_seed(theirs)
    ours.backward(g.to(dtype))
    theirs.backward(g.to(dtype))
    ref.backward(g)
    _assert_same(ours_x.grad, ref_x.grad, theirs_x.grad, dtype, "input grad")
    for name in ("weight", "bias"):
        p_ours, p_theirs, p_ref = (getattr(m, name) for m in (ours_m, theirs_m, ref_m))
        assert (p_ours is None) == (p_theirs is None), name
        if p_theirs is not None:
            _assert_same(p_ours.grad, p_ref.grad, p_theirs.grad, dtype, f"{name} grad", per_tensor=True)


@pytest.mark.parametrize("info, device, dtype, training, index", _module_error_cases())
def test_module_db_errors(info, device, dtype, training, index):
    """As torch's TestModule.test_errors: construction, or construction and then forward (in the
    module's default mode), raises the entry's exception, for torch's module and for ours; a
    failed forward leaves ours's parameters and buffers untouched (API.md; torch's module counts
    the batch in num_batches_tracked before it raises)."""
    from torch.testing._internal.common_modules import ModuleErrorEnum

    err = list(info.module_error_inputs_func(info, device=device, dtype=dtype, requires_grad=False,
                                             training=training))[index]
    mi = err.module_error_input
    c_args, c_kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    f_args, f_kwargs = mi.forward_input.args, mi.forward_input.kwargs
    for cls, who in ((info.module_cls, "torch"), (MODULES[info.module_cls], "fastnorm")):
        if err.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(err.error_type, match=err.error_regex):
                cls(*c_args, **c_kwargs)
        elif err.error_on == ModuleErrorEnum.FORWARD_ERROR:
            m = cls(*c_args, **c_kwargs).to(device)
            before = {k: v.clone() for k, v in m.state_dict().items()}
            with pytest.raises(err.error_type, match=err.error_regex):
                m(*f_args, **f_kwargs)
            for k, v in m.state_dict().items():
                assert who == "torch" or torch.equal(v, before[k]), f"{who}: a failed forward changed {k}"
        else:
            raise NotImplementedError(f"error_on={err.error_on}")


# ---------------------------------------------------------------------------------------
# op_db

@pytest.mark.parametrize("op, device, dtype, index, layout", _op_cases())
def test_op_db(op, device, dtype, index, layout):
    s = list(op.sample_inputs(device, dtype, requires_grad=True))[index]
    x = with_layout(s.input.detach(), layout)

    def run(fn, to_dtype=None):
        xi = _to(x, to_dtype, requires_grad=s.input.requires_grad)
        args = [_to(a, to_dtype) for a in s.args]
        kwargs = {k: _to(v, to_dtype) for k, v in s.kwargs.items()}
        return xi, args, kwargs, fn(xi, *args, **kwargs)

    ours_x, ours_args, _, ours = run(fastnorm.functional.batch_norm)
    with _torch_flags(op):
        theirs_x, theirs_args, _, theirs = run(op.op)
        ref_x, ref_args, _, ref = run(op.op, torch.float64)
    assert torch.equal(ours_x.detach(), x), "the input was changed"

    _assert_same(ours, ref, theirs, dtype, "output")
    if x.dim() >= 4:
        cl = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert ours.is_contiguous(memory_format=cl) == theirs.is_contiguous(memory_format=cl), \
            f"output strides {ours.stride()}, torch's {theirs.stride()}"
    names = ["running_mean", "running_var", "weight", "bias"]
    for name, a, r, t in zip(names, ours_args, ref_args, theirs_args):
        if name.startswith("running") and t is not None:
            _assert_same(a, r, t, dtype, name)

    assert ours.requires_grad == theirs.requires_grad
    if not theirs.requires_grad:
        return
    g = _grad_seed(theirs)
    ours.backward(g.to(dtype))
    with _torch_flags(op):
        theirs.backward(g.to(dtype))
        ref.backward(g)
    _assert_same(ours_x.grad, ref_x.grad, theirs_x.grad, dtype, "input grad")
    for name, a, r, t in zip(names, ours_args, ref_args, theirs_args):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            _assert_same(a.grad, r.grad, t.grad, dtype, f"{name} grad", per_tensor=True)


OP_ERROR_CASES = _op_error_cases()
if OP_ERROR_CASES:  # (no batch_norm OpInfo has error inputs in torch 2.14)
    @pytest.mark.parametrize("op, device, index", OP_ERROR_CASES)
    def test_op_db_errors(op, device, index):
        e = list(op.error_inputs(device))[index]
        s = e.sample_input
        for fn, who in ((op.op, "torch"), (fastnorm.functional.batch_norm, "fastnorm")):
            args = [_to(a) for a in s.args]
            with pytest.raises(e.error_type, match=e.error_regex):
                fn(_to(s.input), *args, **s.kwargs)
            for a, b in zip(args, s.args):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), f"{who}: a failed call changed an argument"
