"""fastnorm: fused batch-norm and weight-norm kernels for PyTorch, CPU and CUDA."""
from .version import __version__
from . import _ops
from . import functional
from .batchnorm import (BatchNorm1d, BatchNorm2d, BatchNorm3d, MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d,
                        MeanOnlyBatchNorm3d)
from .sync_batchnorm import SyncBatchNorm
from .convert import convert, fold_batch_norm, revert
from .weight_norm import data_dependent_init, remove_weight_norm, weight_norm
from . import reference


def backends():
    """What this build can run: {"cpu": True, "cuda": bool, "cuda_arch": [...], ...}.

    "cuda" is True when the CUDA kernels are compiled in and a GPU is visible;
    "cuda_compiled" says whether they are compiled in at all.
    """
    import torch

    info = _ops._C.build_info()
    archs = [a for a in info["cuda_archs"].replace(",", ";").split(";") if a]
    return {
        "cpu": True,
        "cpu_capability": info["cpu_capability"],
        "cuda": bool(info["cuda"]) and torch.cuda.is_available(),
        "cuda_compiled": bool(info["cuda"]),
        "cuda_arch": archs,
    }


__all__ = [
    "__version__",
    "backends",
    "functional",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "MeanOnlyBatchNorm1d",
    "MeanOnlyBatchNorm2d",
    "MeanOnlyBatchNorm3d",
    "weight_norm",
    "remove_weight_norm",
    "data_dependent_init",
    "convert",
    "revert",
    "fold_batch_norm",
]
