"""Patch a loaded Boltz model in place so that its trunk runs on foldops modules.

    import foldops
    report = foldops.patch.boltz(model)      # Boltz-1 / Boltz-2 model, or any module holding Boltz parts
    print(report)                            # what was replaced, what was left alone and why
    foldops.patch.unpatch(model)             # back to the Boltz classes

Each Boltz module of a known class (``PairformerModule``/``Layer``,
``PairformerNoSeqModule``/``Layer``, Boltz-2's ``MSAModule``/``MSALayer``, the triangle
updates and attentions, ``Transition``, ``OuterProductMean``, ``PairWeightedAveraging``
and Boltz-2's ``AttentionPairBias``, also the diffusion transformer's) becomes the
foldops module of the same name *in place*: the Python object stays the same (so
references held elsewhere see the change), its class and attributes become the foldops
module's, and its parameters and buffers are the very same tensor objects as before (no
copy, same state-dict keys, same devices and dtypes, optimizers keep their references).
A container is replaced whole (its blocks with it) when it can be; otherwise its parts are
replaced one by one.

Kept by design, and listed in the report as kept (no warning): the diffusion transformer's
``ConditionedTransitionBlock`` and ``AdaLN``, which foldops has nothing faster for (see
:data:`KEPT`). Left alone: modules of other classes (embedders, the rest of the diffusion
conditioning, Boltz-1's v1 attention, ...); a module whose configuration foldops does not reproduce (e.g. a
Pairformer layer built with ``v2=False``), whose parameters do not match the foldops
module's names and shapes, or that carries a replaced ``forward`` foldops does not know;
and every module when the installed ``boltz`` version is not one this mapping was written
for. Each of those gets a warning (an error with ``strict=True``) and a line in the report.

Forward calls keep working unchanged: the foldops modules accept Boltz's forward
signatures, including ``use_kernels`` and the chunking arguments (kernels are chosen by
``backend``). Activation checkpointing by fairscale's or foldops's ``checkpoint_wrapper``
on a replaced module carries over (with its ``offload_to_cpu``). Hooks registered on a
replaced module stay on it. Nothing here needs Lightning, cuEquivariance or a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from foldops.backends import AUTO, check_module_backend

__all__ = ["BoltzPatchError", "PatchReport", "boltz", "unpatch", "is_patched", "KNOWN_BOLTZ_VERSIONS", "KEPT"]

# boltz package versions whose classes and attributes this mapping was written against
# (2.x holds both Boltz-1 and Boltz-2 models).
KNOWN_BOLTZ_VERSIONS = ("2.0", "2.1", "2.2")

_STASH = "_foldops_patch_original"  # instance attribute: (Boltz class, Boltz __dict__)
_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)


class BoltzPatchError(RuntimeError):
    """``strict=True`` and a Boltz module could not be replaced."""


class _CannotMap(Exception):
    pass


@dataclasses.dataclass
class PatchReport:
    """What :func:`boltz` did.

    Attributes:
        replaced: ``"<Boltz class> -> <foldops class>"`` -> number of modules, nested
            blocks and layers included.
        patched: paths (in ``model.named_modules()``) of the modules replaced at the top.
        skipped: path -> why that Boltz module was left alone (each also warned).
        kept: ``"<Boltz class>"`` -> number of modules kept by design, as foldops has no
            faster equivalent (the reason per class is in :data:`KEPT`; not warned).
        backend: the backend given to the foldops modules.
    """

    replaced: Dict[str, int] = dataclasses.field(default_factory=dict)
    patched: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    kept: Dict[str, int] = dataclasses.field(default_factory=dict)
    backend: str = AUTO

    @property
    def total(self) -> int:
        """Modules replaced, nested ones included."""
        return sum(self.replaced.values())

    def summary(self) -> str:
        if not self.replaced:
            lines = ["foldops.patch.boltz: nothing to replace (no Boltz trunk modules, or already patched)"]
        else:
            lines = [f"foldops.patch.boltz: replaced {self.total} modules in place (backend={self.backend!r})"]
        for pair, count in sorted(self.replaced.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {count:5d} x {pair}")
        if self.patched:
            lines.append("  at: " + ", ".join(p or "<root>" for p in self.patched))
        if self.kept:
            lines.append("  kept (no faster foldops equivalent):")
            lines.extend(f"  {count:5d} x {name}: {KEPT.get(name, '')}".rstrip(": ")
                         for name, count in sorted(self.kept.items()))
        if self.skipped:
            lines.append(f"  left alone ({len(self.skipped)}):")
            lines.extend(f"    {path or '<root>'}: {why}" for path, why in self.skipped.items())
        return "\n".join(lines)

    __str__ = summary


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# --- what each Boltz class becomes -------------------------------------------------------
# Each builder reads the configuration off the Boltz module and returns the foldops module
# on the meta device (its parameters are then the Boltz ones), or raises _CannotMap.


def _fnn(name: str):
    return getattr(importlib.import_module("foldops.nn"), name)


def _ln_width(norm) -> int:
    return int(norm.normalized_shape[0])


def _tri_mul(name):
    return lambda m, kw: _fnn(name)(_ln_width(m.norm_in), **kw)


def _tri_att(m, kw):
    args = (m.c_in, m.c_hidden, m.no_heads)
    if not m.starting:
        return _fnn("TriangleAttentionEndingNode")(*args, inf=m.inf, **kw)
    return _fnn("TriangleAttention")(*args, starting=True, inf=m.inf, **kw)


def _transition(m, kw):
    return _fnn("Transition")(_ln_width(m.norm), m.fc1.out_features, m.fc3.out_features, **kw)


def _outer_product_mean(m, kw):
    return _fnn("OuterProductMean")(_ln_width(m.norm), m.proj_a.out_features, m.proj_o.out_features, **kw)


def _pair_weighted_averaging(m, kw):
    return _fnn("PairWeightedAveraging")(m.c_m, m.c_z, m.c_h, m.num_heads, inf=m.inf, **kw)


def _attention_pair_bias(m, kw):
    c_z = _ln_width(m.proj_z[0]) if m.compute_pair_bias else None
    return _fnn("AttentionPairBias")(m.c_s, c_z, m.num_heads, inf=m.inf, compute_pair_bias=m.compute_pair_bias, **kw)


def _pair_args(layer) -> Tuple:
    return (layer.dropout, layer.tri_att_start.c_hidden, layer.tri_att_start.no_heads)


_APB_V2 = "boltz.model.layers.attentionv2.AttentionPairBias"


def _pairformer_layer(m, kw):
    if _name(type(m.attention)) != _APB_V2:
        raise _CannotMap(f"built with v2=False ({_name(type(m.attention))}); foldops has Boltz-2's layer only")
    token_s, token_z = _ln_width(m.pre_norm_s), _ln_width(m.tri_mul_out.norm_in)
    return _fnn("PairformerLayer")(token_s, token_z, m.num_heads, *_pair_args(m), m.post_layer_norm, True, **kw)


def _pairformer_module(m, kw):
    if len(m.layers) == 0:
        raise _CannotMap("has no layers")
    first = m.layers[0]
    for layer in m.layers:
        if _name(type(layer)) != "boltz.model.layers.pairformer.PairformerLayer":
            raise _CannotMap(f"holds a {_name(type(layer))}")
        _pairformer_layer(layer, {"device": "meta"})  # raises for v1 layers
    token_s, token_z = _ln_width(first.pre_norm_s), _ln_width(first.tri_mul_out.norm_in)
    return _fnn("PairformerStack")(
        token_s, token_z, len(m.layers), first.num_heads, *_pair_args(first), first.post_layer_norm,
        m.activation_checkpointing, True, **kw,
    )


def _noseq_layer(m, kw):
    return _fnn("PairformerNoSeqLayer")(_ln_width(m.tri_mul_out.norm_in), *_pair_args(m), m.post_layer_norm, **kw)


def _noseq_module(m, kw):
    if len(m.layers) == 0:
        raise _CannotMap("has no layers")
    first = m.layers[0]
    return _fnn("PairformerNoSeqModule")(
        _ln_width(first.tri_mul_out.norm_in), len(m.layers), *_pair_args(first), first.post_layer_norm,
        m.activation_checkpointing, **kw,
    )


def _msa_layer(m, kw):
    pl = m.pairformer_layer
    return _fnn("MSALayer")(
        _ln_width(m.msa_transition.norm), _ln_width(pl.tri_mul_out.norm_in), m.msa_dropout, pl.dropout,
        pl.tri_att_start.c_hidden, pl.tri_att_start.no_heads, **kw,
    )


def _msa_module(m, kw):
    if len(m.layers) == 0:
        raise _CannotMap("has no layers")
    first, pl = m.layers[0], m.layers[0].pairformer_layer
    num_tokens = m.msa_proj.in_features - 2 - int(m.use_paired_feature)
    return _fnn("MSAModule")(
        m.s_proj.out_features, _ln_width(pl.tri_mul_out.norm_in), m.s_proj.in_features, len(m.layers),
        first.msa_dropout, pl.dropout, pl.tri_att_start.c_hidden, pl.tri_att_start.no_heads,
        m.activation_checkpointing, m.use_paired_feature, m.subsample_msa, m.num_subsampled_msa,
        num_tokens=num_tokens, **kw,
    )


_L = "boltz.model.layers."
_BUILDERS: Dict[str, Callable] = {
    _L + "pairformer.PairformerModule": _pairformer_module,
    _L + "pairformer.PairformerLayer": _pairformer_layer,
    _L + "pairformer.PairformerNoSeqModule": _noseq_module,
    _L + "pairformer.PairformerNoSeqLayer": _noseq_layer,
    "boltz.model.modules.trunkv2.MSAModule": _msa_module,
    "boltz.model.modules.trunkv2.MSALayer": _msa_layer,
    _L + "triangular_mult.TriangleMultiplicationOutgoing": _tri_mul("TriangleMultiplicationOutgoing"),
    _L + "triangular_mult.TriangleMultiplicationIncoming": _tri_mul("TriangleMultiplicationIncoming"),
    _L + "triangular_attention.attention.TriangleAttention": _tri_att,
    _L + "triangular_attention.attention.TriangleAttentionEndingNode": _tri_att,
    _L + "transition.Transition": _transition,
    _L + "outer_product_mean.OuterProductMean": _outer_product_mean,
    _L + "pair_averaging.PairWeightedAveraging": _pair_weighted_averaging,
    _APB_V2: _attention_pair_bias,
}

# Boltz classes with parameters of their own that foldops does not replace, and why (their
# parts are still patched where they are of a class above).
_NOT_MAPPED = {
    _L + "attention.AttentionPairBias": "Boltz-1's attention with pair bias (v1) has no foldops equivalent",
}

_CONDITIONED_TRANSITION = (
    "AdaLN, three Linear layers with a SwiGLU-style product, a Linear layer and a sigmoid gate on the single "
    "track: cuBLAS GEMMs either way and O(N D) activations, nothing to chunk; foldops's swiglu_transition "
    "computes another function (docs/boltz_patch.md)"
)
_ADALN = "two LayerNorms and two Linear layers on the single track: nothing foldops computes faster"
_T1, _T2 = "boltz.model.modules.transformers.", "boltz.model.modules.transformersv2."
KEPT: Dict[str, str] = {
    _T2 + "ConditionedTransitionBlock": _CONDITIONED_TRANSITION,
    _T2 + "AdaLN": _ADALN,
    _T1 + "ConditionedTransitionBlock": _CONDITIONED_TRANSITION,
    _T1 + "AdaLN": _ADALN,
}
"""Boltz classes kept by design, with the reason: foldops has no faster equivalent. They
run as Boltz's code (the parts inside them included), are counted in
``PatchReport.kept`` and draw no warning, also with ``strict=True``."""


# --- the mechanics ------------------------------------------------------------------------


def _boltz_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("boltz")
    except Exception:  # not installed as a distribution (vendored source, ...)
        return None


def _version_known(version: Optional[str]) -> bool:
    return version is not None and any(version == v or version.startswith(v + ".") for v in KNOWN_BOLTZ_VERSIONS)


def _checkpoint_offload(module: nn.Module) -> Tuple[bool, Optional[bool]]:
    """(whether ``module`` has an instance-level forward, the offload flag when that
    forward is fairscale's or foldops's checkpoint wrapper, else None)."""
    from foldops.compat.activation_checkpoint import _FLAG, is_checkpoint_wrapped

    if is_checkpoint_wrapped(module):
        return True, bool(module.__dict__[_FLAG])
    forward = module.__dict__.get("forward")
    if forward is None:
        return False, None
    if isinstance(forward, functools.partial) and getattr(forward.func, "__name__", "") == "_checkpointed_forward":
        # fairscale: partial(_checkpointed_forward, type(m).forward, weakref.ref(m), offload_to_cpu)
        offload = forward.args[2] if len(forward.args) >= 3 else forward.keywords.get("offload_to_cpu", False)
        return True, bool(offload)
    return True, None


def _has_hooks(module: nn.Module) -> bool:
    return any(module.__dict__.get(name) for name in _HOOK_DICTS[:7])


def _graft(new: nn.Module, old: nn.Module) -> None:
    """Make ``new``'s parameters and buffers the very tensors of ``old`` (same keys)."""
    old_sd, new_sd = old.state_dict(keep_vars=True), new.state_dict(keep_vars=True)
    if list(old_sd) != list(new_sd):
        extra, missing = sorted(set(old_sd) - set(new_sd)), sorted(set(new_sd) - set(old_sd))
        raise _CannotMap(f"state-dict keys differ (Boltz only: {extra[:4]}, foldops only: {missing[:4]})")
    for key, tensor in old_sd.items():
        if tuple(tensor.shape) != tuple(new_sd[key].shape):
            raise _CannotMap(f"{key}: shape {tuple(tensor.shape)}, foldops expects {tuple(new_sd[key].shape)}")
    olds = dict(old.named_modules())
    for path, sub in new.named_modules():
        if isinstance(sub, nn.LayerNorm) and isinstance(olds.get(path), nn.LayerNorm) and sub.eps != olds[path].eps:
            raise _CannotMap(f"{path}: LayerNorm eps {olds[path].eps}, foldops uses {sub.eps}")
    for key, tensor in old_sd.items():
        path, _, leaf = key.rpartition(".")
        owner = new.get_submodule(path)
        if leaf in owner._parameters:
            owner._parameters[leaf] = tensor
        else:
            owner._buffers[leaf] = tensor
    grafted = {id(t) for t in old_sd.values()}
    for name, t in list(new.named_parameters()) + list(new.named_buffers()):
        if id(t) not in grafted:
            raise _CannotMap(f"foldops module has {name}, which Boltz's has not")
    for path, sub in new.named_modules():
        if path in olds:
            sub.training = olds[path].training


