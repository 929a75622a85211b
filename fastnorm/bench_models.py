"""The benchmark's model suite (``python -m fastnorm bench --suite models``): whole training
steps of real models (fastnorm.model_zoo), torch's layers against the same model after
``fastnorm.convert`` (and after ``convert(..., fuse_activations=True)`` where it has batch
norms), from the same initial weights on the same batch.

A step is forward, loss, backward and an SGD step. The contenders take turns, one step each
per round (the order rotating), after warm-up steps that are not timed; a contender's time
is the median of its steps, and its speedup the median over rounds of torch's step over its
step in the same round (see bench.Timings for why paired). The first losses of all
contenders are compared, so that a speedup is never reported for a model that computes
something else.
"""
import statistics
import time
from dataclasses import dataclass, field

import torch

from . import model_zoo


@dataclass
class ModelResult:
    name: str
    config: str
    batch: int
    size: int
    device: str
    ms: dict = field(default_factory=dict)  # contender -> median ms per step
    speedup: dict = field(default_factory=dict)  # contender -> torch's step / its step (paired)
    first_loss: dict = field(default_factory=dict)  # contender -> the loss of its first step
    loss_difference: float = 0.0  # largest relative difference of a first loss from torch's


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_model_case(case, device, rounds=7, warmup=2):
    impls = model_zoo.contenders(case)
    steps = {impl: model_zoo.training_step(case, impl, device) for impl in impls}
    first = {impl: float(step()) for impl, step in steps.items()}
    for _ in range(warmup - 1):
        for step in steps.values():
            step()
    times = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            _sync(device)
            start = time.perf_counter()
            steps[impl]()
            _sync(device)
            times[impl].append(time.perf_counter() - start)
    res = ModelResult(case.name, case.config, case.batch, case.size, device)
    res.ms = {impl: statistics.median(t) * 1e3 for impl, t in times.items()}
    res.speedup = {impl: statistics.median(a / b for a, b in zip(times["torch"], times[impl]))
                   for impl in impls if impl != "torch"}
    res.first_loss = first
    res.loss_difference = max(abs(first[i] - first["torch"]) / max(abs(first["torch"]), 1e-30) for i in impls)
    return res


def format_model_results(results):
    lines = []
    for device in sorted({r.device for r in results}):
        rows = [r for r in results if r.device == device]
        lines += [f"### models, {device}: training step (forward, backward, SGD)", "",
                  "| model | config | batch | size | torch ms | fastnorm ms | x vs torch | fastnorm fused ms | "
                  "x vs torch | first-loss difference |", "|" + "---|" * 10]
        for r in rows:
            fused = ([f"{r.ms['fastnorm fused']:.1f}", f"{r.speedup['fastnorm fused']:.2f}"]
                     if "fastnorm fused" in r.ms else ["", ""])
            cells = [r.name, r.config, str(r.batch), str(r.size), f"{r.ms['torch']:.1f}", f"{r.ms['fastnorm']:.1f}",
                     f"{r.speedup['fastnorm']:.2f}", *fused, f"{r.loss_difference:.1e}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
