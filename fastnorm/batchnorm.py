"""Drop-in batch-norm modules.

Each subclasses the torch module it replaces, so parameters, buffers, state_dict keys,
checkpoint loading, input checks and isinstance checks are torch's; only the computation is
fastnorm's, with an optional residual and a fused activation.
"""
import torch

from ._ops import acc_dtype, activation_code, transforms_active
from .functional import _batch_norm


class _FastBatchNorm:
    """Constructor and forward shared by the BatchNorm1d/2d/3d classes (mixed in before the
    torch class)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, activation=None,
                 negative_slope=0.01, **torch_kwargs):
        activation_code(activation)  # ValueError for an unknown name
        # torch_kwargs: what this torch's module takes beyond these (bias=False in newer torch)
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **torch_kwargs)
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
    ``activation`` one of None, "relu", "leaky_relu" (slope ``negative_slope``), "silu",
    "relu6", "hardswish", "gelu", "gelu_tanh" (GELU's tanh approximation), "elu" (alpha 1).
    Input {shapes}, contiguous or channels-last (the output keeps the input's layout),
    float64/float32/float16/bfloat16 with input-dtype parameters (float32 also for
    float16/bfloat16 input). Other keyword arguments go to torch's module (e.g. bias=False).
    """


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    __doc__ = _DOC.format(name="BatchNorm1d", shapes="(N, C) or (N, C, L)")


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    __doc__ = _DOC.format(name="BatchNorm2d", shapes="(N, C, H, W)")


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    __doc__ = _DOC.format(name="BatchNorm3d", shapes="(N, C, D, H, W)")


# ---------------------------------------------------------------------------------------
# Mean-only batch normalization (Salimans & Kingma, 2016): y = x - mean + bias, the batch
# mean in training (a running mean tracked for evaluation), no variance. Built on the
# batch-norm ops with a unit variance and eps 0, so that their scale is exactly 1.

class _MeanOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, bias, running_mean, num_batches_tracked, use_batch_stats, momentum):
        from ._ops import acc_dtype, ops

        C = input.shape[1]
        ones = input.new_ones(C, dtype=acc_dtype(input.dtype))
        if use_batch_stats:
            mean, _ = ops.batch_norm_stats(input)
            if running_mean is not None and num_batches_tracked is not None:
                num_batches_tracked.add_(1)
                # momentum=None: the cumulative average, 1 / num_batches_tracked (kept on the device)
                factor = num_batches_tracked.reciprocal().to(running_mean.dtype) if momentum is None else momentum
                running_mean.lerp_(mean.to(running_mean.dtype), factor)
        else:
            mean = running_mean.to(ones.dtype)
        out = ops.batch_norm_elemt(input, mean, ones, None, bias, None, 0.0, 0, 0.0)
        ctx.use_batch_stats = use_batch_stats
        ctx.save_for_backward(input, mean, ones)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from ._ops import ops

        input, mean, ones = ctx.saved_tensors
        dims = [0] + list(range(2, input.dim()))
        sum_dz = grad_out.sum(dim=dims, dtype=ones.dtype)
        count = input.numel() // max(input.shape[1], 1)
        mean_dz = sum_dz / count if ctx.use_batch_stats else torch.zeros_like(sum_dz)
        grad_in = None
        if ctx.needs_input_grad[0]:
            grad_in, _ = ops.batch_norm_backward_elemt(grad_out, input, mean, ones, None, None, None, None, mean_dz,
                                                       torch.zeros_like(sum_dz), 0.0, 0, 0.0, False)
        grad_bias = sum_dz if ctx.needs_input_grad[1] else None
        return grad_in, grad_bias, None, None, None, None


def _mean_only_composite(input, bias, running_mean, num_batches_tracked, use_batch_stats, momentum):
    """_MeanOnly in ATen ops, for torch.func transforms and forward-mode AD."""
    acc = acc_dtype(input.dtype)
    shape = [1, -1] + [1] * (input.dim() - 2)
    x = input.to(acc)
    if use_batch_stats:
        mean = x.mean([0, *range(2, input.dim())])
        if running_mean is not None and num_batches_tracked is not None:
            with torch.no_grad():
                num_batches_tracked.add_(1)
                factor = 1.0 / float(num_batches_tracked.item()) if momentum is None else momentum
                running_mean.lerp_(mean.detach().to(running_mean.dtype), factor)
    else:
        mean = running_mean.to(acc)
    y = x - mean.reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    return y.to(input.dtype)


class _MeanOnlyBatchNorm(torch.nn.Module):
    """Subtracts the batch mean per channel (the running mean in evaluation) and adds a
    learned bias: Salimans & Kingma's companion to weight normalization."""

    _expected_dims = ()

    def __init__(self, num_features, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **factory)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)

    def _check_input_dim(self, input):
        if input.dim() not in self._expected_dims:
            raise ValueError(f"expected {' or '.join(f'{d}D' for d in self._expected_dims)} input "
                             f"(got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels (input.size(1)), got input of shape "
                             f"{list(input.shape)}")

    def forward(self, input):
        self._check_input_dim(input)
        use_batch_stats = self.training or self.running_mean is None
        track = self.training and self.track_running_stats
        if use_batch_stats:
            count = input.numel() // max(input.shape[1], 1)
            if count < 1:
                raise ValueError(f"expected at least 1 value per channel, got input of shape {list(input.shape)}")
        use_running = not self.training or self.track_running_stats
        if transforms_active():
            return _mean_only_composite(input, self.bias, self.running_mean if use_running else None,
                                        self.num_batches_tracked if track else None, use_batch_stats, self.momentum)
        return _MeanOnly.apply(input, self.bias, self.running_mean if use_running else None,
                               self.num_batches_tracked if track else None, use_batch_stats, self.momentum)

    def extra_repr(self):
        return (f"{self.num_features}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class MeanOnlyBatchNorm1d(_MeanOnlyBatchNorm):
    """Mean-only batch norm for (N, C) or (N, C, L) input."""

    _expected_dims = (2, 3)


class MeanOnlyBatchNorm2d(_MeanOnlyBatchNorm):
    """Mean-only batch norm for (N, C, H, W) input."""

    _expected_dims = (4,)


class MeanOnlyBatchNorm3d(_MeanOnlyBatchNorm):
    """Mean-only batch norm for (N, C, D, H, W) input."""

    _expected_dims = (5,)
