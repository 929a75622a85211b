"""Reliability in long runs and in parallel.

- Soak: a model with fastnorm's batch norm (fused residual and activations) and weight norm
  (Linear and Conv) trained step after step: resident memory stays flat after warm-up, and
  nothing of a step (outputs, activations, saved tensors, hence its autograd graph) outlives
  it. A short run by default, 20,000 steps with --runslow.
- Threads: copies of a model trained and evaluated from four Python threads at once give
  bitwise the results of one after another; first use from several threads in a fresh process.
- DDP: two gloo processes train a small CNN under DistributedDataParallel: fastnorm's
  BatchNorm2d against torch's trained the same way, and fastnorm's SyncBatchNorm against one
  process on the concatenated batch; uneven batches included.
- Autocast: fastnorm's modules under torch.autocast give torch's dtypes and values.
- Determinism: bitwise the same results across repeated runs and 1, 2 and 4 intra-op threads.
- Large tensors (--runslow): more than 2**31 elements, against float64 on slices.

Numbers worth quoting (memory, steps, sizes, times) are printed (pytest -s) and recorded as
user properties in the junit XML (--junitxml).
"""
import contextlib
import copy
import gc
import json
import math
import os
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import weakref
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastnorm
from conftest import DEVICES, TOLERANCES, with_layout
from fastnorm import reference

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


# ---------------------------------------------------------------------------------------
# Shared helpers

@contextlib.contextmanager
def intra_op_threads(n):
    """torch.set_num_threads(n) for the block; the previous count restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rss_bytes():
    """Resident memory of this process now (Linux /proc/self/statm), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover (not Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def report(record_property, **numbers):
    """Prints numbers worth quoting and records them in the junit XML."""
    print(" ".join(f"{k}={v}" for k, v in numbers.items()))
    for k, v in numbers.items():
        record_property(k, v)


def first_difference(a, b, what):
    """None when a and b are bitwise equal (dtype, shape, values incl. NaN), else a message."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                             and torch.equal(a.nan_to_num(), b.nan_to_num())):
        return None
    diff = (a.double() - b.double()).abs()
    return f"{what}: {int((a != b).sum())} of {a.numel()} values differ, largest by {diff.max().item():.3g}"


class TwinNet(nn.Module):
    """A small CNN built either from fastnorm's layers (activations and the residual fused
    into the batch norms, fastnorm.weight_norm) or from torch's (nn.BatchNorm, a separate
    addition and activation, torch's weight-norm parametrization). Both have the same
    parameters, buffers and state_dict keys, so one's state loads into the other."""

    def __init__(self, fast, c=8, hidden=16, classes=5):
        super().__init__()
        self.fast = fast
        BN2, BN1 = (fastnorm.BatchNorm2d, fastnorm.BatchNorm1d) if fast else (nn.BatchNorm2d, nn.BatchNorm1d)
        wn = fastnorm.weight_norm if fast else nn.utils.parametrizations.weight_norm
        act = (lambda a: {"activation": a}) if fast else (lambda a: {})
        self.conv1 = wn(nn.Conv2d(3, c, 3, padding=1))
        self.bn1 = BN2(c, **act("relu"))
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = BN2(c, **act("silu"))
        self.fc1 = wn(nn.Linear(4 * c, hidden))
        self.bn3 = BN1(hidden, **act("leaky_relu"))
        self.fc2 = wn(nn.Linear(hidden, classes), dim=1)

    def _bn(self, bn, x, activation, residual=None):
        if self.fast:
            return bn(x, residual=residual)
        y = bn(x)
        return reference.activate(y if residual is None else y + residual, activation)

    def forward(self, x):
        h = self._bn(self.bn1, self.conv1(x), "relu")
        h = self._bn(self.bn2, self.conv2(h), "silu", residual=h)
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.fc2(self._bn(self.bn3, self.fc1(h), "leaky_relu"))


def twin_pair(seed=0, **kwargs):
    """(fastnorm model, torch model) with the same initial state."""
    torch.manual_seed(seed)
    fast = TwinNet(True, **kwargs)
    slow = TwinNet(False, **kwargs)
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def make_batches(count, batch, seed, hw=8, classes=5):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, hw, hw, generator=gen) * 1.5 + 0.3,
             torch.randint(0, classes, (batch,), generator=gen)) for _ in range(count)]


