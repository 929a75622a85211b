"""Real models trained a step at a time: the benchmark's model suite (``bench --suite
models``), the profiler's ``--model`` and the examples.

Image models come from torchvision and timm as their users build them (random
initialization: nothing is downloaded). The weight-norm models are written here the way
their projects write them: a HiFi-GAN-style generator (Conv1d and ConvTranspose1d with
dilated residual blocks under torch's deprecated ``torch.nn.utils.weight_norm``), an LSTM
with weight norm on its recurrent weights, and a weight-normed MLP at batch 1.

Each model is built once per contender from the same seed (the deprecated weight-norm hook
does not survive ``copy.deepcopy``), so every contender starts from the same weights and
trains on the same batch.
"""
import importlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastnorm

LRELU_SLOPE = 0.1


def _old_weight_norm(module, name="weight", dim=0):
    with warnings.catch_warnings():  # the deprecated API, as these projects use it
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module, name, dim)


def _padding(kernel_size, dilation):
    return (kernel_size * dilation - dilation) // 2


class ResBlock(nn.Module):
    """HiFi-GAN's ResBlock1: pairs of (dilated conv, conv), each pair a residual step."""

    def __init__(self, channels, kernel_size=3, dilations=(1, 3, 5)):
        super().__init__()
        self.convs1 = nn.ModuleList(_old_weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                                               padding=_padding(kernel_size, d))) for d in dilations)
        self.convs2 = nn.ModuleList(_old_weight_norm(nn.Conv1d(channels, channels, kernel_size,
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
        self.upsampling = 1
        self.conv_pre = _old_weight_norm(nn.Conv1d(mels, channels, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes)):
            cin, cout = channels // 2 ** i, channels // 2 ** (i + 1)
            self.ups.append(_old_weight_norm(nn.ConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2)))
            self.upsampling *= u
            for kernel, dilations in zip(resblock_kernel_sizes, resblock_dilations):
                self.resblocks.append(ResBlock(cout, kernel, dilations))
        self.conv_post = _old_weight_norm(nn.Conv1d(cout, 1, 7, padding=3))

    def forward(self, x):
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


def make_generator(seed=0, **kwargs):
    """The generator with the initial weights of ``seed`` (twins are built, not copied)."""
    torch.manual_seed(seed)
    return HiFiGANGenerator(**kwargs)


class WeightNormLSTM(nn.Module):
    """A 2-layer LSTM classifier with weight norm (the deprecated hook) on every recurrent
    weight, as in weight-normed language and speech models."""

    def __init__(self, features, hidden, classes, layers=2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        for k in range(layers):
            _old_weight_norm(self.lstm, f"weight_hh_l{k}")
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def weight_norm_mlp(width, depth, classes):
    """Weight-normed Linear layers (torch's parametrization) with ReLUs between them."""
    layers = []
    for _ in range(depth):
        layers += [nn.utils.parametrizations.weight_norm(nn.Linear(width, width)), nn.ReLU()]
    layers.append(nn.utils.parametrizations.weight_norm(nn.Linear(width, classes)))
    return nn.Sequential(*layers)


@dataclass
class ModelCase:
    """One model in one configuration. ``kind``: "image" (torchvision or timm: ``library``,
    ``arch``), "generator", "lstm" or "mlp"; ``dtype``: the autocast dtype (float32: none);
    ``batch_norm``: whether it has batch norms to fuse (a fused contender is timed)."""
    name: str
    kind: str
    batch: int
    size: int = 0
    library: str = ""
    arch: str = ""
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    batch_norm: bool = False

    @property
    def config(self):
        return f"{str(self.dtype).replace('torch.', '')}{' autocast' if self.autocast else ''} {self.layout}"

    @property
    def autocast(self):
        return self.dtype in (torch.bfloat16, torch.float16)


def image_case(library, arch, batch, size, dtype=torch.float32, layout="contiguous"):
    return ModelCase(arch, "image", batch, size, library, arch, dtype, layout, batch_norm=True)


SIZES = {  # (image batch, image side, generator batch, mel frames, lstm batch, time steps, mlp width)
    "quick": (4, 64, 1, 8, 2, 6, 64),  # (image: 2x2 at the last stage; at 1x1 and batch 2 it is chaotic)
    "default": (16, 112, 4, 32, 16, 50, 1024),
    "large": (64, 224, 16, 64, 64, 100, 2048),
}


def suite(size="default"):
    """The benchmark's model suite at one of SIZES: "default" fits a small CPU machine,
    "large" the sizes people train at (a GPU's or a big CPU's), "quick" a smoke test."""
    b, s, gb, frames, lb, steps, width = SIZES[size]
    return [
        image_case("torchvision", "resnet50", b, s),
        image_case("torchvision", "resnet50", b, s, torch.bfloat16, "channels_last"),
        image_case("timm", "efficientnet_b0", b, s),
        image_case("timm", "mobilenetv3_large_100", b, s),
        ModelCase("hifigan", "generator", gb, frames),
        ModelCase("lstm", "lstm", lb, steps),
        ModelCase("mlp", "mlp", 1, width),
    ]


IMAGE_MODELS = {"resnet18": "torchvision", "resnet50": "torchvision", "efficientnet_b0": "timm",
                "mobilenetv3_large_100": "timm", "regnety_016": "timm", "densenet121": "timm"}
OTHER_MODELS = {"hifigan": "generator", "lstm": "lstm", "mlp": "mlp"}
NAMES = list(IMAGE_MODELS) + list(OTHER_MODELS)


def by_name(name, batch, size, dtype=torch.float32, layout="contiguous"):
    """A case of one of NAMES: an image model (``size`` its height and width), or the
    generator (``size`` mel frames), the LSTM (time steps) or the MLP (width)."""
    if name in IMAGE_MODELS:
        return image_case(IMAGE_MODELS[name], name, batch, size, dtype, layout)
    return ModelCase(name, OTHER_MODELS[name], batch, size, dtype=dtype, layout=layout)


class MissingLibrary(Exception):
    """A model needs a library that is not installed."""


def _image_model(case, classes):
    try:
        lib = importlib.import_module(case.library)
    except ImportError:
        raise MissingLibrary(f"{case.name} needs {case.library} (pip install {case.library})") from None
    if case.library == "torchvision":
        return lib.models.get_model(case.arch, weights=None, num_classes=classes)
    return lib.create_model(case.arch, pretrained=False, num_classes=classes)


def build(case, impl, seed=0, classes=10):
    """(model, inputs, target, loss function) for ``impl`` ("torch", "fastnorm" or
    "fastnorm fused"): the model as its users build it, then converted for fastnorm's."""
    torch.manual_seed(seed)
    if case.kind == "image":
        model = _image_model(case, classes)
        shape, loss = (case.batch, 3, case.size, case.size), F.cross_entropy
    elif case.kind == "generator":
        model = HiFiGANGenerator(mels=32, channels=128)
        shape, loss = (case.batch, 32, case.size), F.l1_loss
    elif case.kind == "lstm":
        model = WeightNormLSTM(80, 256, classes)
        shape, loss = (case.batch, case.size, 80), F.cross_entropy
    elif case.kind == "mlp":
        model = weight_norm_mlp(case.size, 3, classes)
        shape, loss = (case.batch, case.size), F.cross_entropy
    else:
        raise ValueError(f"unknown model kind {case.kind!r}")
    if impl != "torch":  # (with fusion, convert returns a traced copy: the model to use)
        model = fastnorm.convert(model, fuse_activations=impl == "fastnorm fused")
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape, generator=gen)
    if case.kind == "generator":
        target = torch.rand(case.batch, 1, case.size * model.upsampling, generator=gen) * 2 - 1
    else:
        target = torch.randint(classes, (case.batch,), generator=gen)
    return model, x, target, loss


def training_step(case, impl, device, seed=0, lr=0.01):
    """A function of no arguments that runs one training step (forward, loss, backward,
    SGD with momentum) of ``case`` as ``impl`` on ``device`` and returns the loss tensor."""
    model, x, target, loss_fn = build(case, impl, seed)
    model = model.to(device).train()
    x, target = x.to(device), target.to(device)
    if case.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    device_type = torch.device(device).type

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=case.dtype, enabled=case.autocast):
            loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def contenders(case):
    return ["torch", "fastnorm"] + (["fastnorm fused"] if case.batch_norm else [])
