"""Whole-model conversion: torch's batch norms and weight norms (and timm's and torchvision's
batch-norm layers) to fastnorm's and back, the torch.fx fusion of a following activation
(and residual add), and batch-norm folding for inference.

timm's BatchNormAct2d / SyncBatchNormAct / FrozenBatchNormAct2d and torchvision's
FrozenBatchNorm2d are converted in place: the module's class becomes a subclass of its own
class and of fastnorm's (made once per class, named in this module so that pickling works),
so isinstance checks, attributes, children, hooks and state_dict stay as they were; revert
gives the module its class back.
"""
import collections
import importlib
import operator
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm as _TorchWeightNormHook

from . import batchnorm as fbn
from ._ops import ACTIVATIONS
from .functional import _batch_norm
from .sync_batchnorm import SyncBatchNorm
from .weight_norm import (_adopt, _LegacyKeys, _remove, _swap_weight_norm_hooks, _WeightNorm, _WeightNormHook,
                          weight_norm_of)

_TO_FAST = {nn.BatchNorm1d: fbn.BatchNorm1d, nn.BatchNorm2d: fbn.BatchNorm2d, nn.BatchNorm3d: fbn.BatchNorm3d}
_TO_TORCH = {fast: torch_cls for torch_cls, fast in _TO_FAST.items()}


# ---------------------------------------------------------------------------------------
# Activations: which module or call computes which of the kernels' fused activations.

def _fusable(name, slope=0.01):
    """(name, slope) when the kernels fuse that activation, else None."""
    return (name, float(slope)) if name in ACTIVATIONS else None


def _timm_class(module, name):
    """timm's class ``name`` from ``timm.layers.<module>``, or None while timm is not imported
    (then no model holds one)."""
    return getattr(sys.modules.get(f"timm.layers.{module}"), name, None)


