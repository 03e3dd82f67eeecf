"""Lightning ``.ckpt`` files (and foldops checkpoints, bare state dicts) into a plain ``nn.Module``.

    info = load_checkpoint("boltz2_conf.ckpt", model)                  # weights
    info = load_checkpoint("boltz2_conf.ckpt", model, use_ema=True)    # the EMA weights
    info.hyper_parameters, info.global_step, info.epoch

Safe by default: files are read with ``torch.load(weights_only=True)`` and an allow-list of
what Lightning checkpoints hold besides tensors (Lightning's ``AttributeDict``, paths,
numpy arrays and scalars). A file that needs more (an ``argparse.Namespace``, an
omegaconf config, any custom class) is refused with an error naming the opt-in,
``trust_checkpoint=True``, which unpickles in full and can run code from the file.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from foldops.train.checkpointing import (
    FORMAT,
    CheckpointError,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
    check_state_dict,
    read_checkpoint,
)

__all__ = ["load_checkpoint", "LoadedCheckpoint", "AttributeDict", "lightning_safe_globals", "remap_keys",
           "CheckpointError", "UnsafeCheckpointError", "UnverifiedCheckpointWarning"]

# Prefixes that wrappers add and that never belong to the model itself.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class AttributeDict(dict):
    """Lightning's ``AttributeDict`` (a dict with attribute access), without Lightning.

    ``LoadedCheckpoint.hyper_parameters`` is one, so ``info.hyper_parameters.token_s``
    works as ``model.hparams.token_s`` did.
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as exc:
            raise AttributeError(key) from exc

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value


_ATTRIBUTE_DICT_NAMES = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
)


