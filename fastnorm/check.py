"""``python -m fastnorm check``: every op against torch on this machine's devices.

A compact version of the test suite for users. Each case runs fastnorm's op forward and
backward and torch's reference on float64 copies of the same inputs, and reports the worst
error as a share of what the tolerance table (fastnorm/reference.py) allows: 1.0 is the
limit. Ops:
  batch_norm   the functional in training and evaluation, contiguous and channels-last,
               without and with the fused residual and activations (output, input, weight,
               bias and residual gradients, running statistics)
  weight_norm  dims 0, 1, a middle one, a negative one, None (whole tensor) (w, gradients of v, g)
  mean_only    MeanOnlyBatchNorm2d in training and evaluation (output, gradients, running mean)
  sync         SyncBatchNorm in one process (plain batch norm there, through its own module)
Exits 1 when a case fails, 2 for a usage error.
"""
import argparse

import torch

import fastnorm
from fastnorm import reference
from fastnorm._cli import UsageError
from fastnorm.reference import TOLERANCES

OPS = ("batch_norm", "weight_norm", "mean_only", "sync")
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def _param_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _worst(ours, refs, dtype):
    """The largest error of ours against the float64 refs, as a share of the allowed one."""
    worst = 0.0
    for o, e in zip(ours, refs):
        if o is None:
            continue
        tol = TOLERANCES[dtype if o.dtype == dtype else o.dtype]
        e = e.double()
        err = (o.double() - e).abs()
        same_nonfinite = torch.equal(torch.isfinite(o), torch.isfinite(e))
        if not same_nonfinite:
            return float("inf")
        finite = torch.isfinite(e)
        if finite.any():
            allowed = tol["atol"] + tol["rtol"] * e.abs()
            worst = max(worst, (err[finite] / allowed[finite]).max().item())
    return worst


def _run_both(fn, ref_fn, inputs, grad_args, g):
    """fn on copies of inputs and ref_fn on float64 copies; outputs, gradients of the
    inputs named in grad_args, and the inputs after the call (buffers)."""
    results = []
    for f, upcast in ((fn, False), (ref_fn, True)):
        conv = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach().clone())
        args = {k: (conv(t) if isinstance(t, torch.Tensor) else t) for k, t in inputs.items()}
        for k in grad_args:
            if args.get(k) is not None:
                args[k].requires_grad_()
        out = f(**args)
        wanted = [args[k] for k in grad_args if args.get(k) is not None]
        grads = torch.autograd.grad(out, wanted, g.double() if upcast else g)
        buffers = [t for k, t in args.items() if k.startswith("running") and t is not None]
        results.append([out, *grads, *buffers])
    return results


def _batch_norm(device, dtype, layout, training, activation, residual):
    x = torch.randn(4, 6, 9, 7, device=device, dtype=torch.float64).mul_(2).add_(0.5).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    pd = _param_dtype(dtype)
    inputs = dict(input=x, weight=torch.randn(6, device=device, dtype=pd), bias=torch.randn(6, device=device, dtype=pd),
                  running_mean=torch.randn(6, device=device, dtype=pd),
                  running_var=torch.rand(6, device=device, dtype=pd) + 0.5,
                  residual=torch.randn_like(x) if residual else None)
    slope = 0.2 if activation == "leaky_relu" else 0.01

    def ours(**a):
        return fastnorm.functional.batch_norm(a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                              training, 0.1, 1e-5, residual=a["residual"], activation=activation,
                                              negative_slope=slope)

    def ref(**a):
        return reference.batch_norm(a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                                    training, 0.1, 1e-5, residual=a["residual"], activation=activation,
                                    negative_slope=slope)

    o, r = _run_both(ours, ref, inputs, ("input", "weight", "bias", "residual"), torch.randn_like(x))
    return _worst(o, r, dtype)


def _weight_norm(device, dtype, shape, dim):
    v = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)
    gshape = [1] * len(shape) if dim is not None else []
    if dim is not None:
        gshape[dim] = shape[dim]
    inputs = dict(v=v, g=(torch.rand(gshape, device=device, dtype=torch.float64) + 0.5).to(dtype))

    def ours(v, g):
        return fastnorm.functional.weight_norm(v, g, dim)

    def ref(v, g):
        return torch._weight_norm(v, g, -1 if dim is None else dim)

    o, r = _run_both(ours, ref, inputs, ("v", "g"), torch.randn_like(v))
    return _worst(o, r, dtype)


