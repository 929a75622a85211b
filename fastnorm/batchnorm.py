"""Drop-in batch-norm modules.

Each subclasses the torch module it replaces, so parameters, buffers, state_dict keys,
checkpoint loading, input checks and isinstance checks are torch's; only the computation is
fastnorm's, with an optional residual and a fused activation.
"""
import torch

from ._ops import activation_code
from .functional import _batch_norm


class _FastBatchNorm:
    """Constructor and forward shared by the BatchNorm1d/2d/3d classes (mixed in before the
    torch class)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, activation=None,
                 negative_slope=0.01):
        activation_code(activation)  # ValueError for an unknown name
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        # As torch's _BatchNorm.forward: batch statistics in training (and when there are no
        # running statistics), running statistics updated only when tracked.
        track = self.training and self.track_running_stats
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        return _batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight, self.bias, use_batch_stats, self.momentum, self.eps,
            residual, self.activation, self.negative_slope,
            num_batches_tracked=self.num_batches_tracked if track else None,
        )

    def extra_repr(self):
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        return s


_DOC = """Drop-in for torch.nn.{name} computed by fastnorm's kernels.

    ``module(input, residual=None)`` returns ``act(batch_norm(input) + residual)``, with
    ``activation`` one of None, "relu", "leaky_relu" (slope ``negative_slope``), "silu".
    Input {shapes}, contiguous or channels-last (the output keeps the input's layout),
    float64/float32/float16/bfloat16 with float32 or input-dtype parameters.
    """


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(name="BatchNorm1d", shapes="(N, C) or (N, C, L)")


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(name="BatchNorm2d", shapes="(N, C, H, W)")


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(name="BatchNorm3d", shapes="(N, C, D, H, W)")
