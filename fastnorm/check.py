"""``python -m fastnorm check``: every op against torch on this machine's devices.

A compact version of the test suite for users: forward and backward of batch norm in
training and evaluation, every dtype, contiguous and channels-last, with and without the
fused residual and activation, compared with torch in float64. Exits non-zero on a mismatch.
"""
import torch

import fastnorm
from fastnorm import reference
from fastnorm.reference import TOLERANCES


def _compare(device, dtype, layout, training, activation, residual):
    shape = (4, 6, 9, 7)
    x = torch.randn(shape, device=device, dtype=torch.float64).mul_(2).add_(0.5).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    pd = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, b = torch.randn(6, device=device, dtype=pd), torch.randn(6, device=device, dtype=pd)
    rm, rv = torch.randn(6, device=device, dtype=pd), torch.rand(6, device=device, dtype=pd) + 0.5
    r = torch.randn_like(x) if residual else None
    g = torch.randn_like(x)

    def run(fn, upcast):
        conv = (lambda t: t.detach().double()) if upcast else (lambda t: t.detach().clone())
        xs, ws, bs = (conv(t).requires_grad_() for t in (x, w, b))
        rs = conv(r) if r is not None else None
        rm_, rv_ = conv(rm), conv(rv)
        out = fn(xs, rm_, rv_, ws, bs, training, 0.1, 1e-5, residual=rs, activation=activation)
        grads = torch.autograd.grad(out, (xs, ws, bs), g.double() if upcast else g)
        return [out, *grads, rm_, rv_]

    ours = run(fastnorm.functional.batch_norm, False)
    ref = run(reference.batch_norm, True)
    worst = 0.0
    for o, e in zip(ours, ref):
        tol = TOLERANCES[dtype if o.dtype == dtype else o.dtype]
        excess = ((o.double() - e).abs() - tol["atol"] - tol["rtol"] * e.abs()).max().item()
        worst = max(worst, excess)
    return worst <= 0


def main(argv):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and fastnorm.backends()["cuda"] else [])
    failures = total = 0
    for device in devices:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            for layout in ("contiguous", "channels_last"):
                for training in (True, False):
                    for activation, residual in ((None, False), ("relu", True), ("silu", False)):
                        ok = _compare(device, dtype, layout, training, activation, residual)
                        total += 1
                        if not ok:
                            failures += 1
                            print(f"MISMATCH {device} {dtype} {layout} training={training} "
                                  f"activation={activation} residual={residual}")
        print(f"{device}: batch norm checked ({total} configurations so far)")
    print(f"{total - failures}/{total} configurations match torch")
    return 1 if failures else 0
