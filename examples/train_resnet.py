"""Trains a small ResNet on generated images from the same initial weights with torch's
layers and after ``fastnorm.convert`` (optionally with the fx activation fusion), and
prints both loss curves, the time per training step of each, and how closely each follows
the same training run in float64 (torch's layers).

    python examples/train_resnet.py                 # CPU, and CUDA when present
    python examples/train_resnet.py --steps 300 --device cuda --fuse --channels-last

The data is a fixed set of class templates plus fresh noise each step, so the task is
learnable and every run sees the same batches. Training amplifies rounding differences
step by step, so float32 runs drift apart from each other (and from float64) after a while
however they round; the curves then agree in their averages, not step for step. The column
"steps within 1e-4" says how long each float32 run stays within 1e-4 of the float64 loss.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastnorm


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes=10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


def batches(steps, batch, size, classes, device, seed=0):
    """The same generated batches for every run: class templates plus noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, size, size, generator=gen)
    for _ in range(steps):
        y = torch.randint(classes, (batch,), generator=gen)
        x = templates[y] + 1.5 * torch.randn(batch, 3, size, size, generator=gen)
        yield x.to(device), y.to(device)


def train(model, args, device, dtype=torch.float32):
    model = model.to(device, dtype)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    losses, times = [], []
    for x, y in batches(args.steps, args.batch, args.size, args.classes, device):
        x = x.to(dtype)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, times


def steps_within(losses, reference, tol=1e-4):
    """How many steps a run's loss stays within tol of the reference run's."""
    return next((i for i, (a, b) in enumerate(zip(losses, reference)) if abs(a - b) > tol), len(losses))


def compare(args, device):
    # Full float32 on the GPU: cuDNN's default TF32 convolutions round their inputs to 10
    # bits, so the two float32 runs would part by far more than rounding from the first step.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return _compare(args, device)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _compare(args, device):
    torch.manual_seed(args.seed)
    base = ResNet(args.classes)
    theirs = copy.deepcopy(base)
    ours = fastnorm.convert(copy.deepcopy(base), fuse_activations=args.fuse)
    torch_losses, torch_times = train(theirs, args, device)
    fast_losses, fast_times = train(ours, args, device)
    exact = train(copy.deepcopy(base), args, device, torch.float64)[0] if args.reference else None

    warm = min(args.warmup, args.steps - 1)
    t_torch, t_fast = statistics.median(torch_times[warm:]), statistics.median(fast_times[warm:])
    layout = "channels_last" if args.channels_last else "contiguous"
    print(f"\n{device} ({layout}{', fused activations' if args.fuse else ''}): "
          f"batch {args.batch}x3x{args.size}x{args.size}, {args.steps} steps")
    window = max(1, args.steps // 10)
    print(f"loss, mean over each {window} steps:")
    print(f"{'steps':>9} {'torch':>8} {'fastnorm':>9}" + (f" {'float64':>8}" if exact else ""))
    for start in range(0, args.steps, window):
        end = min(start + window, args.steps)
        row = [statistics.mean(run[start:end]) for run in (torch_losses, fast_losses) + ((exact,) if exact else ())]
        print(f"{start + 1:>4}-{end:<4}" + "".join(f" {v:>{w}.4f}" for v, w in zip(row, (8, 9, 8))))
    if exact:
        print(f"steps within 1e-4 of the float64 loss: torch {steps_within(torch_losses, exact)}, "
              f"fastnorm {steps_within(fast_losses, exact)}")
    print(f"time per step (median after {warm} warm-up steps): torch {t_torch * 1e3:.2f} ms, "
          f"fastnorm {t_fast * 1e3:.2f} ms, speed-up {t_torch / t_fast:.2f}x")
    return torch_losses, fast_losses


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=16, help="image height and width")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", action="append", help="cpu or cuda (repeatable); default: cpu, and cuda when present")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--fuse", action="store_true", help="fastnorm.convert(..., fuse_activations=True)")
    p.add_argument("--no-reference", dest="reference", action="store_false", help="skip the float64 run")
    args = p.parse_args(argv)
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    return {d: compare(args, torch.device(d)) for d in devices}


if __name__ == "__main__":
    main()
