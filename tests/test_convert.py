"""Whole-model conversion: convert / revert keep every value, the fx activation fusion, and
batch-norm folding for inference."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastnorm
from conftest import assert_close_to_reference
from fastnorm.reference import TOLERANCES

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
            self.head = nn.utils.weight_norm(nn.Linear(8, 6))  # the deprecated hook
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
    assert weight_norm_of(model.head) is not None and weight_norm_of(model.out).dim == -1
    assert {id(p) for p in model.parameters()} == params_before  # optimizers keep working
    for mode in ("train", "eval"):
        for m in (theirs, model, exact):
            m.train(mode == "train")
        ref, ours, ref64 = forward_backward(theirs, x), forward_backward(model, x), forward_backward(exact, x.double())
        assert_close_to_reference(ours[0], ref64[0], torch.float32, ref[0], what=f"{mode} output")
        assert_close_to_reference(ours[1], ref64[1], torch.float32, ref[1], what=f"{mode} grad input")
        for name, g in ref[2].items():
            new_name = name.replace("head.weight_g", "head.parametrizations.weight.original0").replace(
                "head.weight_v", "head.parametrizations.weight.original1")
            assert_close_to_reference(ours[2][new_name], ref64[2][name], torch.float32, g, what=f"{mode} {name}",
                                      per_tensor=True)
    for a, b in zip(theirs.buffers(), model.buffers()):
        torch.testing.assert_close(a, b, **TOL)
    fastnorm.revert(model)
    assert type(model.stem[1]) is nn.BatchNorm2d and type(model.bn1d) is nn.BatchNorm1d
    assert type(model.head.parametrizations.weight[0]).__module__.startswith("torch")
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
