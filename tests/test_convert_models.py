"""fastnorm.convert on real models: torchvision's and timm's (random initialization, nothing
downloaded), a torchvision detection backbone with FrozenBatchNorm2d, a HiFi-GAN-style
generator under torch's deprecated weight-norm hook, and an LSTM with weight-normed
recurrent weights. Each converted model is held to the unconverted one in float64: outputs,
every gradient, running statistics, training steps side by side, state_dict keys, and
revert."""
import collections
import copy
import importlib.util
import io
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm as TorchWeightNormHook

import fastnorm
from fastnorm.batchnorm import _FastBatchNorm

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from timm.layers import BatchNormAct2d  # noqa: E402
from timm.layers.norm_act import FrozenBatchNormAct2d, SyncBatchNormAct  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

X64 = dict(dtype=torch.float64)
# float64 on both sides: the two differ by rounding alone
RTOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are small, and with two OpenMP threads a core taken
    by another process stalls every parallel region (this file then ran 7x slower on a busy
    2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name):
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def census(model):
    """Counter of (class name, fused activation or '-' for a layer fastnorm left alone) over
    the model's batch-norm layers."""
    found = collections.Counter()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d)):
            fast = isinstance(m, (_FastBatchNorm,)) or type(m).__module__ == "fastnorm.convert"
            found[(type(m).__name__, m.activation if fast else "-")] += 1
    return found


def residual_calls(model):
    return sum(1 for n in model.graph.nodes if n.op == "call_module" and len(n.args) > 1)