def state_of(model):
    """Parameters, their gradients and buffers by name (detached copies)."""
    out = {f"param {k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"grad {k}": v.grad.detach().clone() for k, v in model.named_parameters() if v.grad is not None})
    out.update({f"buffer {k}": v.detach().clone() for k, v in model.named_buffers()})
    return out


# ---------------------------------------------------------------------------------------
# Soak: many training steps; memory flat after warm-up; nothing of a step outlives it.

class StepWatch:
    """Weak references to what one training step makes: every module's output, the loss and
    every tensor autograd saves for the backward (saved_tensors_hooks: torch's layers and
    fastnorm's C++ autograd alike). After the step, each must be dead unless it shares
    storage with a parameter, a buffer or the input batch."""

    def __init__(self, model):
        self.refs = []
        self.saved = 0
        self.handles = [m.register_forward_hook(self._output) for m in model.modules()]

    def _output(self, module, args, output):
        if isinstance(output, torch.Tensor):
            self.refs.append((f"output of {type(module).__name__}", weakref.ref(output)))

    def pack(self, t):
        self.saved += 1
        self.refs.append((f"saved tensor {tuple(t.shape)} {t.dtype}", weakref.ref(t)))
        return t

    @staticmethod
    def unpack(t):
        return t

    def alive(self, kept_storages):
        return [what for what, ref in self.refs
                if ref() is not None and ref().untyped_storage().data_ptr() not in kept_storages]

    def close(self):
        for h in self.handles:
            h.remove()


def soak(steps, warmup, batches=8, batch=16):
    """Trains TwinNet (fastnorm) for warmup + steps SGD steps; returns the numbers."""
    torch.manual_seed(0)
    model = TwinNet(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    data = make_batches(batches, batch, seed=1)
    watch = StepWatch(model)
    kept = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept |= {t.untyped_storage().data_ptr() for pair in data for t in pair}
    losses = []

    def step(i):
        x, target = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        watch.refs.clear()
        with torch.autograd.graph.saved_tensors_hooks(watch.pack, watch.unpack):
            out = model(x)
        loss = F.cross_entropy(out, target)
        watch.refs.append(("loss", weakref.ref(loss)))
        loss.backward()
        opt.step()
        losses.append(loss.item())

    try:
        for i in range(warmup):
            step(i)
        gc.collect()
        rss_before, objects_before = rss_bytes(), len(gc.get_objects())
        start = time.perf_counter()
        samples = []
        for i in range(warmup, warmup + steps):
            step(i)
            # Freed when the step's last reference goes (reference counts, no gc pass):
            alive = watch.alive(kept)
            if alive:
                gc.collect()
                still = watch.alive(kept)
                raise AssertionError(f"step {i}: {len(alive)} tensors of the step outlive it, e.g. {alive[:5]}; "
                                     + (f"{len(still)} even after gc.collect()" if still else
                                        "gc.collect() frees them (a reference cycle)"))
            if (i - warmup + 1) % max(1, steps // 10) == 0:
                samples.append(rss_bytes())
        elapsed = time.perf_counter() - start
        gc.collect()
        rss_after, objects_after = rss_bytes(), len(gc.get_objects())
    finally:
        watch.close()
    assert watch.saved > 0  # the hooks saw the saved tensors
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], (losses[0], losses[-1])
    return dict(steps=steps, warmup=warmup, rss_before_mib=round(rss_before / MiB, 2),
                rss_after_mib=round(rss_after / MiB, 2), growth_mib=round((rss_after - rss_before) / MiB, 2),
                rss_samples_mib=[round(s / MiB, 1) for s in samples], python_objects_before=objects_before,
                python_objects_after=objects_after, seconds=round(elapsed, 2),
                ms_per_step=round(elapsed / steps * 1e3, 3),
                first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4), threads=torch.get_num_threads())


# A step's activations here are 16 x 8 x 8 x 8 float32 = 32 KiB; one leaked per step over the
# short run is 9 MiB, over the long one 625 MiB.
SOAK_MAX_GROWTH = 4 * MiB


def check_soak(numbers, max_growth):
    growth = (numbers["rss_after_mib"] - numbers["rss_before_mib"]) * MiB
    assert growth <= max_growth, \
        f"resident memory grew by {growth / MiB:.1f} MiB over {numbers['steps']} steps: {numbers}"
    # Python objects: none accumulate (a few from caches are noise)
    assert numbers["python_objects_after"] - numbers["python_objects_before"] < 200, numbers


def test_soak_short(record_property):
    # One intra-op thread: a few seconds even on a busy shared 2-core machine, where OpenMP
    # barriers make two threads 10-20x slower; the long run uses the default thread count.
    with intra_op_threads(1):
        numbers = soak(steps=300, warmup=30)
    report(record_property, **{f"soak_short_{k}": v for k, v in numbers.items()})
    check_soak(numbers, SOAK_MAX_GROWTH)


@pytest.mark.slow
def test_soak_long(record_property):
    numbers = soak(steps=20_000, warmup=200)
    report(record_property, **{f"soak_long_{k}": v for k, v in numbers.items()})
    check_soak(numbers, 2 * SOAK_MAX_GROWTH)
    # and no steady climb: the last tenth of the run no higher than the second (allocator noise)
    samples = numbers["rss_samples_mib"]
    assert samples[-1] - samples[1] <= 2 * SOAK_MAX_GROWTH / MiB, samples


# ---------------------------------------------------------------------------------------
# Threads

def train_and_evaluate(model, data, eval_x, steps):
    """SGD steps on data, then an evaluation: the state and the evaluation output."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for i in range(steps):
        x, target = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(eval_x)
    state = state_of(model)
    state["eval output"] = out
    return state


def run_in_threads(fns, timeout=240):
    """Runs every fn at once, one Python thread each (started together at a barrier); their
    results in order. Exceptions are re-raised; a thread still running at the timeout fails."""
    barrier = threading.Barrier(len(fns))
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            barrier.wait()
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        pytest.fail(f"threads still running after {timeout} s (a deadlock?)")
    if errors:
        raise errors[0]
    return results


def compare_states(got, expected, what):
    problems = [first_difference(got[k], expected[k], f"{what}, {k}") for k in expected]
    assert sorted(got) == sorted(expected), what
    return [p for p in problems if p]


@pytest.mark.parametrize("threads", [1, 2], ids=lambda n: f"{n}-intra-op-threads")
def test_threads_train_and_evaluate_like_sequential(threads, record_property):
    """Four copies of one model, each with its own data, trained and evaluated one after
    another and then from four Python threads at once: bitwise the same results (same
    intra-op thread count); and a shared model evaluated from four threads at once."""
    n, steps = 4, 12
    torch.manual_seed(0)
    base = TwinNet(True)
    data = [make_batches(3, 16, seed=10 + i) for i in range(n)]
    eval_x = [make_batches(1, 16, seed=20 + i)[0][0] for i in range(n)]
    with intra_op_threads(threads):
        start = time.perf_counter()
        sequential = [train_and_evaluate(copy.deepcopy(base), data[i], eval_x[i], steps) for i in range(n)]
        t_seq = time.perf_counter() - start
        start = time.perf_counter()
        concurrent = run_in_threads([lambda i=i: train_and_evaluate(copy.deepcopy(base), data[i], eval_x[i], steps)
                                     for i in range(n)])
        t_par = time.perf_counter() - start
        # the copies really differ from each other (their data differ), so a thread mixing
        # up its copy with another's could not go unnoticed
        assert compare_states(sequential[1], sequential[0], "copy 1 vs copy 0")
        problems = [p for i in range(n) for p in compare_states(concurrent[i], sequential[i], f"thread {i}")]
        assert not problems, problems[:10]

        # one trained model shared (evaluation only) by four threads at once
        shared = copy.deepcopy(base)
        train_and_evaluate(shared, data[0], eval_x[0], 2)
        one_by_one = []
        with torch.no_grad():
            for x in eval_x:
                one_by_one.append(shared(x))
        at_once = run_in_threads([lambda x=x: shared(x).detach() for x in eval_x])
        problems = [first_difference(a, b, f"shared model, thread {i}")
                    for i, (a, b) in enumerate(zip(at_once, one_by_one))]
        assert not any(problems), problems
    report(record_property, **{f"threads_{threads}_sequential_s": round(t_seq, 2),
                               f"threads_{threads}_concurrent_s": round(t_par, 2)})


COLD_START = textwrap.dedent(r"""
    # Fresh process: fastnorm imported, none of its ops called yet. Several Python threads
    # make their first calls at the same moment; then the same work again, one call after
    # another, must give bitwise the same results.
    import json, sys, threading
    import torch
    from torch import nn
    import fastnorm

    def work(k):
        gen = torch.Generator().manual_seed(k)
        out = []
        for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16):
            pdtype = torch.float64 if dtype == torch.float64 else torch.float32
            for cl in (False, True):
                x = (torch.randn(4, 6, 5, 7, generator=gen) * 2 + 1).to(dtype)
                r = torch.randn(4, 6, 5, 7, generator=gen).to(dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                    r = r.contiguous(memory_format=torch.channels_last)
                x.requires_grad_()
                act = ("relu", "silu", "leaky_relu", None)[k % 4]
                bn = fastnorm.BatchNorm2d(6, activation=act, dtype=pdtype)
                y = bn(x, residual=r)
                y.backward(torch.ones_like(y))
                out += [y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]
                bn.eval()
                out.append(bn(x.detach(), residual=r))
            v = torch.randn(12, 5, 3, generator=gen).to(dtype).requires_grad_()
            for dim in (0, 1, None):
                g = torch.rand([12, 1, 1] if dim == 0 else [1, 5, 1] if dim == 1 else [], generator=gen).to(dtype) + 0.5
                g.requires_grad_()
                w = fastnorm.functional.weight_norm(v, g, dim)
                w.backward(torch.ones_like(w))
                out += [w, v.grad.clone(), g.grad]
        model = nn.Sequential(fastnorm.weight_norm(nn.Conv2d(3, 8, 3)), fastnorm.BatchNorm2d(8, activation="relu"),
                              nn.Flatten(), fastnorm.weight_norm(nn.Linear(8 * 36, 512)), fastnorm.BatchNorm1d(512),
                              fastnorm.weight_norm(nn.Linear(512, 1024)),  # large: the output-scaled path
                              fastnorm.MeanOnlyBatchNorm1d(1024), fastnorm.SyncBatchNorm(1024, activation="silu"))
        with torch.no_grad():  # (construction drew from torch's global generator, shared by the threads)
            for p in model.parameters():
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if p.dim() == 1 or p.shape[1:].numel() == 1
                        else torch.randn(p.shape, generator=gen) * 0.2)
        x = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True)
        y = model(x)
        y.square().sum().backward()
        out += [y, x.grad] + [p.grad for p in model.parameters()] + list(model.buffers())
        bn3 = fastnorm.BatchNorm3d(3)
        out.append(bn3(torch.randn(2, 3, 4, 4, 4, generator=gen)))
        out.append(fastnorm.functional.batch_norm(torch.randn(9, 3, 11, generator=gen), None, None, training=True,
                                                  activation="silu"))
        return [t.detach().clone() for t in out]

    n = int(sys.argv[1])
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []
    def run(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
    if errors:
        print(json.dumps({"errors": errors})); sys.exit(1)
    mismatches = []
    for i in range(n):
        again = work(i)
        for j, (a, b) in enumerate(zip(results[i], again)):
            if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a.nan_to_num(), b.nan_to_num()):
                mismatches.append(f"thread {i}, result {j}: {tuple(a.shape)} {a.dtype}")
    print(json.dumps({"threads": n, "results_per_thread": len(results[0]), "mismatches": mismatches,
                      "intra_op_threads": torch.get_num_threads()}))
    sys.exit(1 if mismatches else 0)
