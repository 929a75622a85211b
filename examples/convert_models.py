"""Converts two real models with ``fastnorm.convert`` and times a training step of each
against the same model with torch's layers (same initial weights, same batches):

- a timm image model (default ``efficientnet_b0``, random initialization: nothing is
  downloaded), whose ``BatchNormAct2d`` layers become fastnorm batch norms with the
  activation fused;
- a HiFi-GAN-style audio generator (Conv1d and ConvTranspose1d layers with dilated residual
  blocks) under torch's deprecated ``torch.nn.utils.weight_norm``, whose hooks become
  fastnorm's (the parameters keep their names ``weight_g`` / ``weight_v``).

    python examples/convert_models.py                       # CPU, small sizes: a few seconds
    python examples/convert_models.py --model regnety_016 --batch 32 --size 128 --steps 30
    python examples/convert_models.py --device cuda --fuse

Both runs take the same steps on one fixed batch (the loss falls as the model fits it), so
their losses agree to rounding; the time per step is the median after a few warm-up steps.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
# The generator as HiFi-GAN's code writes it (also the benchmark model suite's).
from fastnorm.model_zoo import make_generator


def time_training(models, batch, loss_fn, device, steps, warmup):
    """Trains each model (AdamW) on the batch, their steps interleaved (a slow moment of the
    machine falls on both); returns, per model, the losses and the median time per step after
    ``warmup`` steps."""
    x, y = batch
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    losses, times = [[] for _ in models], [[] for _ in models]
    for _ in range(steps):
        for model, opt, model_losses, model_times in zip(models, opts, losses, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            model_times.append(time.perf_counter() - start)
            model_losses.append(loss.item())
    return [(run, statistics.median(t[min(warmup, steps - 1):])) for run, t in zip(losses, times)]


def report(title, torch_run, fast_run):
    (torch_losses, t_torch), (fast_losses, t_fast) = torch_run, fast_run
    worst = max(abs(a - b) for a, b in zip(torch_losses, fast_losses))
    print(f"{title}\n  time per step: torch {t_torch * 1e3:.2f} ms, fastnorm {t_fast * 1e3:.2f} ms, "
          f"speed-up {t_torch / t_fast:.2f}x; losses {torch_losses[0]:.4f} -> {torch_losses[-1]:.4f}, "
          f"largest difference {worst:.1e}")


def image_model(args, device):
    import timm

    torch.manual_seed(args.seed)
    base = timm.create_model(args.model, pretrained=False, num_classes=args.classes).to(device)
    theirs = copy.deepcopy(base)
    ours = fastnorm.convert(copy.deepcopy(base), fuse_activations=args.fuse)
    fused = sum(1 for m in ours.modules() if getattr(m, "activation", None) is not None)
    norms = sum(1 for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    gen = torch.Generator().manual_seed(args.seed)
    batch = (torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device),
             torch.randint(args.classes, (args.batch,), generator=gen).to(device))
    runs = time_training((theirs, ours), batch, F.cross_entropy, device, args.steps, args.warmup)
    report(f"{args.model} on {device}, batch {args.batch}x3x{args.size}x{args.size}: {norms} batch norms, "
           f"{fused} with a fused activation", *runs)
    return runs


def audio_model(args, device):
    config = dict(mels=args.mels, channels=args.channels)
    theirs = make_generator(args.seed, **config).to(device)
    ours = fastnorm.convert(make_generator(args.seed, **config).to(device))
    hooks = sum(1 for m in ours.modules() for h in m._forward_pre_hooks.values()
                if type(h).__name__ == "_WeightNormHook")
    gen = torch.Generator().manual_seed(args.seed)
    samples = args.frames * 64  # the default upsampling
    batch = (torch.randn(args.batch, args.mels, args.frames, generator=gen).to(device),
             torch.rand(args.batch, 1, samples, generator=gen).mul(2).sub(1).to(device))
    runs = time_training((theirs, ours), batch, F.l1_loss, device, args.steps, args.warmup)
    report(f"HiFi-GAN-style generator on {device}, batch {args.batch}x{args.mels}x{args.frames} -> {samples} "
           f"samples: {hooks} weight-normed layers", *runs)
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_b0", help="a timm model name (random initialization)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--mels", type=int, default=32)
    p.add_argument("--frames", type=int, default=32, help="mel frames per example (64 samples each)")
    p.add_argument("--channels", type=int, default=64, help="the generator's first channel count")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fuse", action="store_true",
                   help="fastnorm.convert(..., fuse_activations=True) for the image model")
    p.add_argument("--only", choices=("image", "audio"), help="run one of the two")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    results = {}
    if args.only in (None, "image"):
        results["image"] = image_model(args, device)
    if args.only in (None, "audio"):
        results["audio"] = audio_model(args, device)
    return results


if __name__ == "__main__":
    main()