def assert_same_state(ours, theirs):
    """Same state_dict keys in the same order, values within rounding (of each tensor's
    largest value)."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in b:
        scale = b[k].abs().max().item() if b[k].numel() and b[k].is_floating_point() else 0
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=RTOL * scale + 1e-12, msg=lambda m: f"{k}: {m}")


def assert_close_tree(ours, theirs, what):
    if isinstance(theirs, dict):
        assert list(ours) == list(theirs)
        for k in theirs:
            assert_close_tree(ours[k], theirs[k], f"{what}[{k}]")
        return
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}")


def loss_of(output, labels):
    if isinstance(output, dict):  # a backbone's feature maps
        return sum(v.square().mean() for v in output.values())
    if output.dim() != 2:
        return output.square().mean()
    return F.cross_entropy(output, labels)


def train_side_by_side(ours, theirs, x, steps=2, lr=0.01):
    """Training steps of both models on the same batch (SGD with momentum): each step's
    loss, every gradient (names and values; the gradients of a bias just before another batch
    norm are rounding noise, held to the model's largest gradient) and, at the end, every
    buffer agree. Returns the losses."""
    labels = torch.arange(x.shape[0]) % 7
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (ours, theirs)]
    losses = []
    for step in range(steps):
        results = []
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            torch.manual_seed(step)
            output = model(x)
            loss = loss_of(output, labels)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results.append((output, loss.detach(), grads))
            opt.step()
        (out_a, loss_a, grads_a), (out_b, loss_b, grads_b) = results
        assert_close_tree(out_a, out_b, f"step {step} output")
        torch.testing.assert_close(loss_a, loss_b, rtol=RTOL, atol=0)
        assert list(grads_a) == list(grads_b) and grads_b
        largest = max(g.abs().max().item() for g in grads_b.values())
        for name, g in grads_b.items():
            torch.testing.assert_close(grads_a[name], g, rtol=1e-7, atol=RTOL * largest,
                                       msg=lambda m: f"step {step} {name}: {m}")
        losses.append(loss_b.item())
    assert_same_state(ours, theirs)
    return losses


def assert_folds_to(model, theirs, x):
    """fold_batch_norm leaves no batch norm in a copy of model, and the copy computes what
    theirs computes (both in evaluation)."""
    folded = fastnorm.fold_batch_norm(copy.deepcopy(model))
    assert census(folded) == {}
    with torch.no_grad():
        assert_close_tree(folded(x), theirs(x), "folded output")


def eval_outputs_agree(ours, theirs, x):
    for m in (ours, theirs):
        m.eval()
    with torch.no_grad():
        assert_close_tree(ours(x), theirs(x), "eval output")


# ---------------------------------------------------------------------------------------
# timm: BatchNormAct2d with its activation fused.

TIMM_MODELS = {
    # name: converted layers by fused activation, the layers left as timm's (their act is
    # one the kernels do not fuse), and the layers fold_batch_norm leaves (DenseNet
    # normalizes before its convs)
    "efficientnet_b0": ({"silu": 33, None: 16}, 0, 0),
    "mobilenetv3_large_100": ({"relu": 11, None: 15, "hardswish": 20}, 0, 0),
    "regnety_016": ({"relu": 55, None: 31}, 0, 0),
    "densenet121": ({"relu": 121}, 0, 62),
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models(name):
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, num_classes=7).double()
    ours = copy.deepcopy(theirs)
    params = [id(p) for p in ours.parameters()]
    assert fastnorm.convert(ours) is ours
    fused, left, not_folded = TIMM_MODELS[name]
    expected = {("BatchNormAct2d", act): n for act, n in fused.items()}
    if left:
        expected[("BatchNormAct2d", "-")] = left
    assert census(ours) == expected
    for m in ours.modules():
        if isinstance(m, BatchNormAct2d) and hasattr(m, "activation"):
            assert isinstance(m, nn.BatchNorm2d) and isinstance(m, fastnorm.BatchNorm2d)
            assert type(m) is not BatchNormAct2d and type(m).__name__ == "BatchNormAct2d"
        elif isinstance(m, BatchNormAct2d):
            assert type(m) is BatchNormAct2d and type(m.act) is nn.Hardswish
    assert [id(p) for p in ours.parameters()] == params
    assert_same_state(ours, theirs)

    x = torch.randn(2, 3, 64, 64, **X64)
    train_side_by_side(ours, theirs, x)
    eval_outputs_agree(ours, theirs, x)

    # folded for inference, converted or not: timm's act (fused or not) stays as a module
    with torch.no_grad():
        expected = theirs(x)
        for model in (ours, theirs):
            folded = fastnorm.fold_batch_norm(copy.deepcopy(model))
            assert sum(census(folded).values()) == not_folded
            assert_close_tree(folded(x), expected, "folded output")

    assert fastnorm.revert(ours) is ours
    assert all(type(m) in (BatchNormAct2d, nn.BatchNorm2d) for m in ours.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert not any(hasattr(m, "activation") for m in ours.modules())
    assert_same_state(ours, theirs)
    eval_outputs_agree(ours, theirs, x)  # timm's own code again


def test_timm_fused_residuals_and_revert():
    """RegNetY's blocks end in bn -> drop_path (an identity) -> + shortcut -> ReLU: the fx pass
    fuses the residual and the ReLU into the batch norm; revert puts them back as calls."""
    torch.manual_seed(0)
    theirs = timm.create_model("regnety_016", pretrained=False, num_classes=7).double()
    ours = fastnorm.convert(copy.deepcopy(theirs), fuse_activations=True)
    assert isinstance(ours, torch.fx.GraphModule)
    assert census(ours) == {("BatchNormAct2d", "relu"): 55 + 27, ("BatchNormAct2d", None): 4}
    assert residual_calls(ours) == 27  # every block
    x = torch.randn(2, 3, 64, 64, **X64)
    train_side_by_side(ours, theirs, x)
    eval_outputs_agree(ours, theirs, x)
    assert_folds_to(ours, theirs, x)
    reverted = fastnorm.revert(ours)
    assert census(reverted) == {("BatchNormAct2d", "-"): 86}
    assert residual_calls(reverted) == 0
    assert_same_state(reverted, theirs)
    eval_outputs_agree(reverted, theirs, x)


def test_timm_layer_variants():
    """Every activation timm's layers use, its sync and frozen variants, inplace and not:
    fused where the kernels fuse it, left as timm's otherwise (and for a drop that is not an
    identity)."""
    from timm.layers import freeze_batch_norm_2d
    from timm.layers.activations import Swish
    from timm.layers.activations_me import SwishMe
    from timm.layers.norm_act import convert_sync_batchnorm

    def bn(act=None, **kw):
        return BatchNormAct2d(4, act_layer=act, **kw) if act is not None else BatchNormAct2d(4, apply_act=False)

    torch.manual_seed(0)
    layers = [bn(nn.ReLU), bn(nn.ReLU, inplace=False), bn(nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
              bn(nn.SiLU), bn("swish"), bn(Swish), bn(SwishMe), bn(),
              bn(nn.Hardswish), bn(nn.GELU), bn(nn.ReLU6), bn(nn.ReLU, drop_layer=lambda: nn.Dropout(0.0))]
    theirs = nn.Sequential(*layers).double()
    for m in theirs:  # statistics away from their initial values
        m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    frozen = freeze_batch_norm_2d(copy.deepcopy(theirs))
    sync = convert_sync_batchnorm(copy.deepcopy(theirs))
    assert all(type(m) is FrozenBatchNormAct2d for m in frozen) and all(type(m) is SyncBatchNormAct for m in sync)
    fused = ["relu", "relu", "leaky_relu", "silu", "silu", "silu", "silu", None, "hardswish", "gelu", "relu6"]
    for model, cls in ((theirs, BatchNormAct2d), (frozen, FrozenBatchNormAct2d), (sync, SyncBatchNormAct)):
        ours = fastnorm.convert(copy.deepcopy(model))
        assert [getattr(m, "activation", "-") for m in ours] == fused + ["-"]  # (the dropout drop stays)
        assert all(isinstance(m, cls) for m in ours)
        assert ours[2].negative_slope == 0.2
        x = torch.randn(3, 4, 5, 5, **X64)
        if cls is not FrozenBatchNormAct2d:
            train_side_by_side(ours, model, x)
        else:  # no parameters: the input's gradient and the (unchanged) buffers
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            ours(a).square().sum().backward()
            model(b).square().sum().backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=RTOL, atol=1e-12)
            assert_same_state(ours, model)
        eval_outputs_agree(ours, model, x)
        reverted = fastnorm.revert(ours)
        assert all(type(m) is cls for m in reverted)
        assert_same_state(reverted, model)


def test_converted_timm_layers_pickle():
    """The converted layers' classes are made at run time, named in fastnorm.convert: a
    pickled model loads, also where the class has not been made yet (a new process)."""
    convert_module = sys.modules["fastnorm.convert"]  # (fastnorm.convert is the function)
    torch.manual_seed(0)
    model = fastnorm.convert(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), FrozenBatchNorm2d(4)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for cls in (type(model[1]), type(model[2])):
        delattr(convert_module, cls.__qualname__)  # as in a new process
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[1]) is type(model[1]) and loaded[1].activation == "relu"
    assert isinstance(loaded[2], FrozenBatchNorm2d) and type(loaded[2]).__module__ == "fastnorm.convert"
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x), model(x))
    assert isinstance(copy.deepcopy(model)[1], BatchNormAct2d)


# ---------------------------------------------------------------------------------------
# torchvision.

def test_torchvision_resnet50_fused():
    """ResNet-50 with the fx fusion: each block's bn1 and bn2 take their ReLU, bn3 the
    shortcut and the ReLU; then revert, and fold for inference."""
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(weights=None, num_classes=7).double()
    ours = fastnorm.convert(copy.deepcopy(theirs), fuse_activations=True)
    assert isinstance(ours, torch.fx.GraphModule)
    assert census(ours) == {("BatchNorm2d", "relu"): 1 + 16 * 3, ("BatchNorm2d", None): 4}
    assert residual_calls(ours) == 16
    assert all(type(m) is fastnorm.BatchNorm2d for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
    assert_same_state(ours, theirs)
    x = torch.randn(2, 3, 64, 64, **X64)
    train_side_by_side(ours, theirs, x)
    eval_outputs_agree(ours, theirs, x)

    assert_folds_to(ours, theirs, x)

    reverted = fastnorm.revert(ours)
    assert census(reverted) == {("BatchNorm2d", "-"): 53} and residual_calls(reverted) == 0
    assert all(type(m) is nn.BatchNorm2d for m in reverted.modules() if isinstance(m, nn.BatchNorm2d))
    assert_same_state(reverted, theirs)
    eval_outputs_agree(reverted, theirs, x)


def randomize_frozen(model):
    """Frozen batch norms with statistics and affine values away from 0 and 1."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            for buffer, (lo, hi) in zip((m.weight, m.bias, m.running_mean, m.running_var),
                                        ((0.5, 1.5), (-0.2, 0.2), (-0.2, 0.2), (0.5, 2.0))):
                buffer.copy_(torch.rand(buffer.shape, generator=gen) * (hi - lo) + lo)
    return model


