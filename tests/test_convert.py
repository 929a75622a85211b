"""Whole-model conversion: convert / revert keep every value, the fx activation fusion, and
batch-norm folding for inference."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm as TorchWeightNormHook

import fastnorm
from conftest import assert_close_to_reference
from fastnorm.reference import TOLERANCES
from fastnorm.weight_norm import _WeightNormHook

TOL = TOLERANCES[torch.float32]


class Block(nn.Module):
    """A residual block ending in bn -> + shortcut -> relu, as in ResNet; the shortcut (with
    its own batch norm) is computed after bn2."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.shortcut = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU())
        self.block = Block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the deprecated hook; no bias: before a batch norm in training its gradient is zero
            # by construction, and with 4 samples its float32 value is rounding noise of the
            # largest input gradient (one ill-conditioned channel: 1e-4 of 68), unrelated to the
            # tolerance of any value compared here
            self.head = nn.utils.weight_norm(nn.Linear(8, 6, bias=False))
        self.bn1d = nn.BatchNorm1d(6)
        self.out = nn.utils.parametrizations.weight_norm(nn.Linear(6, 4), dim=None)
        self.bn3d = nn.BatchNorm3d(2)

    def forward(self, x):
        h = self.pool(self.block(self.stem(x))).flatten(1)
        h = self.out(F.leaky_relu(self.bn1d(self.head(h)), 0.2))
        return h + self.bn3d(h.view(-1, 2, 2, 1, 1)).view(-1, 4)


def forward_backward(model, x):
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return y.detach(), x.grad, grads


def make_net(x):
    torch.manual_seed(0)
    model = Net()
    model(x)  # running statistics away from their initial values
    return model


def test_convert_and_revert_keep_every_value():
    x = torch.randn(4, 3, 6, 6)
    # twins (the deprecated hook does not deep-copy); fastnorm's kernels round differently
    # from torch's, so both are held to a float64 twin
    theirs, model, exact = make_net(x), make_net(x), make_net(x).double()
    params_before = {id(p) for p in model.parameters()}
    converted = fastnorm.convert(model)
    assert converted is model
    assert type(model.stem[1]) is fastnorm.BatchNorm2d and type(model.bn1d) is fastnorm.BatchNorm1d
    assert type(model.bn3d) is fastnorm.BatchNorm3d
    from fastnorm.weight_norm import weight_norm_of
    # the deprecated hook: fastnorm's hook in its place, weight_g / weight_v kept
    assert [type(h) for h in model.head._forward_pre_hooks.values()] == [_WeightNormHook]
    assert weight_norm_of(model.out).dim == -1
    assert list(model.state_dict()) == list(theirs.state_dict())
    assert {id(p) for p in model.parameters()} == params_before  # optimizers keep working
    for mode in ("train", "eval"):
        for m in (theirs, model, exact):
            m.train(mode == "train")
        ref, ours, ref64 = forward_backward(theirs, x), forward_backward(model, x), forward_backward(exact, x.double())
        assert_close_to_reference(ours[0], ref64[0], torch.float32, ref[0], what=f"{mode} output")
        assert_close_to_reference(ours[1], ref64[1], torch.float32, ref[1], what=f"{mode} grad input")
        assert list(ours[2]) == list(ref[2])
        for name, g in ref[2].items():
            assert_close_to_reference(ours[2][name], ref64[2][name], torch.float32, g, what=f"{mode} {name}",
                                      per_tensor=True)
    for a, b in zip(theirs.buffers(), model.buffers()):
        torch.testing.assert_close(a, b, **TOL)
    fastnorm.revert(model)
    assert type(model.stem[1]) is nn.BatchNorm2d and type(model.bn1d) is nn.BatchNorm1d
    assert [type(h) for h in model.head._forward_pre_hooks.values()] == [TorchWeightNormHook]
    assert type(model.out.parametrizations.weight[0]).__module__.startswith("torch")
    assert list(model.state_dict()) == list(theirs.state_dict())
    torch.testing.assert_close(forward_backward(model, x)[0], forward_backward(theirs, x)[0], **TOL)


