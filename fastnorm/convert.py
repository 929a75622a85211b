"""Whole-model conversion: torch's batch norms and weight norms to fastnorm's and back, the
torch.fx fusion of a following activation (and residual add), and batch-norm folding for
inference."""
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import batchnorm as fbn
from .sync_batchnorm import SyncBatchNorm
from .weight_norm import _adopt, _remove, _WeightNorm, weight_norm_of

_TO_FAST = {nn.BatchNorm1d: fbn.BatchNorm1d, nn.BatchNorm2d: fbn.BatchNorm2d, nn.BatchNorm3d: fbn.BatchNorm3d}
_TO_TORCH = {fast: torch_cls for torch_cls, fast in _TO_FAST.items()}


def _map_modules(root, fn):
    """Replaces every module m under root (root included) by fn(m); returns the new root."""
    new_root = fn(root)
    for name, child in list(new_root.named_children()):
        new = _map_modules(child, fn)
        if new is not child:
            setattr(new_root, name, new)
    return new_root


def _move_state(old, new):
    """new takes old's parameters and buffers (the same objects: optimizers keep working)
    and mode."""
    for name, p in old.named_parameters(recurse=False):
        setattr(new, name, p)
    for name, b in old.named_buffers(recurse=False):
        setattr(new, name, b)
    new.train(old.training)
    return new


def _batch_norm_args(m):
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


def _to_fastnorm_batch_norm(m):
    if type(m) in _TO_FAST:
        return _move_state(m, _TO_FAST[type(m)](**_batch_norm_args(m)))
    if type(m) is nn.SyncBatchNorm:
        return _move_state(m, SyncBatchNorm(**_batch_norm_args(m), process_group=m.process_group))
    return m


def _to_torch_batch_norm(m):
    if type(m) in _TO_TORCH or type(m) is SyncBatchNorm:
        if m.activation is not None:
            raise ValueError(f"revert: {type(m).__name__} has a fused activation ({m.activation!r}), which torch's "
                             "batch norm cannot hold")
        if type(m) is SyncBatchNorm:
            return _move_state(m, nn.SyncBatchNorm(**_batch_norm_args(m), process_group=m.process_group))
        return _move_state(m, _TO_TORCH[type(m)](**_batch_norm_args(m)))
    return m


def _torch_weight_norms(m):
    """(name, dim, g, v, remove) for each torch weight norm of m: the parametrization and
    the deprecated hook (torch.nn.utils.weight_norm)."""
    found = []
    plists = getattr(m, "parametrizations", {}) if parametrize.is_parametrized(m) else {}
    for name, plist in plists.items():
        if len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm" and not isinstance(plist[0], _WeightNorm):
            found.append((name, plist[0].dim, plist.original0, plist.original1,
                          lambda n=name: _remove(m, n)))
    for hook in list(m._forward_pre_hooks.values()):
        if type(hook).__name__ == "WeightNorm" and hasattr(hook, "name"):
            g, v = getattr(m, hook.name + "_g"), getattr(m, hook.name + "_v")
            found.append((hook.name, hook.dim, g, v, lambda n=hook.name: nn.utils.remove_weight_norm(m, n)))
    return found


def _to_fastnorm_weight_norm(m):
    for name, dim, g, v, remove in _torch_weight_norms(m):
        remove()
        _adopt(m, name, dim, 0.0, g, v)
    return m


def _to_torch_weight_norm(m):
    plists = dict(m.parametrizations.items()) if parametrize.is_parametrized(m) else {}
    for name in list(plists):
        wn = weight_norm_of(m, name)
        if wn is None:
            continue
        if wn.eps != 0.0:
            raise ValueError(f"revert: {type(m).__name__}.{name} has a weight norm with eps={wn.eps}, which torch's "
                             "cannot hold")
        g, v = plists[name].original0, plists[name].original1
        _remove(m, name)
        nn.utils.parametrizations.weight_norm(m, name, dim=None if wn.dim == -1 else wn.dim)
        m.parametrizations[name].original0 = g
        m.parametrizations[name].original1 = v
    return m


def convert(model, batch_norm=True, weight_norm=True, fuse_activations=False):
    """Swaps, in place, every torch BatchNorm1d/2d/3d and SyncBatchNorm for fastnorm's and
    every torch weight norm (the parametrization and the deprecated
    ``torch.nn.utils.weight_norm`` hook) for fastnorm's, keeping every value (the same
    parameter and buffer objects): outputs and gradients are the same before and after.

    ``fuse_activations=True`` also traces the model with torch.fx and folds a ReLU, SiLU or
    LeakyReLU that directly follows a batch norm (and a residual add between them) into the
    batch norm's fused epilogue; it returns the traced GraphModule, or the model as it was
    when it does not trace. Returns the model."""
    if batch_norm:
        model = _map_modules(model, _to_fastnorm_batch_norm)
    if weight_norm:
        model = _map_modules(model, _to_fastnorm_weight_norm)
    if fuse_activations:
        model = fuse_batch_norm_activations(model)
    return model


def revert(model):
    """Undoes convert: fastnorm's batch norms and weight norms back to torch's (torch's
    weight-norm parametrization, also for modules that had the deprecated hook), keeping
    every value. Batch norms with a fused activation cannot be reverted (ValueError).
    Returns the model."""
    model = _map_modules(model, _to_torch_batch_norm)
    return _map_modules(model, _to_torch_weight_norm)