def _module_activation(m):
    """The fused activation (name, slope) that module m computes, ("identity", 0) for an
    identity, or None when the kernels do not fuse it. Exact types only (a subclass may
    compute something else)."""
    t = type(m)
    if t is nn.Identity:
        return "identity", 0.0
    if t is nn.LeakyReLU:
        return _fusable("leaky_relu", m.negative_slope)
    if t is nn.GELU:
        return _fusable("gelu" if m.approximate == "none" else "gelu_tanh")
    if t is nn.ELU:
        return _fusable("elu") if m.alpha == 1.0 else None  # (the kernels' ELU has alpha 1)
    simple = {nn.ReLU: "relu", nn.SiLU: "silu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}
    for module, names in (("activations", {"Swish": "silu", "HardSwish": "hardswish", "GELU": "gelu",
                                           "GELUTanh": "gelu_tanh"}),
                          ("activations_me", {"SwishMe": "silu", "HardSwishMe": "hardswish"})):
        for cls_name, act in names.items():
            cls = _timm_class(module, cls_name)
            if cls is not None:
                simple[cls] = act
    return _fusable(simple[t]) if t in simple else None


def _own_activation(m):
    """What a batch-norm layer computes after normalizing, as it stands: (name, slope), None
    (nothing: torch's and torchvision's layers, timm's with an identity act and drop), or
    False when that is more than the kernels fuse (a drop that is not an identity, an act
    they do not fuse). timm's layers hold theirs as children ``drop`` and ``act``."""
    drop, act = getattr(m, "drop", None), getattr(m, "act", None)
    if drop is not None and type(drop) is not nn.Identity:
        return False
    if act is None:
        return None
    found = _module_activation(act)
    if found is None:
        return False
    return None if found[0] == "identity" else found


def _same_activation(a, b):
    return a == b or (a is not None and b is not None and a[0] == b[0] != "leaky_relu")


def _function_activation(node):
    """The fused activation (name, slope) that a call_function / call_method node computes."""
    if node.op == "call_function":
        if node.target in (F.relu, torch.relu, torch.relu_):
            return _fusable("relu")
        if node.target in (F.silu,):
            return _fusable("silu")
        if node.target in (F.relu6,):
            return _fusable("relu6")
        if node.target in (F.hardswish,):
            return _fusable("hardswish")
        if node.target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return _fusable("leaky_relu", slope) if isinstance(slope, (int, float)) else None
        if node.target is F.gelu and len(node.args) == 1:
            approximate = node.kwargs.get("approximate", "none")
            return _fusable({"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)) if isinstance(approximate, str) \
                else None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return _fusable("relu")
    return None


def _activation_module(activation):
    name, slope = activation
    return {"relu": nn.ReLU, "silu": nn.SiLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "gelu": nn.GELU,
            "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "elu": nn.ELU,
            "leaky_relu": lambda: nn.LeakyReLU(slope)}[name]()


def _activation_node(graph, activation, x):
    name, slope = activation
    if name == "leaky_relu":
        return graph.call_function(F.leaky_relu, (x, slope))
    if name == "gelu_tanh":
        return graph.call_function(F.gelu, (x,), {"approximate": "tanh"})
    fn = {"relu": F.relu, "silu": F.silu, "relu6": F.relu6, "hardswish": F.hardswish, "gelu": F.gelu, "elu": F.elu}
    return graph.call_function(fn[name], (x,))


def _apply_activation(y, activation, slope):
    return y if activation is None else _activation_module((activation, slope))(y)


# ---------------------------------------------------------------------------------------
# timm's and torchvision's layers: fastnorm twins of their classes.

class _FrozenBatchNorm:
    """Mixed in before torchvision's FrozenBatchNorm2d and timm's FrozenBatchNormAct2d: their
    batch norm (running statistics, always; nothing updated) by fastnorm's kernels, with a
    fused residual and activation: ``module(input, residual=None)``. Where the kernels would
    not compute what torchvision's formula does (input other than 4-D, buffers of another
    dtype than the input, which torchvision promotes to; a negative eps; running statistics
    that require grad) it is torchvision's formula."""

    def forward(self, input, residual=None):
        w, b, mean, var = self.weight, self.bias, self.running_mean, self.running_var
        if (input.dim() == 4 and input.dtype == w.dtype == b.dtype == mean.dtype == var.dtype and self.eps >= 0
                and not (mean.requires_grad or var.requires_grad)):
            return _batch_norm(input, mean, var, w, b, False, 0.0, self.eps, residual, self.activation,
                               self.negative_slope)
        scale = w.reshape(1, -1, 1, 1) * (var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        y = input * scale + (b.reshape(1, -1, 1, 1) - mean.reshape(1, -1, 1, 1) * scale)
        if residual is not None:
            y = y + residual
        return _apply_activation(y, self.activation, self.negative_slope)

    def __repr__(self):
        s = super().__repr__()
        if self.activation is None:
            return s
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{s[:-1]}, activation={self.activation!r}{slope})" if s.endswith(")") else s


# (module, class name) -> the fastnorm class its twin mixes in first
_ADOPTABLE = {
    ("timm.layers.norm_act", "BatchNormAct2d"): fbn.BatchNorm2d,
    ("timm.layers.norm_act", "SyncBatchNormAct"): SyncBatchNorm,
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"): _FrozenBatchNorm,
    ("torchvision.ops.misc", "FrozenBatchNorm2d"): _FrozenBatchNorm,
}
_TWINS = {}      # adoptable class -> its twin
_BASE_OF = {}    # twin -> adoptable class


def _twin_name(module, name):
    return f"Fast_{module.replace('.', '_')}_{name}"


def _adoptable(cls):
    key = (cls.__module__, cls.__qualname__)
    return key in _ADOPTABLE and getattr(sys.modules.get(key[0]), key[1], None) is cls


def _twin(cls):
    """The fastnorm twin of an adoptable class: a subclass of fastnorm's class and of cls."""
    twin = _TWINS.get(cls)
    if twin is None:
        fast = _ADOPTABLE[(cls.__module__, cls.__qualname__)]
        qualname = _twin_name(cls.__module__, cls.__qualname__)
        twin = type(cls.__name__, (fast, cls), {
            "__module__": __name__, "__qualname__": qualname,
            "__doc__": f"{cls.__module__}.{cls.__qualname__} computed by fastnorm's kernels (fastnorm.convert).",
        })
        _TWINS[cls], _BASE_OF[twin] = twin, cls
        globals()[qualname] = twin  # where pickle looks for it
    return twin


def __getattr__(name):
    """A twin class by name, made on first use (unpickling in a new process)."""
    for module, cls_name in _ADOPTABLE:
        if _twin_name(module, cls_name) == name:
            return _twin(getattr(importlib.import_module(module), cls_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _frozen_classes():
    """torchvision's and timm's frozen batch norms (those imported), and fastnorm's twins."""
    found = [_FrozenBatchNorm]
    for module, name in (("torchvision.ops.misc", "FrozenBatchNorm2d"),
                         ("timm.layers.norm_act", "FrozenBatchNormAct2d")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def _bn_like(m):
    """Whether m is a batch norm of any kind convert and fold know: torch's (and every
    subclass: fastnorm's, timm's), and the frozen ones."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or isinstance(m, _frozen_classes())


def _is_fast(m):
    return isinstance(m, (fbn._FastBatchNorm, _FrozenBatchNorm))


def _added_activation(m):
    """The activation a fastnorm batch norm fuses beyond what its torch counterpart computes
    itself (timm's act): one the fx pass fused, or one it was built with; None if none."""
    act = getattr(m, "activation", None)
    if act is None:
        return None
    mine = (act, m.negative_slope)
    own = _own_activation(m) if type(m) in _BASE_OF else None
    if own is None:
        return mine
    if _same_activation(own, mine):
        return None
    raise ValueError(f"{type(m).__name__} fuses {act!r} but its act module computes {own[0]!r}")


# ---------------------------------------------------------------------------------------
# Module swaps.

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
    if _adoptable(type(m)):
        own = _own_activation(m)
        if own is False:  # an activation or drop the kernels do not fuse: left as it is
            return m
        m.__class__ = _twin(type(m))
        m.activation, m.negative_slope = own if own is not None else (None, 0.01)
    return m


def _check_revertible(model):
    """ValueError, before revert changes anything, for what torch's modules cannot hold: a
    fused activation outside a torch.fx graph, a weight norm with eps."""
    for name, m in model.named_modules():
        if (type(m) in _BASE_OF or type(m) in _TO_TORCH or type(m) is SyncBatchNorm) and _added_activation(m):
            raise ValueError(f"revert: {name or 'the model'} ({type(m).__name__}) has a fused activation "
                             f"({m.activation!r}) that the torch module cannot hold (revert puts one back as a "
                             "call only in a torch.fx graph: convert(..., fuse_activations=True))")
        for wn_name in (dict(m.parametrizations.items()) if parametrize.is_parametrized(m) else {}):
            wn = weight_norm_of(m, wn_name)
            if wn is not None and wn.eps != 0.0:
                raise ValueError(f"revert: {name or 'the model'}.{wn_name} has a weight norm with eps={wn.eps}, "
                                 "which torch's cannot hold")


def _to_torch_batch_norm(m):
    if type(m) in _BASE_OF:
        m.__class__ = _BASE_OF[type(m)]
        del m.activation, m.negative_slope
        return m
    if type(m) in _TO_TORCH or type(m) is SyncBatchNorm:
        if type(m) is SyncBatchNorm:
            return _move_state(m, nn.SyncBatchNorm(**_batch_norm_args(m), process_group=m.process_group))
        return _move_state(m, _TO_TORCH[type(m)](**_batch_norm_args(m)))
    return m


def _torch_weight_norms(m):
    """(name, dim, g, v) for each weight norm of torch's parametrization on m."""
    found = []
    plists = getattr(m, "parametrizations", {}) if parametrize.is_parametrized(m) else {}
    for name, plist in plists.items():
        if len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm" and not isinstance(plist[0], _WeightNorm):
            found.append((name, plist[0].dim, plist.original0, plist.original1))
    return found


def _load_hooks(m, name, is_hook):
    """Keys of m's load-state-dict pre-hooks for which is_hook(hook, name)."""
    return [key for key, wrapped in m._load_state_dict_pre_hooks.items()
            if is_hook(getattr(wrapped, "hook", wrapped), name)]


def _is_torch_legacy_keys(fn, name):
    """torch's parametrizations.weight_norm registers a closure that maps old
    ``<name>_g`` / ``<name>_v`` checkpoint keys (fastnorm's _LegacyKeys does the same)."""
    if getattr(fn, "__name__", None) != "_weight_norm_compat_hook" or not getattr(fn, "__closure__", None):
        return False
    cells = dict(zip(fn.__code__.co_freevars, fn.__closure__))
    return "name" in cells and cells["name"].cell_contents == name


def _is_fastnorm_legacy_keys(hook, name):
    return isinstance(hook, _LegacyKeys) and hook.name == name


def _to_fastnorm_weight_norm(m):
    for name, dim, g, v in _torch_weight_norms(m):
        _remove(m, name)
        for key in _load_hooks(m, name, _is_torch_legacy_keys):  # (a closure: it would not pickle)
            del m._load_state_dict_pre_hooks[key]
        _adopt(m, name, dim, 0.0, g, v)
    # the deprecated hook: fastnorm's hook in its place, the parameters as they were
    _swap_weight_norm_hooks(m, _TorchWeightNormHook, _WeightNormHook)
    return m


def _to_torch_weight_norm(m):
    plists = dict(m.parametrizations.items()) if parametrize.is_parametrized(m) else {}
    for name in list(plists):
        wn = weight_norm_of(m, name)
        if wn is None:
            continue
        g, v = plists[name].original0, plists[name].original1
        _remove(m, name)
        for key in _load_hooks(m, name, _is_fastnorm_legacy_keys):  # torch's weight_norm adds its own
            del m._load_state_dict_pre_hooks[key]
        nn.utils.parametrizations.weight_norm(m, name, dim=None if wn.dim == -1 else wn.dim)
        m.parametrizations[name].original0 = g
        m.parametrizations[name].original1 = v
    _swap_weight_norm_hooks(m, _WeightNormHook, _TorchWeightNormHook)
    return m


def convert(model, batch_norm=True, weight_norm=True, fuse_activations=False):
    """Swaps, in place, every torch BatchNorm1d/2d/3d and SyncBatchNorm for fastnorm's and
    every torch weight norm for fastnorm's, keeping every value (the same parameter and
    buffer objects) and every state_dict key: outputs and gradients are the same before and
    after.

    - timm's BatchNormAct2d, SyncBatchNormAct and FrozenBatchNormAct2d, whose drop is an
      identity and whose act is one the kernels fuse (identity, ReLU, LeakyReLU, SiLU), and
      torchvision's FrozenBatchNorm2d become fastnorm twins of their class (still instances
      of it, with the same children), the act fused; others are left as they are.
    - The weight-norm parametrization becomes fastnorm's parametrization; the deprecated
      ``torch.nn.utils.weight_norm`` hook becomes fastnorm's hook in its place (the module
      keeps ``weight_g`` / ``weight_v``).

    ``fuse_activations=True`` also traces the model with torch.fx and folds a ReLU, SiLU or
    LeakyReLU that directly follows a batch norm (and a residual add between them; identity
    modules in between are passed over) into the batch norm's fused epilogue; it returns the
    traced GraphModule, or the model as it was when it does not trace. Returns the model."""
    if batch_norm:
        model = _map_modules(model, _to_fastnorm_batch_norm)
    if weight_norm:
        model = _map_modules(model, _to_fastnorm_weight_norm)
    if fuse_activations:
        model = fuse_batch_norm_activations(model)
    return model


def revert(model):
    """Undoes convert, keeping every value and state_dict key: fastnorm's batch norms back to
    torch's (timm's and torchvision's layers get their class back), fastnorm's weight-norm
    parametrization to torch's and fastnorm's hook to torch's deprecated hook. In a torch.fx
    GraphModule (``convert(..., fuse_activations=True)``), each fused residual and activation
    becomes the add and the activation call again. A batch norm with a fused activation
    outside such a graph cannot be reverted (ValueError). Returns the model."""
    for gm in [m for m in model.modules() if isinstance(m, torch.fx.GraphModule)]:
        _unfuse(gm)  # (the same computation, still fastnorm's)
    _check_revertible(model)
    model = _map_modules(model, _to_torch_batch_norm)
    return _map_modules(model, _to_torch_weight_norm)


# ---------------------------------------------------------------------------------------
# torch.fx passes.

class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, also keeping every batch norm whole (fastnorm's check their
    input's shape, which a traced value cannot answer; fold needs them as calls)."""

    def is_leaf_module(self, m, qualname):
        return _bn_like(m) or super().is_leaf_module(m, qualname)


def _trace(model):
    """model as a GraphModule, or None when it does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 -- any tracing failure: the caller leaves the model as it was
        return None
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    _keep_order(gm, model)
    return gm


def _keep_order(new, old):
    """Orders the children, parameters and buffers of a GraphModule's containers (fx makes
    them in the order the graph first uses them) as the model's, so that parameters() and
    state_dict() list them in the model's order (optimizer state moves between the two)."""
    for attr in ("_parameters", "_buffers", "_modules"):
        mine, theirs = getattr(new, attr), getattr(old, attr)
        if list(mine) != [k for k in theirs if k in mine]:
            items = dict(mine)
            mine.clear()
            mine.update((k, items.pop(k)) for k in theirs if k in items)
            mine.update(items)
    for name, child in new._modules.items():
        original = old._modules.get(name)
        if child is not original and isinstance(original, nn.Module) and child is not None:
            _keep_order(child, original)


def _module_calls(gm):
    """How many call_module nodes call each target."""
    return collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def _passes_over_identity(gm, node):
    """node's only user, past identity modules that have one user each: (that user,
    identity nodes passed), or (None, []) when node has another number of users."""
    passed = []
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (user.op == "call_module" and type(gm.get_submodule(user.target)) is nn.Identity
                and len(user.args) == 1 and not user.kwargs):
            return user, passed
        passed.append(user)
        node = user
    return None, []


def _node_activation(gm, node):
    if node.op == "call_module":
        found = _module_activation(gm.get_submodule(node.target))
        return None if found is None or found[0] == "identity" else found
    return _function_activation(node)


def fuse_batch_norm_activations(model):
    """torch.fx pass: ``act(bn(x))`` and ``act(bn(x) + r)`` become ``bn(x, residual=r)``
    with the activation fused, for fastnorm batch norms called once whose output feeds only
    that activation (or that add), identity modules in between passed over. Returns the
    traced GraphModule, or the model unchanged when it does not trace."""
    gm = _trace(model)
    if gm is None:
        return model
    changed = False
    calls = _module_calls(gm)  # (the pass keeps these counts)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_fast(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        if bn.activation is not None or len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        nxt, chain = _passes_over_identity(gm, node)
        if nxt is None:
            continue
        residual = None
        if nxt.op == "call_function" and nxt.target in (operator.add, operator.iadd, torch.add) and len(nxt.args) == 2 \
                and not nxt.kwargs:
            prev = chain[-1] if chain else node
            other = nxt.args[1] if nxt.args[0] is prev else nxt.args[0]
            after, passed = _passes_over_identity(gm, nxt)
            if isinstance(other, torch.fx.Node) and other is not prev and after is not None:
                residual = other
                chain = chain + [nxt] + passed
                nxt = after
        act = _node_activation(gm, nxt)
        if act is None:
            continue
        bn.activation, bn.negative_slope = act
        # the fused call goes where the activation was: after the residual, which may be
        # computed after the batch norm
        with gm.graph.inserting_before(nxt):
            fused = gm.graph.call_module(node.target, (node.args[0],) + ((residual,) if residual is not None else ()))
        nxt.replace_all_uses_with(fused)
        for dead in [nxt] + chain[::-1] + [node]:
            gm.graph.erase_node(dead)
        changed = True
    if not changed:
        return model
    gm.graph.lint()
    gm.recompile()
    return gm


def _unfuse(gm):
    """Undoes fuse_batch_norm_activations in gm: each call of a fastnorm batch norm with a
    residual or an added activation becomes the plain call, the add and the activation call;
    the batch norm keeps only what its torch counterpart computes itself."""
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and _is_fast(gm.get_submodule(node.target)):
            calls.setdefault(node.target, []).append(node)
    changed = False
    for target, nodes in calls.items():
        bn = gm.get_submodule(target)
        added = _added_activation(bn)
        if added is None and all(len(n.args) < 2 and "residual" not in n.kwargs for n in nodes):
            continue
        for node in nodes:
            residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
            with gm.graph.inserting_before(node):
                out = gm.graph.call_module(target, (node.args[0],))
                if residual is not None:
                    out = gm.graph.call_function(operator.add, (out, residual))
                if added is not None:
                    out = _activation_node(gm.graph, added, out)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
        if added is not None:
            own = _own_activation(bn) if type(bn) in _BASE_OF else None
            bn.activation, bn.negative_slope = own if own else (None, 0.01)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


@torch.no_grad()
def _fold(conv, bn):
    """Folds eval-mode bn into conv (Conv1d/2d/3d or Linear), in float64, keeping conv's
    dtype and memory format."""
    if parametrize.is_parametrized(conv, "weight"):
        _remove(conv, "weight")
    if any(isinstance(h, _TorchWeightNormHook) and h.name == "weight" for h in conv._forward_pre_hooks.values()):
        nn.utils.remove_weight_norm(conv, "weight")  # the deprecated hook (torch's or fastnorm's)
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
    return (type(conv) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) and _bn_like(bn)
            and bn.running_mean is not None and bn.running_mean.numel() == conv.weight.shape[0])


def _epilogue(bn):
    """What bn computes after normalizing, as modules: (timm's drop and act, or None; the
    activation fastnorm fuses beyond those, or None). A fused residual goes between them."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    own = [m for m in (drop, act) if m is not None and type(m) is not nn.Identity]
    own = None if not own else own[0] if len(own) == 1 else nn.Sequential(*own)
    added = _added_activation(bn) if _is_fast(bn) else None
    return own, (_activation_module(added) if added is not None else None)


def fold_batch_norm(model):
    """For inference: folds every batch norm (torch's, fastnorm's, timm's, and the frozen
    ones of torchvision and timm) that directly follows a Conv1d/2d/3d or Linear into it
    (the batch norm's running statistics and affine parameters into the weight and bias; a
    fused activation, or timm's act, stays as a module). Needs ``model.eval()``. Returns the
    folded model: a torch.fx GraphModule when the model traces, else the model itself with
    the pairs inside nn.Sequential folded."""
    if model.training:
        raise ValueError("fold_batch_norm folds the evaluation-mode batch norm: call model.eval() first")
    gm = _trace(model)
    if gm is None:
        return _fold_sequentials(model)
    calls = _module_calls(gm)  # (folding keeps these counts)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _bn_like(gm.get_submodule(node.target)):
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = gm.get_submodule(src.target)
        if not _foldable(conv, bn) or calls[node.target] != 1 or calls[src.target] != 1:
            continue
        own, added = _epilogue(bn)
        _fold(conv, bn)
        residual = node.args[1] if len(node.args) > 1 else node.kwargs.get("residual")
        # the batch norm's name now holds what it applied after normalizing (at most one of
        # the two: fastnorm adds an activation only where timm's act is an identity)
        gm.delete_submodule(node.target)
        with gm.graph.inserting_before(node):
            out = src
            if own is not None:
                gm.add_submodule(node.target, own)
                out = gm.graph.call_module(node.target, (out,))
            if residual is not None:
                out = gm.graph.call_function(operator.add, (out, residual))
            if added is not None:
                gm.add_submodule(node.target, added)
                out = gm.graph.call_module(node.target, (out,))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
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
                    own, added = _epilogue(bn)
                    _fold(conv, bn)
                    parts = [m for m in (own, added) if m is not None]
                    module._modules[b] = nn.Identity() if not parts else parts[0] if len(parts) == 1 \
                        else nn.Sequential(*parts)
    return model
