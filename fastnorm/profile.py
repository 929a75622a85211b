"""``python -m fastnorm profile``: where a step's time goes, fastnorm's against torch's.

Runs one case (a batch-norm or weight-norm op, forward and backward), one training step of
a model (torchvision or timm, converted by fastnorm.convert, against the same model as
built), or a user's ``module:callable`` (called with ``impl`` "torch" or "fastnorm"; it
returns a function of no arguments that runs one step) under torch.profiler. Writes a
Chrome trace (chrome://tracing, Perfetto) and prints a table of self time per op or
kernel for each implementation, fastnorm's ops named as ``fastnorm::...``. Each step is
labelled by ``record_function`` on the CPU and by an NVTX range on CUDA.
"""
import argparse
import importlib

import torch

import fastnorm
from fastnorm import model_zoo
from fastnorm._cli import UsageError, check_writable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and x.dim() == 4 else x


def _parse_shape(text):
    try:
        shape = tuple(int(s) for s in text.lower().replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise UsageError(f"bad --shape {text!r}: expected sizes such as 32x64x56x56") from None
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"bad --shape {text!r}: expected positive sizes such as 32x64x56x56")
    return shape


def _op_steps(args, device, dtype):
    """{impl: step} for one op case, forward and backward."""
    shape = _parse_shape(args.shape)
    if args.op == "batch_norm":
        if len(shape) < 2:
            raise UsageError(f"bad --shape {args.shape!r}: batch norm needs (N, C, ...)")
        C = shape[1]
        x = _layout(torch.randn(shape, device=device, dtype=dtype), args.layout).requires_grad_()
        pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        w = torch.ones(C, device=device, dtype=pd, requires_grad=True)
        b = torch.zeros(C, device=device, dtype=pd, requires_grad=True)
        rm, rv = torch.zeros(C, device=device, dtype=pd), torch.ones(C, device=device, dtype=pd)
        fns = {"torch": torch.nn.functional.batch_norm, "fastnorm": fastnorm.functional.batch_norm}

        def step(fn):
            return lambda: fn(x, rm, rv, w, b, True, 0.1, 1e-5).sum().backward()

        return {impl: step(fn) for impl, fn in fns.items()}
    v = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    gshape = [shape[0]] + [1] * (len(shape) - 1)
    g = torch.rand(gshape, device=device, dtype=dtype, requires_grad=True)
    return {"torch": lambda: torch._weight_norm(v, g, 0).sum().backward(),
            "fastnorm": lambda: fastnorm.functional.weight_norm(v, g, 0).sum().backward()}


def _model_steps(args, device, dtype):
    case = model_zoo.by_name(args.model, args.batch, args.size, dtype, args.layout)
    try:
        return {impl: model_zoo.training_step(case, impl, device)
                for impl in ("torch", "fastnorm fused" if args.fuse else "fastnorm")}
    except model_zoo.MissingLibrary as e:
        raise UsageError(str(e)) from None


def _callable_steps(spec, device, dtype):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"bad --callable {spec!r}: expected module:function")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UsageError(f"--callable {spec}: {e}") from None
    return {impl: factory(impl=impl, device=device, dtype=dtype) for impl in ("torch", "fastnorm")}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m fastnorm profile", description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group()
    what.add_argument("--op", choices=["batch_norm", "weight_norm"], help="an op case (default: batch_norm)")
    what.add_argument("--model", choices=model_zoo.NAMES,
                      help="a model's training step (fastnorm.model_zoo: torchvision, timm, weight-normed)")
    what.add_argument("--callable", help="module:function(impl, device, dtype) -> step")
    p.add_argument("--shape", default="32x64x56x56", help="the op's input (batch norm) or weight (weight norm)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="(models: autocast for 16-bit)")
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"])
    p.add_argument("--batch", type=int, default=8, help="model batch")
    p.add_argument("--size", type=int, default=64,
                   help="model input size (image side; generator: mel frames; lstm: time steps; mlp: width)")
    p.add_argument("--fuse", action="store_true", help="convert with fuse_activations=True")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up)")
    p.add_argument("--trace", default="fastnorm_profile.json", help="Chrome trace output path")
    p.add_argument("--rows", type=int, default=12, help="table rows per implementation")
    return p.parse_args(argv)


def _table(prof, label, device, rows):
    """Self time per op (CPU) or kernel (CUDA) inside the steps labelled `label`."""
    use_cuda = device == "cuda"
    stats = {}
    events = [e for e in prof.events() if e.name != label]
    steps = [e for e in prof.events() if e.name == label]
    for e in events:
        if not any(s.time_range.start <= e.time_range.start and e.time_range.end <= s.time_range.end for s in steps):
            continue
        t = (e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total) \
            if use_cuda else e.self_cpu_time_total
        stats[e.name] = stats.get(e.name, 0.0) + t
    total = sum(stats.values())
    lines = [f"{label}: {total / 1000:.2f} ms self {'device' if use_cuda else 'CPU'} time in all"]
    for name, t in sorted(stats.items(), key=lambda kv: -kv[1])[:rows]:
        lines.append(f"  {t / 1000:9.3f} ms  {100 * t / max(total, 1e-9):5.1f}%  {name[:90]}")
    return lines


def main(argv):
    args = _parse(argv)
    device = args.device
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {device!r}: cpu or cuda")
    if device == "cuda" and not fastnorm.backends()["cuda"]:
        raise UsageError("--device cuda: no GPU here, or fastnorm built without CUDA")
    dtype = DTYPES[args.dtype]
    if args.callable:
        steps = _callable_steps(args.callable, device, dtype)
    elif args.model:
        steps = _model_steps(args, device, dtype)
    else:
        args.op = args.op or "batch_norm"
        steps = _op_steps(args, device, dtype)
    check_writable(args.trace, "the trace")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for step in steps.values():  # warm-up: first-call costs stay out of the table
        step()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            for impl, step in steps.items():
                label = f"{impl} step"
                nvtx = torch.cuda.nvtx.range(label) if device == "cuda" else None
                with torch.profiler.record_function(label):
                    if nvtx is not None:
                        with nvtx:
                            step()
                    else:
                        step()
                if device == "cuda":
                    torch.cuda.synchronize()
    prof.export_chrome_trace(args.trace)
    what = args.callable or args.model or f"{args.op} {args.shape}"
    print(f"profile of {what} on {device}, {args.dtype}, {args.layout}, {args.steps} steps each")
    for impl in steps:
        print("\n".join(_table(prof, f"{impl} step", device, args.rows)))
    print(f"trace: {args.trace}")
    return 0
