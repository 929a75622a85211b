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
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fastnorm

LRELU_SLOPE = 0.1


def _weight_norm(module):
    with warnings.catch_warnings():  # the deprecated API, as HiFi-GAN's code uses it
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


def _padding(kernel_size, dilation):
    return (kernel_size * dilation - dilation) // 2


class ResBlock(nn.Module):
    """HiFi-GAN's ResBlock1: pairs of (dilated conv, conv), each pair a residual step."""

    def __init__(self, channels, kernel_size=3, dilations=(1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList(_weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                                           padding=_padding(kernel_size, d))) for d in dilations)
        self.convs2 = nn.ModuleList(_weight_norm(nn.Conv1d(channels, channels, kernel_size,
                                                           padding=_padding(kernel_size, 1))) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            xt = c2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x


class HiFiGANGenerator(nn.Module):
    """A HiFi-GAN (V1-style) generator: mel frames (N, mels, T) to a waveform
    (N, 1, T * prod(upsample_rates)), every conv under torch's deprecated weight norm."""

    def __init__(self, mels=32, channels=64, upsample_rates=(8, 4, 2), upsample_kernel_sizes=(16, 8, 4),
                 resblock_kernel_sizes=(3, 7), resblock_dilations=((1, 3, 5), (1, 3, 5))):
        super().__init__()
        self.num_kernels = len(resblock_kernel_sizes)
        self.conv_pre = _weight_norm(nn.Conv1d(mels, channels, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            cin, cout = channels // 2 ** i, channels // 2 ** (i + 1)
            self.ups.append(_weight_norm(nn.ConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2)))
            for kernel, dilations in zip(resblock_kernel_sizes, resblock_dilations):
                self.resblocks.append(ResBlock(cout, kernel, dilations))
        self.conv_post = _weight_norm(nn.Conv1d(cout, 1, 7, padding=3))

    def forward(self, x):
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


def make_generator(seed=0, **kwargs):
    """The generator with the initial weights of ``seed`` (the deprecated weight-norm hook
    does not deep-copy, so twins are built, not copied)."""
    torch.manual_seed(seed)
    return HiFiGANGenerator(**kwargs)


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
