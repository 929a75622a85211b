"""The benchmark's model suite (fastnorm.model_zoo, fastnorm.bench_models) at its quick size:
every model builds for every contender from the same weights, converts (fused where it has
batch norms), trains, and agrees with torch's first loss."""
import dataclasses

import pytest
import torch

import fastnorm
from fastnorm import bench_models, model_zoo
from fastnorm.weight_norm import _WeightNorm, _WeightNormHook

pytest.importorskip("timm")
pytest.importorskip("torchvision")

CASES = model_zoo.suite("quick")


def fastnorm_layers(model):
    norms = [m for m in model.modules() if isinstance(m, fastnorm.batchnorm._FastBatchNorm)]
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values() if isinstance(h, _WeightNormHook)]
    return norms, hooks + [m for m in model.modules() if isinstance(m, _WeightNorm)]


def test_suite_covers_the_models_the_benchmark_promises():
    names = [(c.name, c.config) for c in model_zoo.suite()]
    assert ("resnet50", "float32 contiguous") in names and ("resnet50", "bfloat16 autocast channels_last") in names
    assert {"efficientnet_b0", "mobilenetv3_large_100", "hifigan", "lstm", "mlp"} <= {n for n, _ in names}
    assert all(c.batch == 1 for c in model_zoo.suite() if c.name == "mlp")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.name}-{c.config}" for c in CASES])
def test_contenders_convert_and_agree(case):
    fused = {}
    for impl in model_zoo.contenders(case):
        model, *_ = model_zoo.build(case, impl)
        norms, weight_norms = fastnorm_layers(model)
        if impl == "torch":
            assert not norms and not weight_norms
        elif case.batch_norm:
            assert norms, f"{impl}: no batch norm converted"
            fused[impl] = sum(m.activation is not None for m in norms)
        else:
            assert weight_norms, f"{impl}: no weight norm converted"
    if case.batch_norm:  # (timm's BatchNormAct2d fuses its activation in any case)
        assert fused["fastnorm fused"] > 0 and fused["fastnorm fused"] >= fused["fastnorm"], fused
        if case.library == "torchvision":
            assert fused["fastnorm"] == 0, fused
    res = bench_models.run_model_case(case, "cpu", rounds=2, warmup=1)
    assert set(res.ms) == set(model_zoo.contenders(case)) and all(t > 0 for t in res.ms.values())
    assert set(res.speedup) == set(model_zoo.contenders(case)) - {"torch"}
    # the same first step: the same loss, to the rounding of the dtype; under autocast,
    # as close to the float32 loss as torch's own (16-bit convolutions round by 1e-2)
    if case.autocast:
        exact = float(model_zoo.training_step(dataclasses.replace(case, dtype=torch.float32), "torch", "cpu")())
        torch_error = abs(res.first_loss["torch"] - exact)
        for impl, loss in res.first_loss.items():
            assert abs(loss - exact) <= 2 * torch_error + 1e-2 * abs(exact), (impl, loss, res.first_loss, exact)
    else:
        assert res.loss_difference < 1e-4, res.first_loss
    assert case.name in bench_models.format_model_results([res])


def test_training_steps_lower_the_loss_alike():
    case = model_zoo.by_name("hifigan", 1, 8)
    steps = {impl: model_zoo.training_step(case, impl, "cpu", lr=0.05) for impl in ("torch", "fastnorm")}
    losses = {impl: [float(step()) for _ in range(4)] for impl, step in steps.items()}
    torch.testing.assert_close(losses["fastnorm"], losses["torch"], rtol=1e-4, atol=0)
    assert losses["torch"][-1] < losses["torch"][0]