# ---------------------------------------------------------------------------------------
# torch.fx passes.

_FAST_BN = (fbn.BatchNorm1d, fbn.BatchNorm2d, fbn.BatchNorm3d, SyncBatchNorm)
_ANY_BN = (nn.modules.batchnorm._BatchNorm,)


def _activation_of(gm, node):
    """The fastnorm activation (name, negative slope) a node applies, or None."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if type(m) is nn.ReLU:
            return "relu", 0.01
        if type(m) is nn.SiLU:
            return "silu", 0.01
        if type(m) is nn.LeakyReLU:
            return "leaky_relu", m.negative_slope
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return "relu", 0.01
        if node.target is F.silu:
            return "silu", 0.01
        if node.target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", slope) if isinstance(slope, (int, float)) else None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu", 0.01
    return None


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, also keeping fastnorm's batch norms whole (they check their
    input's shape, which a traced value cannot answer)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _ANY_BN) or super().is_leaf_module(m, qualname)


def _trace(model):
    """model as a GraphModule, or None when it does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 -- any tracing failure: the caller leaves the model as it was
        return None
    return torch.fx.GraphModule(model, graph, type(model).__name__)


def _single_call(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target) == 1


def fuse_batch_norm_activations(model):
    """torch.fx pass: ``act(bn(x))`` and ``act(bn(x) + r)`` become ``bn(x, residual=r)``
    with the activation fused, for fastnorm batch norms called once whose output feeds only
    that activation (or that add). Returns the traced GraphModule, or the model unchanged
    when it does not trace."""
    gm = _trace(model)
    if gm is None:
        return model
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _FAST_BN):
            continue
        bn = gm.get_submodule(node.target)
        if bn.activation is not None or len(node.args) != 1 or node.kwargs or not _single_call(gm, node.target):
            continue
        users = list(node.users)
        if len(users) != 1:
            continue
        nxt, residual = users[0], None
        if nxt.op == "call_function" and nxt.target in (operator.add, operator.iadd, torch.add) and len(nxt.args) == 2 \
                and not nxt.kwargs and len(nxt.users) == 1:
            other = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
            if isinstance(other, torch.fx.Node) and other is not node:
                residual, nxt = (nxt, other), list(nxt.users)[0]
        act = _activation_of(gm, nxt)
        if act is None:
            continue
        bn.activation, bn.negative_slope = act
        # the fused call goes where the activation was: after the residual, which may be
        # computed after the batch norm
        with gm.graph.inserting_before(nxt):
            fused = gm.graph.call_module(node.target, (node.args[0],) + ((residual[1],) if residual else ()))
        nxt.replace_all_uses_with(fused)
        gm.graph.erase_node(nxt)
        if residual is not None:
            gm.graph.erase_node(residual[0])
        gm.graph.erase_node(node)
        changed = True
    if not changed:
        return model
    gm.graph.lint()
    gm.recompile()
    return gm


@torch.no_grad()
def _fold(conv, bn):
    """Folds eval-mode bn into conv (Conv1d/2d/3d or Linear), in float64, keeping conv's
    dtype and memory format."""
    if parametrize.is_parametrized(conv, "weight"):
        _remove(conv, "weight")
    w = conv.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / (var + bn.eps).sqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    w.copy_((w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
    new_bias = ((bias - mean) * scale + beta).to(w.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(w.device))
    else:
        conv.bias.copy_(new_bias)


def _foldable(conv, bn):
    return (type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) and isinstance(bn, _ANY_BN)
            and bn.running_mean is not None and bn.num_features == conv.weight.shape[0])


def _epilogue_module(bn):
    act = getattr(bn, "activation", None)
    if act is None:
        return nn.Identity()
    return {"relu": nn.ReLU(), "silu": nn.SiLU(), "leaky_relu": nn.LeakyReLU(getattr(bn, "negative_slope", 0.01))}[act]


def fold_batch_norm(model):
    """For inference: folds every batch norm that directly follows a Conv1d/2d/3d or Linear
    into it (the batch norm's running statistics and affine parameters into the weight and
    bias; a fused activation stays as a module). Needs ``model.eval()``. Returns the folded
    model: a torch.fx GraphModule when the model traces, else the model itself with the
    pairs inside nn.Sequential folded."""
    if model.training:
        raise ValueError("fold_batch_norm folds the evaluation-mode batch norm: call model.eval() first")
    gm = _trace(model)
    if gm is None:
        return _fold_sequentials(model)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _ANY_BN):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = gm.get_submodule(src.target)
        if not _foldable(conv, bn) or not _single_call(gm, node.target) or not _single_call(gm, src.target):
            continue
        _fold(conv, bn)
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        act = _epilogue_module(bn)
        with gm.graph.inserting_before(node):
            out = src
            if residual is not None:
                out = gm.graph.call_function(operator.add, (src, residual))
            if not isinstance(act, nn.Identity):
                gm.add_submodule(node.target, act)  # the batch norm's name now holds its activation
                out = gm.graph.call_module(node.target, (out,))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        if isinstance(act, nn.Identity):
            gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def _fold_sequentials(model):
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if _foldable(conv, bn):
                    _fold(conv, bn)
                    module._modules[b] = _epilogue_module(bn)
    return model