""")


def test_first_use_from_threads_in_a_fresh_process(record_property):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", COLD_START, "6"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the fresh process did not finish within 240 s (a deadlock?)")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, \
        f"exit code {proc.returncode}\nstdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-3000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["threads"] == 6 and summary["results_per_thread"] > 100 and not summary["mismatches"], summary
    report(record_property, cold_start_threads=summary["threads"],
           cold_start_results_per_thread=summary["results_per_thread"], cold_start_s=round(elapsed, 2))


# ---------------------------------------------------------------------------------------
# DistributedDataParallel on gloo

WORLD = 2
DDP_STEPS = 24
# per-step batch of each rank: even, then uneven (the dataset's last batches), the last
# step's batches uneven as DistributedSampler(drop_last=False) would leave them
DDP_SPLITS = [[8, 8]] * (DDP_STEPS - 3) + [[8, 3], [2, 7], [6, 5]]
DDP_CASES = {
    "bn-float32": dict(sync=False, dtype=torch.float32, channels_last=False),
    "bn-float32-channels_last": dict(sync=False, dtype=torch.float32, channels_last=True),
    "sync-float64": dict(sync=True, dtype=torch.float64, channels_last=False),
    "sync-float32-channels_last": dict(sync=True, dtype=torch.float32, channels_last=True),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_global_batches():
    """Every step's global batch (the ranks' batches concatenated in rank order)."""
    gen = torch.Generator().manual_seed(4321)
    return [(torch.randn(sum(s), 3, 8, 8, generator=gen, dtype=torch.float64) * 1.5 + 0.3,
             torch.randint(0, 5, (sum(s),), generator=gen)) for s in DDP_SPLITS]


def local_batch(batches, step, rank, dtype, channels_last):
    x, target = batches[step]
    start = sum(DDP_SPLITS[step][:rank])
    sl = slice(start, start + DDP_SPLITS[step][rank])
    x = x[sl].to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, target[sl]


def ddp_train(model, batches, rank, world, case, sync, average_grads=False):
    """DDP_STEPS SGD steps; the loss is each rank's mean (plain DDP), or, with
    SyncBatchNorm, each rank's share of the global mean times the world size (DDP averages
    the gradients), so that the gradients are those of the concatenated batch.
    average_grads: the gradients averaged over the group here, as DDP does."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(DDP_STEPS):
        x, target = local_batch(batches, step, rank, case["dtype"], case["channels_last"])
        opt.zero_grad(set_to_none=True)
        out = model(x)
        if sync:
            loss = F.cross_entropy(out, target, reduction="sum") * world / sum(DDP_SPLITS[step])
        else:
            loss = F.cross_entropy(out, target)
        loss.backward()
        if average_grads:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    torch.set_num_threads(1)  # the two processes share the machine's cores
    try:
        batches = ddp_global_batches()
        results = {}
        for name, case in DDP_CASES.items():
            fast, slow = twin_pair(seed=7)
            fast, slow = fast.to(case["dtype"]), slow.to(case["dtype"])
            if case["sync"]:
                fast = fastnorm.SyncBatchNorm.convert_sync_batchnorm(fast)
                assert sum(isinstance(m, fastnorm.SyncBatchNorm) for m in fast.modules()) == 3
            res = {}
            try:  # (an error in one case is that case's result; the others still run)
                for which, model in (("fast", fast), ("torch", slow)) if not case["sync"] else (("fast", fast),):
                    if case["sync"]:
                        # DDP refuses every torch.nn.SyncBatchNorm (fastnorm's subclasses it) in a
                        # CPU module: the gradients are averaged over the group here, as DDP does.
                        try:
                            nn.parallel.DistributedDataParallel(model)
                            res["ddp refused"] = False
                        except ValueError:
                            res["ddp refused"] = True
                        res[f"{which} losses"] = ddp_train(model, batches, rank, world, case, True, average_grads=True)
                    else:
                        ddp = nn.parallel.DistributedDataParallel(model)
                        res[f"{which} losses"] = ddp_train(ddp, batches, rank, world, case, False)
                    res[which] = state_of(model)
                    model.eval()
                    with torch.no_grad():
                        x0 = local_batch(batches, 0, rank, case["dtype"], case["channels_last"])[0]
                        res[f"{which} eval"] = model(x0)
            except Exception:  # noqa: BLE001
                res = {"error": traceback.format_exc()}
            results[name] = res
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    ctx = mp.spawn(ddp_worker, args=(WORLD, free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 300 s")
    print(f"DDP: {WORLD} gloo processes, {len(DDP_CASES)} cases x {DDP_STEPS} steps "
          f"in {time.perf_counter() - start:.1f} s")
    return [torch.load(out_dir / f"{rank}.pt") for rank in range(WORLD)]


def ddp_tolerance(dtype):
    # After 24 SGD steps (lr 0.1, momentum 0.9) float32 rounding differences grow past one
    # step's rounding; float64 stays tight.
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", [n for n, c in DDP_CASES.items() if not c["sync"]])
def test_ddp_batchnorm2d_matches_torch(ddp_results, name):
    """fastnorm's BatchNorm2d (fused residual/activation) and weight norm under DDP against
    torch's nn.BatchNorm2d and weight norm under DDP, trained on the same data: every
    parameter, gradient (the last, uneven, step's) and buffer, on every rank."""
    tol = ddp_tolerance(DDP_CASES[name]["dtype"])
    for rank, results in enumerate(ddp_results):
        res = results[name]
        assert "error" not in res, f"rank {rank}: {res['error']}"
        assert sorted(res["fast"]) == sorted(res["torch"])
        for key, expected in res["torch"].items():
            torch.testing.assert_close(res["fast"][key], expected, **tol, msg=lambda m: f"rank {rank}, {key}: {m}")
        torch.testing.assert_close(res["fast losses"], res["torch losses"], **tol)
        torch.testing.assert_close(res["fast eval"], res["torch eval"], **tol)
        assert res["fast"]["buffer bn1.num_batches_tracked"].item() == DDP_STEPS
    # DDP keeps the replicas' parameters bitwise equal
    for key in ddp_results[0][name]["fast"]:
        if key.startswith(("param", "grad")):
            assert torch.equal(ddp_results[0][name]["fast"][key], ddp_results[1][name]["fast"][key]), key


@pytest.mark.parametrize("name", [n for n, c in DDP_CASES.items() if c["sync"]])
def test_ddp_sync_batchnorm_matches_one_process(ddp_results, name):
    """fastnorm.SyncBatchNorm trained on two gloo processes (gradients averaged as DDP does:
    DDP itself refuses any torch.nn.SyncBatchNorm in a CPU module, torch's rule) against
    torch's nn.BatchNorm in one process on the concatenated batches (uneven ones included):
    parameters, the last step's gradients, running statistics, the losses and the
    evaluation output."""
    case = DDP_CASES[name]
    tol = ddp_tolerance(case["dtype"])
    for rank, results in enumerate(ddp_results):
        assert "error" not in results[name], f"rank {rank}: {results[name]['error']}"
        assert results[name]["ddp refused"], "DDP now takes SyncBatchNorm on the CPU: train the case under DDP"
    _, model = twin_pair(seed=7)
    model = model.to(case["dtype"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = ddp_global_batches()
    losses = []
    for step in range(DDP_STEPS):
        x, target = batches[step]
        x = x.to(case["dtype"])
        if case["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    expected = state_of(model)
    for rank, results in enumerate(ddp_results):
        got = results[name]["fast"]
        assert sorted(got) == sorted(expected)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, **tol, msg=lambda m: f"rank {rank}, {key}: {m}")
    # each rank's loss is its share of the global mean (times the world size)
    torch.testing.assert_close(sum(r[name]["fast losses"] for r in ddp_results) / WORLD, torch.stack(losses), **tol)
    model.eval()
    with torch.no_grad():
        x0 = batches[0][0].to(case["dtype"])
        expected_eval = model(x0.contiguous(memory_format=torch.channels_last) if case["channels_last"] else x0)
    torch.testing.assert_close(torch.cat([r[name]["fast eval"] for r in ddp_results]), expected_eval, **tol)


# ---------------------------------------------------------------------------------------
# Autocast

AUTOCAST = [(d, dt) for d in DEVICES for dt in ((torch.bfloat16,) if d == "cpu" else (torch.float16, torch.bfloat16))]


def close_in(dtype, got, expected, what):
    """Within dtype's tolerance (TOLERANCES), scaled by the tensor's largest value: results
    that went through a low-precision op (rounded there) on both sides."""
    tol = TOLERANCES[dtype]
    err = (got.double() - expected.double()).abs().max().item() if got.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= tol["atol"] + tol["rtol"] * scale, f"{what}: error {err:.3g} (largest value {scale:.3g})"


def compare_under_autocast(fast, slow, inputs, device, dtype, what):
    """Runs both modules forward and backward under autocast (same inputs) and compares the
    outputs' dtypes and values, then every parameter's, gradient's and buffer's."""
    outs = {}
    for name, module in (("fast", fast), ("torch", slow)):
        xs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        with torch.autocast(device, dtype=dtype):
            y = module(*xs)
        y.float().square().mean().backward()
        outs[name] = (y, [t.grad for t in xs])
    (y, gx), (y_ref, gx_ref) = outs["fast"], outs["torch"]
    assert y.dtype == y_ref.dtype, f"{what}: output dtype {y.dtype}, torch's {y_ref.dtype}"
    close_in(dtype, y, y_ref, f"{what}: output")
    for i, (a, b) in enumerate(zip(gx, gx_ref)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype, f"{what}: input {i}'s gradient dtype {a.dtype}, torch's {b.dtype}"
            close_in(dtype, a, b, f"{what}: input {i}'s gradient")
    got, expected = state_of(fast), state_of(slow)
    assert sorted(got) == sorted(expected), what
    for key in expected:
        assert got[key].dtype == expected[key].dtype, \
            f"{what}: {key} dtype {got[key].dtype}, torch's {expected[key].dtype}"
        close_in(dtype, got[key], expected[key], f"{what}: {key}")


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_model(device, dtype, train):
    """The whole TwinNet (conv, batch norms with fused residual and activations, weight-normed
    Linear and Conv) under autocast: fastnorm's against torch's."""
    fast, slow = twin_pair(seed=3)
    x = make_batches(1, 16, seed=5)[0][0]
    if not train:  # evaluation with trained running statistics
        for m in (fast, slow):
            with torch.no_grad():
                m(x * 0.7 + 0.2)
            m.eval()
    compare_under_autocast(fast.to(device), slow.to(device), [x.to(device)], device, dtype,
                           f"TwinNet {'train' if train else 'eval'}")


class ConvThenBN(nn.Module):
    """An op that autocast lowers (conv / linear), then the batch norm (residual from a second
    such op), or the batch norm straight on the float32 input (no lowering)."""

    def __init__(self, bn, ndim, channels, activation, residual, lowered):
        super().__init__()
        make = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
        self.op = make[ndim](channels, channels, 1) if ndim else nn.Linear(channels, channels)
        self.op2 = make[ndim](channels, channels, 1) if ndim else nn.Linear(channels, channels)
        self.bn, self.activation, self.residual, self.lowered = bn, activation, residual, lowered

    def forward(self, x):
        h = self.op(x) if self.lowered else x
        r = (self.op2(x) if self.lowered else x * 0.5) if self.residual else None
        if hasattr(self.bn, "activation"):  # fastnorm's: fused
            return self.bn(h, residual=r)
        y = self.bn(h)
        return reference.activate(y if r is None else y + r, self.activation)


AUTOCAST_BN = [  # module, input shape, ndim of the conv (0: Linear)
    ("BatchNorm1d", (16, 12), 0), ("BatchNorm1d", (6, 12, 10), 1), ("BatchNorm2d", (4, 12, 6, 5), 2),
    ("BatchNorm3d", (2, 12, 3, 4, 5), 3)]


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("cls,shape,ndim", AUTOCAST_BN, ids=[c[0] + "-" + str(len(c[1])) + "d" for c in AUTOCAST_BN])
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", True), ("silu", False), ("leaky_relu", True)])
@pytest.mark.parametrize("lowered", [True, False], ids=["after-conv", "float32-input"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_batch_norm(device, dtype, cls, shape, ndim, activation, residual, lowered, train):
    torch.manual_seed(0)
    C = shape[1]
    fast_bn = getattr(fastnorm, cls)(C, activation=activation)
    slow_bn = getattr(nn, cls)(C)
    with torch.no_grad():
        fast_bn.weight.uniform_(0.5, 1.5)
        fast_bn.bias.normal_()
        fast_bn.running_mean.normal_()
        fast_bn.running_var.uniform_(0.5, 2)
    slow_bn.load_state_dict(fast_bn.state_dict())
    fast = ConvThenBN(fast_bn, ndim, C, activation, residual, lowered)
    slow = ConvThenBN(slow_bn, ndim, C, activation, residual, lowered)
    slow.load_state_dict(fast.state_dict())
    fast.train(train), slow.train(train)
    x = torch.randn(shape) * 2 + 0.5
    compare_under_autocast(fast.to(device), slow.to(device), [x.to(device)], device, dtype,
                           f"{cls} {activation} residual={residual}")


AUTOCAST_WN = [  # layer, input shape; the large ones take the output-scaled path on the CPU
    ("Linear(24, 16)", lambda: nn.Linear(24, 16), (8, 24)),
    ("Linear(1024, 256), batch 8", lambda: nn.Linear(1024, 256), (8, 1024)),
    ("Conv2d(6, 8, 3)", lambda: nn.Conv2d(6, 8, 3), (2, 6, 7, 7)),
    ("Conv2d(256, 128, 3), 2x2 output", lambda: nn.Conv2d(256, 128, 3), (1, 256, 4, 4)),
]


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("name,make,shape", AUTOCAST_WN, ids=[c[0] for c in AUTOCAST_WN])
@pytest.mark.parametrize("dim", [0, 1])
def test_autocast_weight_norm(device, dtype, name, make, shape, dim):
    """fastnorm.weight_norm against torch's parametrization under autocast: output dtype
    and values, and the dtypes and values of g's, v's, the bias's and the input's gradients."""
    torch.manual_seed(0)
    layer = make()
    fast = fastnorm.weight_norm(copy.deepcopy(layer), dim=dim)
    slow = nn.utils.parametrizations.weight_norm(copy.deepcopy(layer), dim=dim)
    x = torch.randn(shape)
    compare_under_autocast(fast.to(device), slow.to(device), [x.to(device)], device, dtype, f"{name}, dim {dim}")


# ---------------------------------------------------------------------------------------
# Determinism: repeated runs and 1, 2 and 4 intra-op threads

THREAD_COUNTS = (1, 2, 4, 1)  # the last repeats the first


def bitwise_across_threads(run):
    """run() under every thread count of THREAD_COUNTS (then the original count back):
    differences from the first run, as messages."""
    results = []
    for n in THREAD_COUNTS:
        with intra_op_threads(n):
            results.append(run())
    problems = []
    for n, res in zip(THREAD_COUNTS[1:], results[1:]):
        for key in res:
            p = first_difference(res[key], results[0][key], f"{n} threads vs 1: {key}")
            if p:
                problems.append(p)
    return problems


# many channels; few channels with big planes; (N, C); (N, C, L); (N, C, D, H, W)
BN_SHAPES = [(8, 32, 20, 20), (16, 3, 48, 48), (2048, 48), (6, 5, 3001), (2, 6, 8, 16, 16)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batch_norm_deterministic_across_runs_and_threads(shape, layout, dtype, train):
    old = torch.get_num_threads()
    C = shape[1]
    gen = torch.Generator().manual_seed(11)
    x = with_layout((torch.randn(shape, generator=gen) * 3 + 1).to(dtype), layout)
    r = with_layout(torch.randn(shape, generator=gen).to(dtype), layout)
    g = with_layout(torch.randn(shape, generator=gen).to(dtype), layout)
    params = [torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen),
              torch.randn(C, generator=gen), torch.rand(C, generator=gen) + 0.5]
    cls = {2: fastnorm.BatchNorm1d, 3: fastnorm.BatchNorm1d, 4: fastnorm.BatchNorm2d,
           5: fastnorm.BatchNorm3d}[len(shape)]

    def run():
        bn = cls(C, activation="silu").train(train)
        with torch.no_grad():
            for t, value in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), params):
                t.copy_(value)
        xs, rs = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
        y = bn(xs, residual=rs)
        y.backward(g)
        return {"output": y, "grad input": xs.grad, "grad residual": rs.grad, "grad weight": bn.weight.grad,
                "grad bias": bn.bias.grad, "running_mean": bn.running_mean, "running_var": bn.running_var}

    problems = bitwise_across_threads(run)
    assert torch.get_num_threads() == old
    assert not problems, problems


# A classifier head (fewer slices than 4x the threads); slices around that count for 4 threads;
# square-ish; short rows; a conv; runs longer than a shared piece, with an outer dimension.
WN_SHAPES = [(6, 4096), (12, 4096), (1024, 256), (4096, 32), (64, 32, 3, 3), (2, 6, 70000)]
WN_DETERMINISM_CASES = [
    pytest.param(shape, dtype, dim, id=f"{shape}-{dtype}-{dim}")
    for shape in WN_SHAPES for dtype in (torch.float32, torch.bfloat16) for dim in (0, 1)
]


@pytest.mark.parametrize("shape,dtype,dim", WN_DETERMINISM_CASES)
def test_weight_norm_deterministic_across_runs_and_threads(shape, dtype, dim):
    old = torch.get_num_threads()
    gen = torch.Generator().manual_seed(12)
    v = torch.randn(shape, generator=gen).to(dtype)
    gshape = [1] * len(shape)
    gshape[dim] = shape[dim]
    g = (torch.rand(gshape, generator=gen) + 0.5).to(dtype)
    gw = torch.randn(shape, generator=gen).to(dtype)

    def run():
        vs, gs = v.clone().requires_grad_(), g.clone().requires_grad_()
        w = fastnorm.functional.weight_norm(vs, gs, dim)
        w.backward(gw)
        return {"w": w, "grad v": vs.grad, "grad g": gs.grad}

    problems = bitwise_across_threads(run)
    assert torch.get_num_threads() == old
    assert not problems, problems


# ---------------------------------------------------------------------------------------
# Large tensors: more than 2**31 elements on the CPU (bfloat16, about 4.5 GiB a tensor; the
# peak stays near two such tensors).

class GradientProbe(torch.autograd.Function):
    """loss = GradientProbe.apply(out, grad): a zero whose backward hands ``grad`` to out's
    graph. It keeps no reference to ``out``, so out can be freed before the backward."""

    @staticmethod
    def forward(ctx, out, grad):
        ctx.grad = grad
        return out.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.grad, None


BIG = 2**31 + 2**28  # elements: 2.4e9, an eighth past 2**31 (not just its last few values)
CHUNK = 2**24


def channel_chunks(x, c):
    """Channel c of x (N, C, H, W) in blocks of about CHUNK values: (sample, rows, block in
    float64)."""
    N, _, H, W = x.shape
    step = max(1, CHUNK // W)
    for i in range(N):
        for r in range(0, H, step):
            rows = slice(r, min(H, r + step))
            yield i, rows, x[i, c, rows].double()


def channel_moments(x, c):
    """Channel c's count, mean and M2 in float64 (two passes, chunk by chunk)."""
    n, total = 0, 0.0
    for _, _, block in channel_chunks(x, c):
        n += block.numel()
        total += block.sum().item()
    mean = total / n
    m2 = sum((block - mean).square().sum().item() for _, _, block in channel_chunks(x, c))
    return n, mean, m2


def check_slices(got, expected_fn, x, c, what, per_tensor=False):
    """got[i, c, rows] against expected_fn(i, rows) (float64) within the bfloat16 tolerance
    on the first rows of the first sample and the last rows of the last sample (the end of
    the tensor, past 2**31 for the last channel)."""
    tol = TOLERANCES[torch.bfloat16]
    N, _, H, _ = x.shape
    for i, rows in ((0, slice(0, 4)), (N - 1, slice(H - 4, H))):
        expected = expected_fn(i, rows)
        err = (got[i, c, rows].double() - expected).abs()
        scale = expected.abs().max().item() if per_tensor else 1.0
        ok = err <= tol["atol"] * scale + tol["rtol"] * expected.abs()
        assert ok.all(), f"{what}, channel {c}, sample {i}: off by up to {err.max().item():.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_more_than_2_pow_31_elements(layout, record_property):
    """BatchNorm2d on a bfloat16 (2, 3, 20000, 20132) input, 2.4e9 elements (4.5 GiB),
    forward and backward; channels 0 and 2 (which ends past 2**31) against float64: running
    statistics, the output's values on slices and its mean and variance over the whole
    channel, the parameters' gradients and the input's gradient on slices. The peak stays
    near two such tensors (input and output, then input and its gradient)."""
    N, C, H = 2, 3, 20000
    W = BIG // (N * C * H)
    shape = (N, C, H, W)
    assert N * C * H * W > 2**31
    start = time.perf_counter()
    # x and the output's gradient share one storage, the gradient one channel further on (a
    # plane, or one element in channels_last): a dense gradient that varies inside a channel,
    # without a third large tensor (a gradient with zero strides, e.g. expanded, would be
    # copied by the backward). Channel 2 has a large mean; its gradient, and the gradient
    # taken from it (channel 1's), are paired with zero-mean data: the float32 rounding of a
    # large mean times a large gradient sum would otherwise swamp the weight's gradient (in
    # torch as well).
    numel, offset = N * C * H * W, 1 if layout == "channels_last" else H * W
    base = torch.empty(numel + offset, dtype=torch.bfloat16).normal_()
    if layout == "channels_last":
        x = base[:numel].view(N, H, W, C).permute(0, 3, 1, 2)
        grad_out = base[offset:].view(N, H, W, C).permute(0, 3, 1, 2)
    else:
        x, grad_out = base[:numel].view(shape), base[offset:].view(shape)
    # channels of different scales and means (a large one), in one pass in memory order
    x.mul_(torch.tensor([1.0, 2.0, 0.25], dtype=x.dtype).view(1, C, 1, 1))
    x.add_(torch.tensor([0.0, 0.0, 40.0], dtype=x.dtype).view(1, C, 1, 1))
    x.requires_grad_()
    xd = x.detach()
    t_fill = time.perf_counter() - start

    bn = fastnorm.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.25, -1.0, 0.0]))
    start = time.perf_counter()
    y = bn(x)
    t_forward = time.perf_counter() - start
    assert y.shape == shape and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    start = time.perf_counter()
    stats = {}
    for c in (0, C - 1):
        n, mean, m2 = channel_moments(xd, c)
        invstd = 1 / (m2 / n + bn.eps) ** 0.5
        stats[c] = (n, mean, invstd)
        torch.testing.assert_close(bn.running_mean[c].item(), 0.1 * mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var[c].item(), 0.9 + 0.1 * m2 / (n - 1), rtol=1e-5, atol=1e-6)
        w, b = bn.weight[c].item(), bn.bias[c].item()
        check_slices(y.detach(), lambda i, rows: (xd[i, c, rows].double() - mean) * invstd * w + b, xd, c, "output")
        # every value of the channel written: its mean is b and its variance w**2
        yn, y_mean, y_m2 = channel_moments(y.detach(), c)
        assert abs(y_mean - b) < 1e-2 * max(1.0, abs(w)), (c, y_mean, b)
        assert abs(y_m2 / yn - w * w) < 2e-2 * w * w, (c, y_m2 / yn, w * w)
    t_reference = time.perf_counter() - start

    loss = GradientProbe.apply(y, grad_out)
    del y  # (the backward without an activation does not need it: freed now)
    start = time.perf_counter()
    loss.backward()
    t_backward = time.perf_counter() - start
    for c, (n, mean, invstd) in stats.items():
        sum_g = sum_g_xmu = abs_g = abs_g_xmu = 0.0
        for (_, _, xs), (_, _, gs) in zip(channel_chunks(xd, c), channel_chunks(grad_out, c)):
            sum_g += gs.sum().item()
            abs_g += gs.abs().sum().item()
            sum_g_xmu += (gs * (xs - mean)).sum().item()
            abs_g_xmu += (gs * (xs - mean)).abs().sum().item()
        w = bn.weight[c].item()
        # sums of 8e8 terms: within 1e-6 of the sums of their magnitudes (plus, for the
        # weight, the float32 rounding of the mean times the gradient's sum)
        torch.testing.assert_close(bn.bias.grad[c].item(), sum_g, rtol=0, atol=1e-6 * abs_g)
        torch.testing.assert_close(bn.weight.grad[c].item(), sum_g_xmu * invstd, rtol=0,
                                   atol=(1e-6 * abs_g_xmu + 1.2e-7 * abs(mean * sum_g)) * invstd)
        print(f"channel {c}: grad bias {bn.bias.grad[c].item():.6g} (float64 {sum_g:.6g}), grad weight "
              f"{bn.weight.grad[c].item():.6g} (float64 {sum_g_xmu * invstd:.6g})")

        def expected_grad(i, rows):
            xs, gs = xd[i, c, rows].double(), grad_out[i, c, rows].double()
            return w * invstd * (gs - sum_g / n - (xs - mean) * invstd**2 * sum_g_xmu / n)

        check_slices(x.grad, expected_grad, xd, c, "grad input", per_tensor=True)
    report(record_property, **{f"big_bn_{layout}_shape": str(shape), f"big_bn_{layout}_elements": x.numel(),
                               f"big_bn_{layout}_fill_s": round(t_fill, 1),
                               f"big_bn_{layout}_forward_s": round(t_forward, 1),
                               f"big_bn_{layout}_float64_reference_s": round(t_reference, 1),
                               f"big_bn_{layout}_backward_s": round(t_backward, 1),
                               f"big_bn_{layout}_peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)})


@pytest.mark.slow
@pytest.mark.parametrize("dim", [0, 1])
def test_weight_norm_more_than_2_pow_31_elements(dim, record_property):
    """v with more than 2**31 elements, dim 0 (three rows of 800M values, the last past 2**31)
    and dim 1 (32 columns of 75M values). The gradient of w is v shifted by one element (a
    view of the same storage: no third large tensor), so grad_v is not zero."""
    shape = (3, BIG // 3) if dim == 0 else (BIG // 32, 32)
    numel = shape[0] * shape[1]
    assert numel > 2**31
    start = time.perf_counter()
    base = torch.empty(numel + 1, dtype=torch.bfloat16).normal_()
    v = base[:-1].view(shape).requires_grad_()
    grad_w = base[1:].view(shape)
    gshape = [1, 1]
    gshape[dim] = shape[dim]
    g = (torch.rand(gshape) + 0.5).bfloat16().requires_grad_()
    t_fill = time.perf_counter() - start

    start = time.perf_counter()
    w = fastnorm.functional.weight_norm(v, g, dim)
    t_forward = time.perf_counter() - start
    assert w.shape == shape and w.dtype == torch.bfloat16

    # per-slice sums in float64, chunk by chunk: ||v||^2 and sum(grad_w * v)
    slices = shape[dim]
    sq, gv = torch.zeros(slices, dtype=torch.float64), torch.zeros(slices, dtype=torch.float64)
    flat = base.detach()
    if dim == 0:
        K = shape[1]
        for d in range(slices):
            for s in range(0, K, CHUNK):
                e = min(K, s + CHUNK)
                vs = flat[d * K + s:d * K + e].double()
                gs = flat[d * K + s + 1:d * K + e + 1].double()
                sq[d] += vs.square().sum()
                gv[d] += (vs * gs).sum()
    else:
        rows = CHUNK // 32
        for s in range(0, shape[0], rows):
            e = min(shape[0], s + rows)
            vs = flat[s * 32:e * 32].double().view(-1, 32)
            gs = flat[s * 32 + 1:e * 32 + 1].double().view(-1, 32)
            sq += vs.square().sum(0)
            gv += (vs * gs).sum(0)
    norm = sq.sqrt()
    gd = g.detach().double().reshape(-1)
    tol = TOLERANCES[torch.bfloat16]

    def slice_at(t, part):
        """The first and last few thousand values (the last ones past 2**31)."""
        return t[:, :4096] if dim == 0 and part == 0 else t[:, -4096:] if dim == 0 else \
            t[:128] if part == 0 else t[-128:]

    def per_slice(vec, part):
        return vec.view(-1, 1) if dim == 0 else vec.view(1, -1)

    for part in (0, 1):
        vs = slice_at(v.detach(), part).double()
        expected = vs * per_slice(gd / norm, part)
        err = (slice_at(w.detach(), part).double() - expected).abs()
        assert (err <= tol["atol"] + tol["rtol"] * expected.abs()).all(), f"w off by up to {err.max().item():.3g}"
    loss = GradientProbe.apply(w, grad_w)
    del w  # (the backward needs v, g and the norms only: freed now)
    start = time.perf_counter()
    loss.backward()
    t_backward = time.perf_counter() - start
    assert torch.equal(base[1:].view(shape), grad_w)  # nothing written over the incoming gradient's storage
    # grad_g = sum(grad_w * v) / ||v||; grad_v = g / ||v|| * (grad_w - v * sum(grad_w * v) / ||v||^2)
    torch.testing.assert_close(g.grad.double().reshape(-1), gv / norm, rtol=1e-2, atol=1e-2)
    for part in (0, 1):
        vs = slice_at(v.detach(), part).double()
        gs = slice_at(grad_w, part).double()
        expected = per_slice(gd / norm, part) * (gs - vs * per_slice(gv / norm**2, part))
        got = slice_at(v.grad, part).double()
        err = (got - expected).abs()
        scale = expected.abs().max().item()
        assert (err <= tol["atol"] * scale + tol["rtol"] * expected.abs()).all(), \
            f"grad v off by up to {err.max().item():.3g} (largest {scale:.3g})"
    report(record_property, **{f"big_wn_dim{dim}_shape": str(shape), f"big_wn_dim{dim}_elements": numel,
                               f"big_wn_dim{dim}_fill_s": round(t_fill, 1),
                               f"big_wn_dim{dim}_forward_s": round(t_forward, 1),
                               f"big_wn_dim{dim}_backward_s": round(t_backward, 1),
                               f"big_wn_dim{dim}_peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)})