def test_detection_backbone_with_frozen_batch_norm():
    """torchvision's detection backbone (ResNet + FPN, FrozenBatchNorm2d, the first layers
    not trainable): frozen fastnorm batch norms, the ReLUs and shortcuts fused; in training
    mode too they use their statistics and update nothing."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    theirs = randomize_frozen(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)).double()
    frozen_before = {k: v.clone() for k, v in theirs.state_dict().items() if "bn" in k or "downsample.1" in k}
    ours = fastnorm.convert(copy.deepcopy(theirs), fuse_activations=True)
    assert census(ours) == {("FrozenBatchNorm2d", "relu"): 1 + 8 * 2, ("FrozenBatchNorm2d", None): 3}
    assert residual_calls(ours) == 8
    assert all(isinstance(m, FrozenBatchNorm2d) for m in ours.modules() if hasattr(m, "activation"))
    assert_same_state(ours, theirs)
    x = torch.randn(2, 3, 64, 64, **X64)
    train_side_by_side(ours, theirs, x)
    for k, v in frozen_before.items():
        assert torch.equal(ours.state_dict()[k], v), k
    eval_outputs_agree(ours, theirs, x)

    assert_folds_to(ours, theirs, x)
    assert_folds_to(theirs, theirs, x)  # torchvision's own, unconverted

    reverted = fastnorm.revert(ours)
    assert census(reverted) == {("FrozenBatchNorm2d", "-"): 20}
    assert all(type(m) is FrozenBatchNorm2d for m in reverted.modules() if isinstance(m, FrozenBatchNorm2d))
    assert_same_state(reverted, theirs)
    eval_outputs_agree(reverted, theirs, x)


def test_frozen_batch_norm_as_torchvision():
    """Input the kernels do not take as torchvision computes it (float16 input promoted by
    float32 buffers, another rank) goes through torchvision's formula."""
    torch.manual_seed(0)
    theirs = randomize_frozen(nn.Sequential(FrozenBatchNorm2d(3, eps=1e-3)))
    ours = fastnorm.convert(copy.deepcopy(theirs))
    assert ours[0].eps == 1e-3 and list(ours.state_dict()) == ["0.weight", "0.bias", "0.running_mean", "0.running_var"]
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    for y in (x.half(), torch.randn(1, 3, 3)):
        torch.testing.assert_close(ours(y), theirs(y), rtol=0, atol=0)
        assert ours(y).dtype == theirs(y).dtype
    ours.load_state_dict({**theirs.state_dict(), "0.num_batches_tracked": torch.tensor(3)})  # as torchvision's