def lightning_safe_globals() -> List[Any]:
    """The allow-list used for Lightning checkpoints: data-only classes and rebuilders."""
    # Safe loading fills only plain dicts, so Lightning's AttributeDict is read as one (and
    # handed back as an AttributeDict by load_checkpoint).
    out: List[Any] = [(dict, name) for name in _ATTRIBUTE_DICT_NAMES]
    out += [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        reconstruct = core.multiarray._reconstruct
        scalar = core.multiarray.scalar
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            out += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
        out += [np.ndarray, np.dtype]
        dtypes = getattr(np, "dtypes", None)
        if dtypes is not None:
            out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    except ImportError:  # pragma: no cover
        pass
    return out


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` found and loaded."""

    format: str  # "foldops", "lightning" or "state_dict"
    state_dict: Dict[str, torch.Tensor]
    hyper_parameters: Optional[Any] = None  # an AttributeDict when the file has a mapping
    epoch: Optional[int] = None
    global_step: Optional[int] = None
    ema_state_dict: Optional[Dict[str, torch.Tensor]] = None
    used_ema: bool = False
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)


def remap_keys(
    state_dict: Mapping[str, Any], prefix_map: Optional[Mapping[str, Optional[str]]] = None
) -> Dict[str, Any]:
    """Strip wrapper prefixes, then rename key prefixes by ``prefix_map``.

    - ``_orig_mod.`` (torch.compile), ``_checkpoint_wrapped_module.`` (torch's checkpoint
      wrapper) and ``_fsdp_wrapped_module.`` are removed wherever they occur; a leading
      ``module.`` (DDP) is removed when every key has it.
    - ``prefix_map={"model.": "", "old.": "new."}`` renames keys starting with a prefix
      (longest prefix first); mapping a prefix to ``None`` drops those keys.
    """
    out: Dict[str, Any] = {}
    keys = list(state_dict)
    strip_module = bool(keys) and all(k.startswith("module.") for k in keys)
    prefixes = sorted((prefix_map or {}).items(), key=lambda kv: -len(kv[0]))
    for key in keys:
        new = key
        for seg in _WRAPPER_SEGMENTS:
            new = new.replace(seg, "")
        if strip_module:
            new = new[len("module."):]
        for old, repl in prefixes:
            if new.startswith(old):
                new = None if repl is None else repl + new[len(old):]
                break
        if new is None:
            continue
        if new in out:
            raise CheckpointError(f"prefix_map: two checkpoint keys map to {new!r}")
        out[new] = state_dict[key]
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _find_ema(ckpt: Mapping[str, Any]) -> Optional[Dict[str, torch.Tensor]]:
    ema = ckpt.get("ema")
    if isinstance(ema, Mapping):
        for key in ("shadow", "ema_weights"):  # foldops EMA, Boltz's EMA callback
            if _is_state_dict(ema.get(key)):
                return dict(ema[key])
        if _is_state_dict(ema):
            return dict(ema)
    callbacks = ckpt.get("callbacks")
    if isinstance(callbacks, Mapping):  # Lightning keeps callback states here too
        for name, state in callbacks.items():
            if "ema" in str(name).lower() and isinstance(state, Mapping) and _is_state_dict(state.get("ema_weights")):
                return dict(state["ema_weights"])
    return None


def load_checkpoint(
    path: Union[str, "pathlib.Path"],
    model: Optional[nn.Module] = None,
    *,
    strict: bool = True,
    use_ema: bool = False,
    prefix_map: Optional[Mapping[str, Optional[str]]] = None,
    trust_checkpoint: bool = False,
    safe_globals: Sequence[Any] = (),
    map_location: Any = "cpu",
) -> LoadedCheckpoint:
    """Read a Lightning, foldops or plain state-dict checkpoint and load it into ``model``.

    Args:
        path: the file.
        model: the module to load into (``None``: only read and return).
        strict: every model key must be found and every checkpoint key used (shapes must
            match either way); the error names the keys that differ.
        use_ema: load the EMA weights (Boltz's ``ema``/EMA-callback entry or foldops's)
            instead of the trained ones; an error if the file has none.
        prefix_map: key prefix renames applied after stripping wrapper prefixes; see
            :func:`remap_keys`. ``{"model.": ""}`` loads a LightningModule that held the
            network as ``self.model`` into the bare network.
        trust_checkpoint: unpickle in full (can run code from the file). Only for files you
            trust; needed for checkpoints that hold e.g. an ``argparse.Namespace``.
        safe_globals: further classes to allow in safe loading.
        map_location: where tensors are loaded (default CPU).
    """
    ckpt = read_checkpoint(path, trust_checkpoint=trust_checkpoint,
                           safe_globals=lightning_safe_globals() + list(safe_globals), map_location=map_location)
    if ckpt.get("format") == FORMAT:
        fmt = "foldops"
        weights = ckpt["state_dict"]
    elif "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        fmt = "lightning"
        weights = ckpt["state_dict"]
    elif _is_state_dict(ckpt):
        fmt = "state_dict"
        weights = ckpt
    else:
        raise CheckpointError(
            f"{path}: no model weights found: expected a 'state_dict' entry (Lightning, foldops) or a "
            f"plain state dict; top-level keys are {sorted(map(str, ckpt))[:20]}"
        )
    ema = _find_ema(ckpt)
    if use_ema:
        if ema is None:
            raise CheckpointError(f"{path}: use_ema=True but the checkpoint holds no EMA weights")
        # EMA states may hold only the averaged (floating) entries: the rest (integer
        # buffers such as batch-norm counters) come from the trained weights.
        weights = {**{k: v for k, v in weights.items() if k not in ema}, **ema}
    weights = remap_keys(weights, prefix_map)
    hparams = ckpt.get("hyper_parameters")
    info = LoadedCheckpoint(
        format=fmt,
        state_dict=weights,
        hyper_parameters=AttributeDict(hparams) if isinstance(hparams, Mapping) else hparams,
        epoch=ckpt.get("epoch"),
        global_step=ckpt.get("global_step"),
        ema_state_dict=remap_keys(ema, prefix_map) if ema is not None else None,
        used_ema=use_ema,
        raw=ckpt,
    )
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module or None, got {type(model).__name__}")
        missing, unexpected = check_state_dict(model.state_dict(), weights, strict=strict,
                                               source=f"checkpoint {pathlib.Path(path).name}")
        model.load_state_dict(weights, strict=strict)
        info.missing_keys, info.unexpected_keys = missing, unexpected
    return info
