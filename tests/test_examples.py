"""The examples run (shortened) and do what they say."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from conftest import DEVICES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [[], ["--fuse", "--channels-last"]])
def test_train_resnet(device, extra, capsys):
    results = load("train_resnet").main(["--steps", "6", "--batch", "8", "--size", "8", "--warmup", "2",
                                         "--device", device] + extra)
    torch_losses, fast_losses = results[device]
    assert len(torch_losses) == len(fast_losses) == 6
    assert all(math.isfinite(v) for v in torch_losses + fast_losses)
    # the same initial weights and batch: the first losses agree to rounding
    assert fast_losses[0] == pytest.approx(torch_losses[0], rel=1e-5)
    out = capsys.readouterr().out
    assert "time per step" in out and "steps within 1e-4 of the float64 loss" in out
