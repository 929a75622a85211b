"""Side-by-side timings of fastnorm against torch: ``python -m fastnorm bench``.

Every case times fastnorm and torch (eager; and torch.compile with --compile, the default on
CUDA) in the same run: training forward, and forward + backward. Times are medians of
torch.utils.benchmark (warm-up excluded, CUDA synchronized), taken in rounds that
interleave the contenders so that drift in the machine's speed falls on all alike. A ratio
between two contenders ("x vs torch", "/ copy", "/ plain") is the median of its ratios in
each round, where the two ran back to back: on a machine whose speed drifts by 10-30% over
seconds, the ratio of two medians can be off by that much, a paired ratio is not. Bandwidth: the bytes that must
move (forward: read x, write y; backward: read dy and x, write dx) over the time, and as a
share of what a copy of the same bytes achieves on this machine.

Modes (--mode; every output and results file names the one that produced it):
  plain           the default: the process as a user's, no allocator tuning. On the CPU
                  glibc returns every large block to the system when it is freed, so each
                  call's outputs land on fresh pages whose first touch faults.
  warm-allocator  glibc keeps freed memory in the process (no mmap, no trim), as a caching
                  allocator does and as torch does on CUDA: the kernels alone are timed.
  thp             plain, with torch's THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for
                  large CPU tensors: fewer faults).

--json and --markdown are rewritten after every case; --plot (matplotlib) draws each case's
speedup over torch when the run ends. A usage error (no case matching the filters, no GPU
for --device cuda, a path that cannot be written, a bad number) is one line on stderr and
exit status 2, before anything is timed.
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import fastnorm
from fastnorm import model_zoo
from fastnorm._cli import UsageError, check_writable
from fastnorm.bench_models import format_model_results, run_model_case

# (C, H, W) of every distinct batch-norm input in torchvision's ResNet-50.
RESNET50_BN = [
    (64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 56, 56), (128, 28, 28), (512, 28, 28),
    (256, 28, 28), (256, 14, 14), (1024, 14, 14), (512, 14, 14), (512, 7, 7), (2048, 7, 7),
]


@dataclass
class Case:
    name: str
    shape: tuple
    layout: str  # "contiguous" or "channels_last"
    dtype: torch.dtype
    group: str  # cases summarized together (geometric mean of speedups)


@dataclass
class Result:
    name: str
    shape: list
    layout: str
    dtype: str
    group: str
    device: str
    ms: dict = field(default_factory=dict)  # "<impl> <pass>" -> median milliseconds
    speedup: dict = field(default_factory=dict)  # "<impl> <pass>" -> its time / fastnorm's (paired)
    copy_ms: float = 0.0
    bytes: dict = field(default_factory=dict)  # "<pass>" -> bytes that must move


def default_suite(batch):
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("contiguous", "channels_last"):
            for c, h, w in RESNET50_BN:
                cases.append(Case(f"resnet50 {c}x{h}x{w}", (batch, c, h, w), layout, dtype, f"resnet50 b{batch}"))
            cases.append(Case("bn3d 32x16x28x28", (8, 32, 16, 28, 28), layout, dtype, "other"))
        cases.append(Case("bn1d large N", (1 << 18, 32), "contiguous", dtype, "other"))
    return cases


def quick_suite():
    return [
        Case("quick 2d", (4, 16, 14, 14), layout, dtype, "quick")
        for dtype in (torch.float32, torch.bfloat16) for layout in ("contiguous", "channels_last")
    ] + [Case("quick 1d", (512, 8), "contiguous", torch.float32, "quick"),
         Case("quick 3d", (2, 8, 4, 6, 6), "channels_last", torch.float32, "quick")]


def make_input(case, device, requires_grad=False):
    x = torch.randn(case.shape, device=device, dtype=torch.float32).to(case.dtype)
    if case.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.requires_grad_(requires_grad)


def _glibc():
    """glibc's malloc controls, or None where the C library is another."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_freed_memory():
    """glibc: serve large blocks from the heap and never trim it (see the module docstring)."""
    libc = _glibc()
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1