def _mean_only(device, dtype, training):
    x = torch.randn(4, 5, 6, 7, device=device, dtype=torch.float64).add_(1.5).to(dtype)
    module = fastnorm.MeanOnlyBatchNorm2d(5, device=device, dtype=_param_dtype(dtype)).train(training)
    with torch.no_grad():
        module.bias.normal_()
        module.running_mean.normal_()
    running_before = module.running_mean.detach().double().clone()
    bias64 = module.bias.detach().double().requires_grad_()
    xs, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    g = torch.randn_like(x)
    out = module(xs)
    gx, gb = torch.autograd.grad(out, (xs, module.bias), g)
    mean = x64.mean((0, 2, 3)) if training else running_before
    ref = x64 - mean.view(1, -1, 1, 1) + bias64.view(1, -1, 1, 1)
    rgx, rgb = torch.autograd.grad(ref, (x64, bias64), g.double())
    running = running_before.lerp(mean.detach(), 0.1) if training else running_before
    return _worst([out, gx, gb, module.running_mean], [ref, rgx, rgb, running], dtype)


def _sync(device, dtype, training):
    x = torch.randn(4, 6, 5, 5, device=device, dtype=torch.float64).to(dtype)
    ours = fastnorm.SyncBatchNorm(6, device=device, dtype=_param_dtype(dtype), activation="relu").train(training)
    ref = torch.nn.BatchNorm2d(6, device=device, dtype=torch.float64).train(training)
    with torch.no_grad():
        for t in (ours.weight, ours.bias, ours.running_mean):
            t.normal_()
        ours.running_var.uniform_(0.5, 1.5)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    xs, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    g = torch.randn_like(x)
    out, out64 = ours(xs), torch.relu(ref(x64))
    grads = torch.autograd.grad(out, (xs, ours.weight, ours.bias), g)
    grads64 = torch.autograd.grad(out64, (x64, ref.weight, ref.bias), g.double())
    return _worst([out, *grads, ours.running_mean, ours.running_var],
                  [out64, *grads64, ref.running_mean, ref.running_var], dtype)


def _cases(op, device, dtype):
    """(description, thunk) for every case of op."""
    if op == "batch_norm":
        for layout in ("contiguous", "channels_last"):
            for training in (True, False):
                for activation, residual in ((None, False), (None, True), ("relu", True), ("leaky_relu", False),
                                             ("silu", True), ("relu6", False), ("hardswish", True), ("gelu", False),
                                             ("gelu_tanh", True), ("elu", False)):
                    name = (f"{layout}, {'train' if training else 'eval'}, act={activation}"
                            f"{', residual' if residual else ''}")
                    yield name, lambda l=layout, t=training, a=activation, r=residual: _batch_norm(
                        device, dtype, l, t, a, r)
    elif op == "weight_norm":
        for shape, dim in (((64, 48), 0), ((64, 48), 1), ((16, 8, 3, 3), 1), ((16, 8, 3, 3), -2), ((64, 48), None)):
            yield f"{tuple(shape)}, dim={dim}", lambda s=shape, d=dim: _weight_norm(device, dtype, s, d)
    elif op == "mean_only":
        for training in (True, False):
            yield ("train" if training else "eval"), lambda t=training: _mean_only(device, dtype, t)
    elif op == "sync":
        for training in (True, False):
            yield f"one process, relu, {'train' if training else 'eval'}", lambda t=training: _sync(device, dtype, t)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m fastnorm check", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {', '.join(OPS)} (default: all)")
    parser.add_argument("--devices", default=None, help="comma-separated, of cpu, cuda (default: every available)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--verbose", action="store_true", help="a row for every case, not only failures")
    return parser.parse_args(argv)


def _pick(what, given, known):
    chosen = [s.strip() for s in given.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in known]
    if unknown or not chosen:
        raise UsageError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return chosen


def main(argv):
    args = _parse(argv)
    ops = _pick("op", args.ops, OPS)
    dtypes = _pick("dtype", args.dtypes, list(DTYPES))
    available = ["cpu"] + (["cuda"] if fastnorm.backends()["cuda"] else [])
    devices = _pick("device", args.devices, ["cpu", "cuda"]) if args.devices else available
    missing = [d for d in devices if d not in available]
    if missing:
        raise UsageError(f"no {', '.join(missing)} device here (available: {', '.join(available)})")
    print(f"{'op':<12} {'device':<6} {'dtype':<9} {'cases':>5} {'failed':>6} {'worst/allowed':>13}  case")
    failures = total = 0
    torch.manual_seed(0)
    for op in ops:
        for device in devices:
            for name in dtypes:
                dtype = DTYPES[name]
                worst_case, worst, n_failed, n = "", 0.0, 0, 0
                for case, run in _cases(op, device, dtype):
                    w = run()
                    n += 1
                    if w > 1.0:
                        n_failed += 1
                        print(f"  FAIL {op} {device} {name} {case}: worst/allowed {w:.3g}")
                    elif args.verbose:
                        print(f"  ok   {op} {device} {name} {case}: worst/allowed {w:.3g}")
                    if w >= worst:
                        worst, worst_case = w, case
                total += n
                failures += n_failed
                print(f"{op:<12} {device:<6} {name:<9} {n:>5} {n_failed:>6} {worst:>13.3g}  {worst_case}")
    print(f"{total - failures}/{total} cases match torch")
    return 1 if failures else 0