# ---------------------------------------------------------------------------------------
# Weight norm under torch's deprecated hook: a HiFi-GAN-style generator, an LSTM.

GENERATOR = dict(mels=8, channels=16, upsample_rates=(4, 2), upsample_kernel_sizes=(8, 4),
                 resblock_kernel_sizes=(3, 5), resblock_dilations=((1, 3, 5), (1, 3, 5)))


def make_generator(seed=0):
    return load_example("convert_models").make_generator(seed, **GENERATOR).double()


def hooks_of(model):
    return collections.Counter(type(h).__name__ for m in model.modules() for h in m._forward_pre_hooks.values())


def audio_batches(steps):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 8, 6, generator=gen, **X64), torch.rand(2, 1, 48, generator=gen, **X64) * 2 - 1)
            for _ in range(steps)]


def train_generator(model, opt, batches):
    losses = []
    for x, y in batches:
        loss = F.l1_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_hifigan_generator_under_the_deprecated_weight_norm():
    theirs, ours = make_generator(), make_generator()
    params = [id(p) for p in ours.parameters()]
    keys = list(theirs.state_dict())
    assert fastnorm.convert(ours) is ours
    layers = 1 + 2 + 2 * 2 * 3 * 2 + 1  # conv_pre, ups, resblocks, conv_post
    assert hooks_of(theirs) == {"WeightNorm": layers} and hooks_of(ours) == {"_WeightNormHook": layers}
    assert [id(p) for p in ours.parameters()] == params
    assert list(ours.state_dict()) == keys and "conv_pre.weight_g" in keys and "ups.1.weight_v" in keys

    batches = audio_batches(6)
    x = batches[0][0]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    F.l1_loss(ours(a), batches[0][1]).backward()
    F.l1_loss(theirs(b), batches[0][1]).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=RTOL, atol=1e-15)
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-14, msg=lambda m: f"{name}: {m}")

    # three steps each, then a checkpoint of each (model and AdamW state) goes to a fresh
    # model of the other kind, which resumes with the same losses as the one it came from
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    first_theirs = train_generator(theirs, opt_theirs, batches[:3])
    first_ours = train_generator(ours, opt_ours, batches[:3])
    torch.testing.assert_close(first_ours, first_theirs, rtol=RTOL, atol=0)
    saved = {kind: copy.deepcopy({"model": m.state_dict(), "opt": o.state_dict()})
             for kind, m, o in (("theirs", theirs, opt_theirs), ("ours", ours, opt_ours))}
    resumed = {}
    for kind, target in (("theirs", "ours"), ("ours", "theirs")):
        model = make_generator(seed=5)  # other weights: everything comes from the checkpoint
        if target == "ours":
            fastnorm.convert(model)
        model.load_state_dict(saved[kind]["model"])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.load_state_dict(saved[kind]["opt"])
        resumed[target] = train_generator(model, opt, batches[3:])
    rest_theirs = train_generator(theirs, opt_theirs, batches[3:])
    rest_ours = train_generator(ours, opt_ours, batches[3:])
    for losses in (rest_ours, resumed["ours"], resumed["theirs"]):
        torch.testing.assert_close(losses, rest_theirs, rtol=1e-8, atol=0)

    # revert: torch's hooks, the same keys and values
    fastnorm.revert(ours)
    assert hooks_of(ours) == {"WeightNorm": layers}
    assert list(ours.state_dict()) == keys
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs.state_dict()[k], rtol=1e-8, atol=1e-12)
    # and HiFi-GAN's inference path, removing the weight norm, works on a converted model
    converted = fastnorm.convert(make_generator())
    plain = make_generator()
    for model in (converted, plain):
        for m in model.modules():
            if any(isinstance(h, TorchWeightNormHook) for h in m._forward_pre_hooks.values()):
                nn.utils.remove_weight_norm(m)
    assert hooks_of(converted) == {} and list(converted.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), rtol=RTOL, atol=1e-14)