MODES = ("plain", "warm-allocator", "thp")


def build_description():
    """The commit of the checkout (when it is one), versions and build flags."""
    import os
    import subprocess

    info = fastnorm._ops._C.build_info()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = "unknown"
    try:
        git = ["git", "-C", root]
        commit = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        if commit != "unknown" and subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                                                  capture_output=True, text=True, timeout=10).stdout.strip():
            commit += "+changes"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": commit, "fastnorm": fastnorm.__version__, "torch": torch.__version__,
            "built_against_torch": info["torch"], "cpu_capability": info["cpu_capability"],
            "cuda_archs": info["cuda_archs"] or "none"}


def trim_heap():
    """Returns freed memory to the system between cases (glibc), so that no case starts on a
    heap shaped by the previous one; a case's own warm-up then maps what it uses."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class Timings:
    """Times of named callables measured in interleaved rounds (the order rotating each
    round), so that a drift in the machine's speed (other tenants, clocks) falls on every
    contender alike: ``ms`` the median milliseconds of each, ``ratio(a, b)`` the median over
    rounds of a's time over b's in the same round."""

    def __init__(self, fns, min_run_time, rounds=9):
        # (imported here: importing it warns on a CUDA torch without a GPU, which a usage
        # error's one line should not carry)
        from torch.utils.benchmark import Timer

        for fn in fns.values():
            fn()  # warm-up: allocations, first-call costs, compilation
        timers = {k: Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for k, fn in fns.items()}
        self.rounds = {k: [] for k in fns}
        keys = list(fns)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                self.rounds[k].append(timers[k].blocked_autorange(min_run_time=min_run_time / rounds).median)
        self.ms = {k: statistics.median(v) * 1e3 for k, v in self.rounds.items()}

    def ratio(self, a, b):
        return statistics.median(x / y for x, y in zip(self.rounds[a], self.rounds[b]))


def _torch_bn(x, rm, rv, w, b):
    return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)


def _fastnorm_bn(x, rm, rv, w, b):
    return fastnorm.functional.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)


def run_case(case, device, min_run_time, compile_torch):
    C = case.shape[1]
    pdtype = torch.float32 if case.dtype in (torch.float16, torch.bfloat16) else case.dtype
    w = torch.rand(C, device=device, dtype=pdtype).add_(0.5).requires_grad_()
    b = torch.randn(C, device=device, dtype=pdtype).requires_grad_()
    rm, rv = torch.zeros(C, device=device, dtype=pdtype), torch.ones(C, device=device, dtype=pdtype)
    x = make_input(case, device, requires_grad=True)
    g = torch.randn_like(x)
    impls = {"fastnorm": _fastnorm_bn, "torch": _torch_bn}
    if compile_torch:
        # Every case is a new shape: without a reset dynamo recompiles the same function, and
        # past its recompile limit it would quietly run torch eagerly under the "compile" name.
        torch._dynamo.reset()
        impls["compile"] = torch.compile(_torch_bn, dynamic=False)

    res = Result(case.name, list(case.shape), case.layout, str(case.dtype).replace("torch.", ""), case.group,
                 device)
    esize = x.element_size()
    res.bytes = {"fwd": 2 * x.numel() * esize, "fwd+bwd": 5 * x.numel() * esize}
    fns = {}
    for impl, fn in impls.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x, rm, rv, w, b)

        def fwd_bwd(fn=fn):
            torch.autograd.grad(fn(x, rm, rv, w, b), (x, w, b), g)

        fns[f"{impl} fwd"], fns[f"{impl} fwd+bwd"] = fwd, fwd_bwd
    src = x.detach()
    dst = torch.empty_like(src)
    fns["copy"] = lambda: dst.copy_(src)
    t = Timings(fns, min_run_time)
    res.ms = t.ms
    res.copy_ms = res.ms.pop("copy")
    res.speedup = {f"{i} {p}": t.ratio(f"{i} {p}", f"fastnorm {p}") for i in impls for p in ("fwd", "fwd+bwd")}
    return res


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def geomean(xs):
    return math.exp(sum(math.log(v) for v in xs) / len(xs)) if xs else float("nan")


def format_results(results, impls):
    """A markdown table per device, then the per-group geometric means."""
    lines = []
    for device in sorted({r.device for r in results}):
        rows = [r for r in results if r.device == device]
        head = ["case", "dtype", "layout"]
        for p in ("fwd", "fwd+bwd"):
            head += [f"{i} {p} ms" for i in impls] + [f"x vs {i} {p}" for i in impls if i != "fastnorm"]
        head += ["fwd+bwd GB/s", "% of copy"]
        lines += [f"### {device}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r.name, r.dtype, r.layout]
            for p in ("fwd", "fwd+bwd"):
                cells += [f"{r.ms[f'{i} {p}']:.3f}" for i in impls]
                cells += [f"{r.speedup[f'{i} {p}']:.2f}" for i in impls if i != "fastnorm"]
            achieved = gbps(r.bytes["fwd+bwd"], r.ms["fastnorm fwd+bwd"])
            copy_bw = gbps(r.bytes["fwd"], r.copy_ms)  # a copy moves what a forward must: read + write
            cells += [f"{achieved:.1f}", f"{100 * achieved / copy_bw:.0f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Geometric-mean speedup of fastnorm (higher is better), and the slowest case:", ""]
        groups = sorted({(r.group, r.dtype, r.layout) for r in rows})
        for grp in groups:
            sel = [r for r in rows if (r.group, r.dtype, r.layout) == grp]
            parts = []
            for i in impls:
                if i == "fastnorm":
                    continue
                for p in ("fwd", "fwd+bwd"):
                    sp = [r.speedup[f"{i} {p}"] for r in sel]
                    parts.append(f"vs {i} {p} {geomean(sp):.2f}x (min {min(sp):.2f}x)")
            lines.append(f"- {grp[0]}, {grp[1]}, {grp[2]} ({len(sel)} cases): " + "; ".join(parts))
        lines.append("")
    return "\n".join(lines)


def machine_description(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------
# Weight norm: the reparametrization materialized (against torch._weight_norm and a copy of
# the same bytes), and weight-normed layers (against the plain layer and torch's
# parametrization), forward + backward.

@dataclass
class WNResult:
    name: str
    dtype: str
    device: str
    ms: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)  # the table's ratio columns (paired, Timings.ratio)


def wn_suite(quick):
    if quick:
        return [("materialize 256x128 dim0", (256, 128), 0, torch.float32),
                ("layer linear 128->128 b8", (8, 128, 128), "linear", torch.float32)]
    return [
        ("materialize 4096x4096 dim0", (4096, 4096), 0, torch.float32),
        ("materialize 4096x4096 dim0", (4096, 4096), 0, torch.bfloat16),
        ("materialize 4096x4096 dim1", (4096, 4096), 1, torch.float32),
        ("materialize conv 512x256x3x3 dim0", (512, 256, 3, 3), 0, torch.float32),
        ("materialize 4096x4096 whole", (4096, 4096), None, torch.float32),
        ("layer linear 4096->4096 b32", (32, 4096, 4096), "linear", torch.float32),
        ("layer linear 256->256 b16", (16, 256, 256), "linear", torch.float32),
        ("layer conv 256->256 3x3 b32 14x14", (32, 256, 14), "conv", torch.float32),
    ]


def run_wn_case(case, device, min_run_time):
    import copy

    name, shape, dim, dtype = case
    res = WNResult(name, str(dtype).replace("torch.", ""), device)
    if dim in ("linear", "conv"):
        if dim == "linear":
            batch, n_in, n_out = shape
            plain = torch.nn.Linear(n_in, n_out, device=device, dtype=dtype)
            x = torch.randn(batch, n_in, device=device, dtype=dtype, requires_grad=True)
        else:
            batch, channels, size = shape
            plain = torch.nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)
            x = torch.randn(batch, channels, size, size, device=device, dtype=dtype, requires_grad=True)
        layers = {"plain": plain, "fastnorm": fastnorm.weight_norm(copy.deepcopy(plain)),
                  "torch": torch.nn.utils.parametrizations.weight_norm(copy.deepcopy(plain))}
        g = torch.randn_like(plain(x))
        fns = {f"{impl} fwd+bwd": (lambda layer=layer: torch.autograd.grad(layer(x), [x] + list(layer.parameters()), g))
               for impl, layer in layers.items()}
        t = Timings(fns, min_run_time)
        res.ms = t.ms
        res.ratios = {"x vs torch fwd+bwd": t.ratio("torch fwd+bwd", "fastnorm fwd+bwd"),
                      "fastnorm / plain": t.ratio("fastnorm fwd+bwd", "plain fwd+bwd"),
                      "torch / plain": t.ratio("torch fwd+bwd", "plain fwd+bwd")}
        return res
    v = torch.randn(shape, device=device, dtype=dtype)
    d = -1 if dim is None else dim
    gshape = [1] * len(shape)
    if d != -1:
        gshape[d] = shape[d]
    gv = torch.rand(gshape, device=device, dtype=dtype)
    impls = {"fastnorm": lambda a, b: fastnorm.functional.weight_norm(a, b, dim), "torch": lambda a, b: torch._weight_norm(a, b, d)}
    fns = {}
    for impl, fn in impls.items():
        vr, gr = v.clone().requires_grad_(), gv.clone().requires_grad_()
        gw = torch.randn_like(v)
        fns[f"{impl} fwd"] = lambda fn=fn: fn(v, gv)
        fns[f"{impl} fwd+bwd"] = lambda fn=fn, vr=vr, gr=gr, gw=gw: torch.autograd.grad(fn(vr, gr), (vr, gr), gw)
    dst = torch.empty_like(v)
    fns["copy"] = lambda: dst.copy_(v)
    t = Timings(fns, min_run_time)
    res.ms = t.ms
    res.ratios = {"x vs torch fwd": t.ratio("torch fwd", "fastnorm fwd"), "fwd / copy": t.ratio("fastnorm fwd", "copy"),
                  "x vs torch fwd+bwd": t.ratio("torch fwd+bwd", "fastnorm fwd+bwd")}
    return res


def format_wn_results(results):
    lines = []
    for device in sorted({r.device for r in results}):
        rows = [r for r in results if r.device == device]
        lines += [f"### weight norm, {device}", "",
                  "| case | dtype | fastnorm fwd ms | torch fwd ms | x vs torch | fwd / copy | fastnorm fwd+bwd ms | "
                  "torch fwd+bwd ms | x vs torch | layer: plain fwd+bwd ms | fastnorm / plain | torch / plain |",
                  "|" + "---|" * 12]
        for r in rows:
            m, q = r.ms, r.ratios
            if "plain fwd+bwd" in m:
                cells = [r.name, r.dtype, "", "", "", "", f"{m['fastnorm fwd+bwd']:.3f}", f"{m['torch fwd+bwd']:.3f}",
                         f"{q['x vs torch fwd+bwd']:.2f}", f"{m['plain fwd+bwd']:.3f}",
                         f"{q['fastnorm / plain']:.2f}", f"{q['torch / plain']:.2f}"]
            else:
                cells = [r.name, r.dtype, f"{m['fastnorm fwd']:.3f}", f"{m['torch fwd']:.3f}",
                         f"{q['x vs torch fwd']:.2f}", f"{q['fwd / copy']:.2f}",
                         f"{m['fastnorm fwd+bwd']:.3f}", f"{m['torch fwd+bwd']:.3f}",
                         f"{q['x vs torch fwd+bwd']:.2f}", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m fastnorm bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="where to run (all: the CPU, and CUDA when present)")
    p.add_argument("--quick", action="store_true", help="a few small cases (smoke test)")
    p.add_argument("--batch", type=int, default=None, help="ResNet-50 batch (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile of torch's batch norm (default: on CUDA only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="only batch-norm cases of this dtype")
    p.add_argument("--layout", choices=["contiguous", "channels_last"], help="only batch-norm cases of this layout")
    p.add_argument("--suite", choices=["all", "batch_norm", "weight_norm", "models"], default="all",
                   help="what to time: all (both op families), one op family, or models (training "
                        "steps of real models, fastnorm.model_zoo)")
    p.add_argument("--large", action="store_true", help="models: the sizes people train at (default: "
                                                        "a short size for a small CPU machine)")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the table here")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw each case's speedup over torch into this image (needs matplotlib)")
    p.add_argument("--mode", choices=MODES, default="plain", help="the process's memory setting (default: plain)")
    return p.parse_args(argv)


def _plan(args):
    """[(device, batch-norm cases, weight-norm cases, model cases)] for the command line; UsageError for
    anything that would fail or time nothing, before any case runs."""
    if args.batch is not None and args.batch <= 0:
        raise UsageError(f"--batch {args.batch}: the batch must be a positive number")
    if args.min_run_time is not None and not args.min_run_time > 0:
        raise UsageError(f"--min-run-time {args.min_run_time}: must be a positive number of seconds")
    if args.plot:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib") from None
        ext = os.path.splitext(args.plot)[1].lower().lstrip(".")
        formats = Figure().canvas.get_supported_filetypes()
        if ext and ext not in formats:
            raise UsageError(f"--plot {args.plot}: unknown image format .{ext} "
                             f"(use one of {', '.join(sorted(formats))})")
    for path, what in ((args.json, "the JSON results"), (args.markdown, "the markdown table"),
                       (args.plot, "the plot")):
        if path:
            check_writable(path, what)
    cuda = fastnorm.backends()["cuda"]
    if args.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no GPU here, or fastnorm built without CUDA")
    plan = []
    for device in ["cpu", "cuda"] if args.device == "all" else [args.device]:
        if device == "cuda" and not cuda:
            continue
        batch = args.batch or (32 if device == "cpu" else 64)
        cases, wn_cases, model_cases = [], [], []
        if args.suite == "models":
            model_cases = [c for c in model_zoo.suite("quick" if args.quick else "large" if args.large else "default")
                           if args.filter in c.name and args.layout in (None, c.layout)
                           and args.dtype in (None, str(c.dtype).replace("torch.", ""))]
            for lib in sorted({c.library for c in model_cases if c.library}):
                if importlib.util.find_spec(lib) is None:
                    raise UsageError(f"--suite models needs {lib}: pip install {lib}")
        elif args.suite != "weight_norm":
            cases = [c for c in (quick_suite() if args.quick else default_suite(batch))
                     if args.filter in c.name and args.layout in (None, c.layout)
                     and args.dtype in (None, str(c.dtype).replace("torch.", ""))]
        if args.suite in ("all", "weight_norm"):
            wn_cases = [c for c in wn_suite(args.quick) if args.filter in c[0]]
        plan.append((device, cases, wn_cases, model_cases))
    if not any(any(lists) for _, *lists in plan):
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (("filter", args.filter), ("dtype", args.dtype),
                                                                    ("layout", args.layout), ("suite", args.suite))
                         if v and not (k == "suite" and v == "all"))
        raise UsageError(f"no case matches {given or 'the command line'}"
                         f"{' in the --quick suite' if args.quick else ''}")
    return plan


def main(argv):
    args = _parse(argv)
    plan = _plan(args)
    if args.mode == "thp" and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":
        # torch reads it when it starts: run again with it set
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "fastnorm", "bench", *argv])
    heap_kept = keep_freed_memory() if args.mode == "warm-allocator" else False
    if args.mode == "warm-allocator" and not heap_kept:
        raise UsageError("--mode warm-allocator needs glibc's malloc controls, not found here")
    args.build = build_description()
    min_run_time = args.min_run_time or (0.02 if args.quick else 0.3)
    results, wn_results, model_results, impls_seen, machines = [], [], [], ["fastnorm", "torch"], {}
    for device, cases, wn_cases, model_cases in plan:
        compile_torch = args.compile if args.compile is not None else device == "cuda"
        if compile_torch and "compile" not in impls_seen:
            impls_seen.append("compile")
        machines[device] = machine_description(device)
        print(f"# {device}: {machines[device]}, {len(cases)} batch-norm cases, {len(wn_cases)} weight-norm cases, "
              f"{len(model_cases)} models, mode {args.mode}", flush=True)
        for i, case in enumerate(cases, 1):
            if heap_kept:
                trim_heap()
            r = run_case(case, device, min_run_time, compile_torch)
            results.append(r)
            print(f"  [{i}/{len(cases)}] {case.name:24s} {r.dtype:8s} {r.layout:13s} "
                  + "  ".join(f"{k} {v:.3f}ms" for k, v in r.ms.items()), flush=True)
            write_results(args, argv, results, wn_results, model_results, impls_seen, machines)
        for case in wn_cases:
            if heap_kept:
                trim_heap()
            r = run_wn_case(case, device, min_run_time)
            wn_results.append(r)
            print(f"  {r.name:34s} {r.dtype:8s} " + "  ".join(f"{k} {v:.3f}ms" for k, v in r.ms.items()),
                  flush=True)
            write_results(args, argv, results, wn_results, model_results, impls_seen, machines)
        for i, case in enumerate(model_cases, 1):
            r = run_model_case(case, device, rounds=3 if args.quick else 7)
            model_results.append(r)
            print(f"  [{i}/{len(model_cases)}] {r.name:22s} {r.config:32s} "
                  + "  ".join(f"{k} {v:.1f}ms" for k, v in r.ms.items()), flush=True)
            write_results(args, argv, results, wn_results, model_results, impls_seen, machines)
    data = write_results(args, argv, results, wn_results, model_results, impls_seen, machines, echo=True)
    if args.plot:
        from fastnorm._plot import plot_speedups

        plot_speedups(data, args.plot)
        print(f"plot: {args.plot}")
    return 0


def write_results(args, argv, results, wn_results, model_results, impls_seen, machines, echo=False):
    """The tables (printed when ``echo``) and the --markdown/--json files, from the cases so
    far; returns the results as the JSON file holds them."""
    impls = [i for i in impls_seen if all(f"{i} fwd" in r.ms for r in results)]
    table = ((format_results(results, impls) if results else "") + "\n" + format_wn_results(wn_results)
             + format_model_results(model_results))
    b = args.build
    header = (f"fastnorm {b['fastnorm']} at {b['commit']}, torch {b['torch']}, "
              f"{datetime.date.today().isoformat()}; mode {args.mode}"
              + {"plain": " (a plain process: CPU outputs on fresh pages)",
                 "warm-allocator": " (freed memory kept in the process: kernels without page faults)",
                 "thp": " (THP_MEM_ALLOC_ENABLE=1)"}[args.mode]
              + f"; build: CPU {b['cpu_capability']}, CUDA archs {b['cuda_archs']}; "
              + "; ".join(f"{d}: {m}" for d, m in machines.items()))
    data = {"header": header, "mode": args.mode, "build": b, "machines": machines,
            "command": f"python -m fastnorm bench {' '.join(argv)}", "results": [asdict(r) for r in results],
            "weight_norm": [asdict(r) for r in wn_results], "models": [asdict(r) for r in model_results]}
    if echo:
        print()
        print(header)
        print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# Benchmark\n\n{header}\n\nCommand: `{data['command']}`\n\n{table}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return data