def _count(report: PatchReport, new: nn.Module, old: nn.Module) -> None:
    olds = dict(old.named_modules())
    for path, sub in new.named_modules():
        before = olds.get(path)
        if before is not None and _name(type(before)) in _BUILDERS:
            key = f"{_name(type(before))} -> {_name(type(sub))}"
            report.replaced[key] = report.replaced.get(key, 0) + 1


def _replace(module: nn.Module, path: str, backend: str, report: PatchReport) -> None:
    """Replace ``module`` in place by its foldops equivalent, or raise _CannotMap."""
    overridden, offload = _checkpoint_offload(module)
    if overridden and offload is None:
        raise _CannotMap("its forward was replaced on the instance by something foldops does not know")
    for sub_path, sub in module.named_modules():
        if sub is not module and (_has_hooks(sub) or "forward" in sub.__dict__):
            raise _CannotMap(f"part {sub_path!r} carries hooks or a replaced forward")
    new = _BUILDERS[_name(type(module))](module, {"backend": backend, "device": "meta"})
    _graft(new, module)
    _count(report, new, module)
    stash = (type(module), module.__dict__)
    new_dict = new.__dict__
    for name in _HOOK_DICTS:  # the user's hooks on this module stay on it
        if name in stash[1]:
            new_dict[name] = stash[1][name]
    new_dict[_STASH] = stash
    module.__class__ = type(new)
    module.__dict__ = new_dict
    if overridden:
        from foldops.compat.activation_checkpoint import checkpoint_wrapper

        checkpoint_wrapper(module, offload_to_cpu=offload)


