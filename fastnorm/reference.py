"""Pure-torch references, shared by the tests and the benchmark.

Each composes torch's own ops: what fastnorm must equal.
"""
import torch
import torch.nn.functional as F

# Tolerances by dtype for results compared with a float64 reference. Low-precision results
# must also be at most twice as far from the reference as torch's own result in that dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
}


def activate(x, activation, negative_slope=0.01):
    if activation is None:
        return x
    if activation == "relu":
        return F.relu(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    if activation == "silu":
        return F.silu(x)
    if activation == "relu6":
        return F.relu6(x)
    if activation == "hardswish":
        return F.hardswish(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "elu":
        return F.elu(x)
    raise ValueError(f"unknown activation {activation!r}")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, residual=None, activation=None, negative_slope=0.01):
    """torch.nn.functional.batch_norm, then + residual, then the activation."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return activate(y, activation, negative_slope)


def batch_norm_module(module_cls, num_features, *, activation=None, negative_slope=0.01, **kwargs):
    """A torch BatchNorm module followed by the activation, for module-level comparisons:
    ``ref(x, residual)`` = act(bn(x) + residual)."""

    class Reference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = module_cls(num_features, **kwargs)

        def forward(self, x, residual=None):
            y = self.bn(x)
            if residual is not None:
                y = y + residual
            return activate(y, activation, negative_slope)

    return Reference()
