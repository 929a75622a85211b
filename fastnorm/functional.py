"""Functional API: fastnorm.functional.batch_norm and fastnorm.functional.weight_norm."""
import torch

from ._ops import activation_code, calls, weight_norm_w


def _verify_batch_size(size):
    count = size[0]
    for s in size[2:]:
        count *= s
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                residual, activation, negative_slope, num_batches_tracked=None):
    """Shared by the functional and the modules. momentum=None is the cumulative average,
    which needs num_batches_tracked (the modules pass theirs)."""
    act = activation_code(activation)
    # As torch.nn.functional.batch_norm.
    if training and not eps > 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training:
        _verify_batch_size(input.size())
        cumulative = momentum is None
        if cumulative and running_mean is not None and num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        out, _, _ = calls.batch_norm_train(
            input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
            0.0 if cumulative else float(momentum), cumulative, float(eps), act, float(negative_slope))
        return out
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: running_mean and running_var are needed when training=False")
    return calls.batch_norm_elemt(input, running_mean, running_var, weight, bias, residual,
                                float(eps), act, float(negative_slope))


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, residual=None, activation=None, negative_slope=0.01):
    """Batch normalization with the semantics of torch.nn.functional.batch_norm, plus an
    optional residual added before an optional fused activation:
    ``act(batch_norm(input) + residual)``.

    In training, batch statistics normalize the input and, when given, running_mean and
    running_var are updated in place with ``momentum`` (the variance unbiased). Otherwise the
    running statistics normalize it. Statistics accumulate in float32 (float64 for float64
    input).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2 and residual is None and activation is None:
        # No channel dimension: torch's answer (an empty result for an empty input, else
        # torch's error).
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training,
                                              momentum, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       residual, activation, negative_slope)


def weight_norm(v, g, dim=0, *, eps=0.0):
    """The weight-norm reparametrization ``w = g * v / ||v||``, the norm taken over every
    dimension but ``dim``; ``dim=None`` (or -1, torch's convention) takes it over the whole
    tensor. With ``eps=0`` this is ``torch._weight_norm`` (a zero-norm slice gives NaN, as
    there); ``eps > 0`` is added under the square root, ``||v|| = sqrt(sum(v^2) + eps)``,
    which keeps such slices finite. Norms accumulate in float32 (float64 for float64 v); the
    result keeps v's dtype and, for dim 0, its memory format.
    """
    return weight_norm_w(v, g, dim, eps)