def test_lstm_with_weight_normed_recurrent_weights():
    """An LSTM with weight norm on its recurrent weights (the deprecated hook on layer 0,
    the parametrization on layer 1), trained side by side with torch's."""
    def make():
        torch.manual_seed(0)
        lstm = nn.LSTM(5, 6, num_layers=2, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(lstm, "weight_hh_l0")
        nn.utils.parametrizations.weight_norm(lstm, "weight_hh_l1", dim=1)
        return nn.ModuleDict({"lstm": lstm, "head": nn.Linear(6, 3)}).double()

    def run(model, x):
        out, _ = model["lstm"](x)
        return model["head"](out[:, -1])

    theirs, ours = make(), make()
    keys = list(theirs.state_dict())
    fastnorm.convert(ours)
    assert hooks_of(ours) == {"_WeightNormHook": 1}
    assert list(ours.state_dict()) == keys
    assert "lstm.weight_hh_l0_g" in keys and "lstm.parametrizations.weight_hh_l1.original1" in keys
    gen = torch.Generator().manual_seed(2)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ours, theirs)]
    for step in range(4):
        x = torch.randn(3, 7, 5, generator=gen, **X64)
        y = torch.randint(3, (3,), generator=gen)
        losses, grads = [], []
        for model, opt in zip((ours, theirs), opts):
            loss = F.cross_entropy(run(model, x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=0)
        assert list(grads[0]) == list(grads[1])
        for name, g in grads[1].items():
            torch.testing.assert_close(grads[0][name], g, rtol=1e-7, atol=1e-13,
                                       msg=lambda m: f"step {step} {name}: {m}")
    fastnorm.revert(ours)
    assert hooks_of(ours) == {"WeightNorm": 1}
    assert_same_state(ours, theirs)


def test_example_runs(capsys):
    results = load_example("convert_models").main(["--model", "regnety_002", "--batch", "2", "--size", "32",
                                                   "--frames", "4", "--channels", "16", "--steps", "2",
                                                   "--warmup", "1"])
    for kind in ("image", "audio"):
        (torch_losses, t_torch), (fast_losses, t_fast) = results[kind]
        assert len(torch_losses) == len(fast_losses) == 2 and t_torch > 0 and t_fast > 0
        assert fast_losses[0] == pytest.approx(torch_losses[0], rel=1e-4)
    out = capsys.readouterr().out
    assert "time per step" in out and "HiFi-GAN" in out
