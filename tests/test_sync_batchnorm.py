"""SyncBatchNorm in 2 gloo processes on 127.0.0.1 against single-process batch norm on the
concatenated batch: outputs, all gradients and running statistics."""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastnorm
from fastnorm import reference

C = 5
SHAPE = (C, 4, 3)  # per sample


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(total, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(total, *SHAPE, generator=gen, dtype=dtype) * 2 + 1
    r = torch.randn(total, *SHAPE, generator=gen, dtype=dtype)
    g = torch.randn(total, *SHAPE, generator=gen, dtype=dtype)
    w = torch.rand(C, generator=gen, dtype=dtype) + 0.5
    b = torch.randn(C, generator=gen, dtype=dtype)
    return x, r, g, w, b


def worker(rank, world, port, sizes, case, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        x, r, g, w, b = global_batch(sum(sizes))
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        bn = fastnorm.SyncBatchNorm(C, momentum=case["momentum"], activation=case["activation"], dtype=torch.float64)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
        result = {"out": [], "gx": [], "gr": [], "gw": [], "gb": []}
        for step in range(2):
            xs = (x[sl] + step).clone()
            if case["channels_last"]:
                xs = xs.contiguous(memory_format=torch.channels_last)
            xs.requires_grad_()
            rs = r[sl].clone().requires_grad_()
            out = bn(xs, residual=rs)
            (out * g[sl]).sum().backward()
            for k, v in (("out", out), ("gx", xs.grad), ("gr", rs.grad), ("gw", bn.weight.grad), ("gb", bn.bias.grad)):
                result[k].append(v.detach().clone())
            bn.weight.grad = bn.bias.grad = None
        result["running_mean"], result["running_var"] = bn.running_mean.clone(), bn.running_var.clone()
        result["nbt"] = bn.num_batches_tracked.item()
        bn.eval()  # evaluation: running statistics, no communication
        result["eval"] = bn(x[sl].clone(), residual=r[sl].clone()).detach()
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_processes(sizes, case, tmp_path, timeout=180):
    ctx = mp.spawn(worker, args=(len(sizes), free_port(), sizes, case, str(tmp_path)), nprocs=len(sizes),
                   join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout} s")
    return [torch.load(tmp_path / f"{rank}.pt") for rank in range(len(sizes))]


CASES = [
    ([3, 5], {"momentum": 0.1, "activation": "relu", "channels_last": True}),
    ([0, 6], {"momentum": None, "activation": "silu", "channels_last": False}),  # an empty batch on rank 0
    ([4, 2], {"momentum": 0.1, "activation": "gelu", "channels_last": False}),
]


@pytest.mark.parametrize("sizes,case", CASES, ids=["uneven", "empty-rank", "gelu"])
def test_matches_single_process_on_the_concatenated_batch(sizes, case, tmp_path):
    results = run_processes(sizes, case, tmp_path)
    x, r, g, w, b = global_batch(sum(sizes))
    ref = torch.nn.BatchNorm2d(C, momentum=case["momentum"], dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
    for step in range(2):
        xs, rs = (x + step).clone().requires_grad_(), r.clone().requires_grad_()
        out = reference.activate(ref(xs) + rs, case["activation"])
        (out * g).sum().backward()
        got = {k: torch.cat([res[k][step] for res in results]) for k in ("out", "gx", "gr")}
        torch.testing.assert_close(got["out"], out.detach(), msg=f"output, step {step}")
        torch.testing.assert_close(got["gx"], xs.grad, msg=f"grad input, step {step}")
        torch.testing.assert_close(got["gr"], rs.grad, msg=f"grad residual, step {step}")
        # each process holds its own parameter gradients (DDP sums/averages them)
        torch.testing.assert_close(sum(res["gw"][step] for res in results), ref.weight.grad)
        torch.testing.assert_close(sum(res["gb"][step] for res in results), ref.bias.grad)
        ref.weight.grad = ref.bias.grad = None
    for res in results:
        torch.testing.assert_close(res["running_mean"], ref.running_mean)
        torch.testing.assert_close(res["running_var"], ref.running_var)
        assert res["nbt"] == 2
    ref.eval()
    expected = reference.activate(ref(x) + r, case["activation"]).detach()
    torch.testing.assert_close(torch.cat([res["eval"] for res in results]), expected)


def test_single_process_falls_back_to_batch_norm():
    sbn, bn = fastnorm.SyncBatchNorm(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(sbn(x), bn(x))
    torch.testing.assert_close(sbn.running_var, bn.running_var)
    assert list(sbn.state_dict()) == list(torch.nn.SyncBatchNorm(4).state_dict())


def test_convert_sync_batchnorm_keeps_values():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                fastnorm.BatchNorm2d(4, activation="relu"))
    model(torch.randn(2, 3, 6, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = fastnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], fastnorm.SyncBatchNorm) and converted[2].activation == "relu"
    for k, v in converted.state_dict().items():
        torch.testing.assert_close(v, state[k])