def test_state_dict_is_unchanged_by_convert():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 1)), nn.SyncBatchNorm(4))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fastnorm.convert(model)
    assert type(model[3]) is fastnorm.SyncBatchNorm
    assert list(model.state_dict()) == list(sd)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_fx_fusion_of_activations_and_residual():
    x = torch.randn(4, 3, 6, 6)
    model = fastnorm.convert(make_net(x))
    before = forward_backward(model, x)
    fused = fastnorm.convert(model, fuse_activations=True)
    assert isinstance(fused, torch.fx.GraphModule)
    bn = fused.get_submodule
    assert bn("stem.1").activation == "silu"
    assert bn("block.bn1").activation == "relu" and bn("block.bn2").activation == "relu"
    assert bn("bn1d").activation == "leaky_relu" and bn("bn1d").negative_slope == 0.2
    assert bn("bn3d").activation is None and bn("block.shortcut.1").activation is None
    bn2_calls = [n for n in fused.graph.nodes if n.target == "block.bn2"]
    assert len(bn2_calls) == 1 and bn2_calls[0].args[1].target == "block.shortcut.1"  # the residual
    assert not any(n.op == "call_function" and n.target in (F.relu, F.silu, F.leaky_relu) for n in fused.graph.nodes)
    after = forward_backward(fused, x)
    torch.testing.assert_close(after[0], before[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=1e-6)


def test_fusion_leaves_untraceable_models_as_they_were():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = fastnorm.BatchNorm1d(3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: does not trace
                return F.relu(self.bn(x))
            return self.bn(x)

    model = DataDependent()
    assert fastnorm.convert(model, fuse_activations=True) is model
    assert model.bn.activation is None


def test_fold_batch_norm_for_inference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), fastnorm.BatchNorm2d(8, activation="relu"),
                          nn.Conv2d(8, 8, 1, bias=False).to(memory_format=torch.channels_last), nn.BatchNorm2d(8),
                          nn.Flatten(), nn.Linear(8 * 5 * 5, 6), nn.BatchNorm1d(6))
    x = torch.randn(16, 3, 5, 5)
    for _ in range(3):
        model(x * 2 + 1)
    model.eval()
    expected = model(x)
    folded = fastnorm.fold_batch_norm(copy.deepcopy(model))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    assert folded.get_submodule("2").weight.is_contiguous(memory_format=torch.channels_last)
    wide = fastnorm.fold_batch_norm(copy.deepcopy(model).double())
    assert wide.get_submodule("0").weight.dtype == torch.float64
    torch.testing.assert_close(wide(x.double()), model.double()(x.double()), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="model.eval"):
        fastnorm.fold_batch_norm(copy.deepcopy(model).train())


def test_fold_falls_back_to_sequential_pairs():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.body(x) if x.sum() != 0 else x

    model = Untraceable()
    model(torch.randn(4, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    folded = fastnorm.fold_batch_norm(model)
    assert isinstance(folded.body[1], nn.Identity)
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_converting_a_deep_copy_leaves_the_original_alone():
    # parametrize's deep copies share one class; converting (or reverting) one copy must
    # not take the weight property away from the others
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)))
    twin = copy.deepcopy(model)
    x = torch.randn(2, 4)
    expected = model(x)
    fastnorm.revert(fastnorm.convert(twin))
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(twin(x), expected, **TOL)
    copy_of_converted = copy.deepcopy(fastnorm.convert(copy.deepcopy(model)))
    fastnorm.revert(copy_of_converted)
    torch.testing.assert_close(model(x), expected)


def test_revert_undoes_the_fx_fusion():
    """revert of a model converted with fuse_activations=True: torch's modules, the
    original's state_dict keys (in its order), and the original's results."""
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    original = make_net(x.float()).double()
    keys = list(original.state_dict())
    fused = fastnorm.convert(make_net(x.float()).double(), fuse_activations=True)
    assert sum(1 for m in fused.modules() if getattr(m, "activation", None)) == 4
    assert list(fused.state_dict()) == keys  # (fx orders its containers as the model)
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    reverted = fastnorm.revert(fused)
    assert not any(isinstance(m, fastnorm.BatchNorm2d) or hasattr(m, "activation") for m in reverted.modules())
    assert not any(n.op == "call_module" and len(n.args) > 1 for n in reverted.graph.nodes)
    assert list(reverted.state_dict()) == keys
    for mode in (True, False):
        original.train(mode), reverted.train(mode)
        ours, theirs = forward_backward(reverted, x), forward_backward(original, x)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
        for name, g in theirs[2].items():
            torch.testing.assert_close(ours[2][name], g, rtol=1e-9, atol=1e-12)
    # a fused batch norm outside a graph has no torch counterpart
    with pytest.raises(ValueError, match="fused activation"):
        fastnorm.revert(nn.Sequential(fastnorm.BatchNorm2d(3, activation="relu")))