def _walk(module: nn.Module, path: str, backend: str, strict: bool, report: PatchReport, version_ok: bool) -> None:
    if _STASH in module.__dict__:
        return  # already patched
    name = _name(type(module))
    if name in _BUILDERS:
        why = None
        if not version_ok:
            why = f"boltz {_boltz_version() or '(version unknown)'} is not a version foldops.patch knows {KNOWN_BOLTZ_VERSIONS}"
        else:
            try:
                _replace(module, path, backend, report)
                report.patched.append(path)
                return
            except _CannotMap as exc:
                why = f"{type(module).__name__} {exc}"
        _skip(report, path, why, strict)
        if not version_ok:
            return
    elif name in KEPT:
        report.kept[name] = report.kept.get(name, 0) + 1
        return  # whole, the AdaLN inside a conditioned transition with it
    elif name in _NOT_MAPPED:
        _skip(report, path, _NOT_MAPPED[name], strict)
    for child_name, child in module.named_children():
        _walk(child, f"{path}.{child_name}" if path else child_name, backend, strict, report, version_ok)


def _skip(report: PatchReport, path: str, why: str, strict: bool) -> None:
    if strict:
        raise BoltzPatchError(f"foldops.patch.boltz: cannot replace {path or '<root>'}: {why}")
    report.skipped[path] = why
    warnings.warn(f"foldops.patch.boltz: left {path or '<root>'} alone: {why}", stacklevel=4)


