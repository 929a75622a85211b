"""Synchronized batch norm on torch.distributed (NCCL on GPUs, gloo on CPUs).

Each process computes its batch's per-channel count, mean and M2 with the batch-norm
kernels; one all-gather exchanges them and every process merges them exactly (the set
means and M2s, not an inverse standard deviation). The backward all-reduces the two
per-channel sums in one collective. Nothing waits on the host (no .item()); a process with
an empty batch still takes part; evaluation uses the running statistics without
communication; outside a process group it is plain batch norm.
"""
import torch
import torch.distributed as dist

from ._ops import acc_dtype, activation_code, activation_needs_z, ops, transforms_active
from .batchnorm import _FastBatchNorm


def _merge(gathered, C):
    """Global (count, mean, biased var, M2) from rows [count, mean[C], M2[C]] per process.
    Processes with no values (count 0, NaN moments) contribute nothing."""
    count = gathered[:, :1]
    mean = torch.where(count > 0, gathered[:, 1:1 + C], torch.zeros_like(gathered[:, 1:1 + C]))
    m2 = torch.where(count > 0, gathered[:, 1 + C:], torch.zeros_like(gathered[:, 1 + C:]))
    total = count.sum(0)
    global_mean = (count * mean).sum(0) / total
    global_m2 = (m2 + count * (mean - global_mean).square()).sum(0)
    return total, global_mean, global_m2 / total, global_m2


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
                act, slope, group, world_size):
        C = input.shape[1]
        acc = acc_dtype(input.dtype)
        count = input.numel() // max(C, 1)
        mean, var = ops.batch_norm_stats(input)
        local = torch.cat([torch.full((1,), float(count), dtype=acc, device=input.device), mean, var * count])
        gathered = torch.empty(world_size, local.numel(), dtype=acc, device=input.device)
        dist.all_gather(list(gathered.unbind(0)), local, group=group)
        total, g_mean, g_var, g_m2 = _merge(gathered, C)
        if running_mean is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            # momentum=None: the cumulative average 1 / num_batches_tracked, kept on the device
            factor = momentum if momentum is not None else num_batches_tracked.reciprocal().to(running_mean.dtype)
            unbiased = g_m2 / (total - 1).clamp_min(1)
            running_mean.lerp_(g_mean.to(running_mean.dtype), factor)
            running_var.lerp_(unbiased.to(running_var.dtype), factor)
        out = ops.batch_norm_elemt(input, g_mean, g_var, weight, bias, residual, eps, act, slope)
        needs_z = activation_needs_z(act, slope)
        ctx.save_for_backward(input, weight, bias, residual if act and needs_z else None,
                              out if act and not needs_z else None, g_mean, g_var, total)
        ctx.eps, ctx.act, ctx.slope, ctx.group = eps, act, slope, group
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input, weight, bias, residual, out, mean, var, total = ctx.saved_tensors
        sum_dz, sum_dz_xmu = ops.batch_norm_backward_reduce(grad_out, input, mean, var, weight, bias, residual, out,
                                                             ctx.eps, ctx.act, ctx.slope)
        # The parameters' gradients are this process's (DDP averages them), as in torch.
        invstd = (var + ctx.eps).rsqrt()
        grad_weight = (sum_dz_xmu * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dz.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        sums = torch.cat([sum_dz, sum_dz_xmu])
        dist.all_reduce(sums, group=ctx.group)
        C = sum_dz.numel()
        mean_dz, mean_dz_xmu = sums[:C] / total, sums[C:] / total
        want_preact = ctx.has_residual and ctx.needs_input_grad[3] and ctx.act != 0
        grad_input, grad_preact = ops.batch_norm_backward_elemt(grad_out, input, mean, var, weight, bias, residual,
                                                                 out, mean_dz, mean_dz_xmu, ctx.eps, ctx.act,
                                                                 ctx.slope, want_preact)
        grad_residual = None
        if ctx.has_residual and ctx.needs_input_grad[3]:
            grad_residual = grad_preact if ctx.act != 0 else grad_out
        return (grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None, None, None,
                None)


class SyncBatchNorm(_FastBatchNorm, torch.nn.SyncBatchNorm):
    """Drop-in for torch.nn.SyncBatchNorm (same parameters, buffers and state_dict), on any
    torch.distributed backend (gloo on CPUs too), with fastnorm's fused residual and
    activation: ``module(input, residual=None)``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, activation=None, negative_slope=0.01,
                 **torch_kwargs):
        activation_code(activation)
        torch.nn.SyncBatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                        process_group, device=device, dtype=dtype, **torch_kwargs)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        group = self.process_group or (dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        world_size = dist.get_world_size(group) if group is not None else 1
        if not use_batch_stats or world_size == 1:
            return super().forward(input, residual)
        if transforms_active():
            raise RuntimeError("fastnorm.SyncBatchNorm: torch.func transforms and forward-mode AD are not supported "
                               "for statistics synchronized across processes (nor are they by torch's "
                               "SyncBatchNorm); in a single process they work as for BatchNorm")
        track = self.training and self.track_running_stats
        act = activation_code(self.activation)
        return _SyncBatchNorm.apply(input, self.weight, self.bias, residual,
                                    self.running_mean if track else None, self.running_var if track else None,
                                    self.num_batches_tracked if track else None, self.momentum, float(self.eps),
                                    act, float(self.negative_slope), group, world_size)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every BatchNorm1d/2d/3d (torch's or fastnorm's) in ``module`` by a
        fastnorm SyncBatchNorm holding the same values; returns the converted module."""
        converted = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group,
                            activation=getattr(module, "activation", None),
                            negative_slope=getattr(module, "negative_slope", 0.01))
            if module.affine:
                with torch.no_grad():
                    converted.weight = module.weight
                    converted.bias = module.bias
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.training = module.training
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return converted