def make_old_api(dim):
    """Modules under torch's deprecated weight-norm hook, dim 0, 2 (the kernel axis of a
    Conv1d), -1 (the whole tensor, torch's convention) and a negative dim; and one under
    torch's parametrization."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(nn.utils.weight_norm(nn.Conv1d(3, 4, 3, padding=1), dim=dim),
                             nn.utils.weight_norm(nn.ConvTranspose1d(4, 4, 4, 2, padding=1), dim=dim),
                             nn.utils.weight_norm(nn.Conv1d(4, 2, 5, padding=2), name="bias", dim=0),
                             nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 2, 3, padding=1), dim=dim)).double()


@pytest.mark.parametrize("dim", [0, 2, -2, None])
def test_old_weight_norm_hook_keeps_its_names(dim):
    theirs, ours = make_old_api(dim), make_old_api(dim)
    keys = list(theirs.state_dict())
    assert {"0.weight_g", "0.weight_v", "2.bias_g", "2.bias_v", "3.parametrizations.weight.original0"} <= set(keys)
    params = [id(p) for p in ours.parameters()]
    fastnorm.convert(ours)
    hooks = [type(h) for m in ours for h in m._forward_pre_hooks.values()]
    assert hooks == [_WeightNormHook] * 3
    assert type(ours[3].parametrizations.weight[0]).__module__ == "fastnorm.weight_norm"
    assert [id(p) for p in ours.parameters()] == params and list(ours.state_dict()) == keys
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    ref, got = forward_backward(theirs, x), forward_backward(ours, x)
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert list(got[2]) == list(ref[2])
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-10, atol=1e-12)
    assert fastnorm.convert(ours) is ours and [type(h) for m in ours for h in m._forward_pre_hooks.values()] == hooks

    # a checkpoint moves both ways, and survives pickling with fastnorm's hook in it
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), ours(x))
    other = make_old_api(dim)
    other.load_state_dict(ours.state_dict())
    torch.testing.assert_close(other(x), ours(x), rtol=1e-10, atol=1e-12)

    # revert(convert(m)) is m: torch's hooks, the same keys and values
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    fastnorm.revert(ours)
    assert [type(h) for m in ours for h in m._forward_pre_hooks.values()] == [TorchWeightNormHook] * 3
    assert type(ours[3].parametrizations.weight[0]).__module__.startswith("torch")
    assert list(ours.state_dict()) == keys
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    torch.testing.assert_close(forward_backward(ours, x)[0], ref[0], rtol=0, atol=0)

    # torch's remove_weight_norm takes fastnorm's hook off, leaving w
    converted = fastnorm.convert(make_old_api(dim))
    for m in converted[:3]:
        nn.utils.remove_weight_norm(m, "bias" if m is converted[2] else "weight")
    assert not any(m._forward_pre_hooks for m in converted)
    torch.testing.assert_close(converted(x), theirs(x), rtol=1e-10, atol=1e-12)


def test_fold_batch_norm_after_an_old_weight_norm_hook():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4), nn.ReLU())
    fastnorm.convert(model)
    x = torch.randn(8, 3, 6, 6)
    model(x * 2 + 1)
    model.eval()
    expected = model(x)
    folded = fastnorm.fold_batch_norm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert not folded.get_submodule("0")._forward_pre_hooks  # w is a plain parameter again
    torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


def test_revert_changes_nothing_when_it_cannot_revert():
    torch.manual_seed(0)
    model = fastnorm.convert(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)))
    fastnorm.weight_norm(model[1], eps=1e-6)  # torch's weight norm has no eps
    with pytest.raises(ValueError, match="eps"):
        fastnorm.revert(model)
    assert type(model[0]) is fastnorm.BatchNorm2d