def boltz(model: nn.Module, backend: str = AUTO, strict: bool = False) -> PatchReport:
    """Replace, in place, every Boltz trunk module inside ``model`` by its foldops module.

    Args:
        model: a Boltz-1 or Boltz-2 model (``Boltz1``/``Boltz2`` LightningModule or a bare
            ``nn.Module``), or any module that holds Boltz modules; also a single Boltz
            module. It is modified in place (the same objects, parameters and buffers).
        backend: the foldops backend of every replaced module (``"auto"``, ``"triton"``,
            ``"torch"``, ...; an op without it takes ``"auto"``). An unknown name is a
            ``ValueError`` before anything is replaced.
        strict: raise :class:`BoltzPatchError` instead of warning when a Boltz module
            cannot be replaced (see the module docstring for when).

    Returns:
        A :class:`PatchReport`; ``print(report)`` gives a readable summary. Patching a
        patched model again replaces nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_module_backend(backend)  # before anything is replaced
    report = PatchReport(backend=backend)
    needs_boltz = any(_name(type(m)) in _BUILDERS for m in model.modules())
    version_ok = _version_known(_boltz_version()) if needs_boltz else True
    _walk(model, "", backend, strict, report, version_ok)
    return report


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` itself was replaced by :func:`boltz`."""
    return _STASH in module.__dict__


def unpatch(model: nn.Module) -> int:
    """Give every module :func:`boltz` replaced inside ``model`` its Boltz class back.

    Parameters and buffers stay the same objects; one that was reassigned while patched
    (e.g. ``load_state_dict(..., assign=True)``) is carried over. Train/eval modes carry
    over too. Returns the number of top-level modules restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    patched = [m for m in model.modules() if _STASH in m.__dict__]
    for module in patched:
        current = module.state_dict(keep_vars=True)
        modes = {path: sub.training for path, sub in module.named_modules()}
        cls, old_dict = module.__dict__[_STASH]
        for name in _HOOK_DICTS:  # hooks added while patched stay
            if name in module.__dict__:
                old_dict[name] = module.__dict__[name]
        module.__class__ = cls
        module.__dict__ = old_dict
        for key, tensor in module.state_dict(keep_vars=True).items():
            if current.get(key) is not None and current[key] is not tensor:
                path, _, leaf = key.rpartition(".")
                owner = module.get_submodule(path)
                (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = current[key]
        for path, sub in module.named_modules():
            if path in modes:
                sub.training = modes[path]
    return len(patched)
