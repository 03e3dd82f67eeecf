"""``install()``: let ``import flash_attn`` resolve to foldops where flash_attn is absent.

A finder appended to the end of ``sys.meta_path`` answers for ``flash_attn`` and the
submodules listed in ``ALIASES`` only after every regular finder has failed, so an
installed flash_attn (found on ``sys.path``, even one added after ``install()``) always
wins. ``install()`` also refuses when a real flash_attn is importable or already imported.
Each alias is a fresh module named as flash_attn's (``flash_attn.ops.fused_dense``...)
whose attributes forward to the foldops module; ``flash_attn.__version__`` names the
flash_attn API version followed, with ``+foldops``.

What foldops does not provide raises errors that say so: ``from flash_attn import
flash_attn_with_kvcache`` an ``ImportError``, ``import flash_attn.modules.mha`` a
``ModuleNotFoundError``, ``getattr``/``hasattr`` an ``AttributeError`` (False). Python
replaces an ``AttributeError``'s message in ``from m import name`` by "cannot import name
... (unknown location)", so a missing attribute looked up by that statement raises the
``ImportError`` itself (the statement's frame is executing ``IMPORT_FROM``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import opcode
import sys
import types

logger = logging.getLogger("foldops.compat.flash_attn")

API_VERSION = "2.8.4+foldops"

# flash_attn module name -> foldops module name (None: an empty package).
ALIASES = {
    "flash_attn": "foldops.compat.flash_attn",
    "flash_attn.flash_attn_interface": "foldops.compat.flash_attn.interface",
    "flash_attn.bert_padding": "foldops.compat.flash_attn.bert_padding",
    "flash_attn.ops": None,
    "flash_attn.ops.fused_dense": "foldops.compat.flash_attn.fused_dense",
    "flash_attn.layers": None,
    "flash_attn.layers.rotary": "foldops.compat.flash_attn.rotary",
}
_PACKAGES = ("flash_attn", "flash_attn.ops", "flash_attn.layers")


_IMPORT_FROM = opcode.opmap.get("IMPORT_FROM")


def _in_from_import(frame) -> bool:
    """Whether ``frame`` is executing a ``from m import name`` (its IMPORT_FROM step)."""
    try:
        return _IMPORT_FROM is not None and frame.f_code.co_code[frame.f_lasti] == _IMPORT_FROM
    except (AttributeError, IndexError):
        return False


def _forward_to(target, alias_name):
    def __getattr__(name):
        try:
            return getattr(target, name)
        except AttributeError:
            pass
        if name.startswith("__"):  # dunder probes (copy, pickle, inspect...): the usual error
            raise AttributeError(f"module {alias_name!r} has no attribute {name!r}")
        if _in_from_import(sys._getframe(1)):
            raise ImportError(f"cannot import name {name!r} from {alias_name!r}: foldops's stand-in for "
                              f"flash_attn does not provide it", name=alias_name) from None
        raise AttributeError(f"module {alias_name!r} (foldops stand-in for flash_attn) has no attribute "
                             f"{name!r}: foldops does not provide it") from None
    return __getattr__


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        target_name = ALIASES[spec.name]
        module.__foldops_alias__ = target_name
        if spec.name in _PACKAGES:
            module.__path__ = []
        target = None
        if target_name is not None:
            target = importlib.import_module(target_name)
            names = getattr(target, "__all__", [n for n in vars(target) if not n.startswith("_")])
            for name in names:
                setattr(module, name, getattr(target, name))
            module.__doc__ = f"foldops stand-in for {spec.name} (see {target_name})."
        module.__getattr__ = _forward_to(target, spec.name)  # the rest, on demand
        if spec.name == "flash_attn":
            module.__version__ = API_VERSION
        return module

    def exec_module(self, module):
        pass


class FlashAttnAliasFinder(importlib.abc.MetaPathFinder):
    """Finds the flash_attn aliases; placed last on ``sys.meta_path``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in ALIASES:
            parent = fullname.rpartition(".")[0]
            if parent in _PACKAGES and _is_alias(sys.modules.get(parent)):  # a submodule foldops lacks
                raise ModuleNotFoundError(f"No module named {fullname!r}: foldops's stand-in for flash_attn does "
                                          f"not provide it (it covers {', '.join(ALIASES)})", name=fullname)
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(), is_package=fullname in _PACKAGES)


def _finder():
    for finder in sys.meta_path:
        if isinstance(finder, FlashAttnAliasFinder):
            return finder
    return None


def _is_alias(module) -> bool:
    return getattr(module, "__foldops_alias__", False) is not False


def real_flash_attn_available() -> bool:
    """True when a flash_attn that is not foldops's is imported or importable."""
    module = sys.modules.get("flash_attn")
    if module is not None:
        return not _is_alias(module)
    for finder in sys.meta_path:
        if isinstance(finder, FlashAttnAliasFinder) or not hasattr(finder, "find_spec"):
            continue
        try:
            if finder.find_spec("flash_attn", None) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def install() -> bool:
    """Make ``import flash_attn`` (and the submodules foldops covers) resolve to foldops.

    Opt-in and idempotent. Returns True when the aliases are active, False when a real
    flash_attn is present (it is left alone and used). Covered imports::

        import flash_attn
        from flash_attn import flash_attn_varlen_qkvpacked_func, ...
        from flash_attn.flash_attn_interface import flash_attn_varlen_func, ...
        from flash_attn.ops.fused_dense import FusedDense, FusedMLP
        from flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb, apply_rotary_emb_qkv_
        from flash_attn.bert_padding import pad_input, unpad_input, index_first_axis
    """
    if real_flash_attn_available():
        logger.info("flash_attn is installed; foldops.compat.flash_attn.install() leaves it in place")
        return False
    if _finder() is None:
        sys.meta_path.append(FlashAttnAliasFinder())
    return True


def uninstall() -> None:
    """Remove the finder and forget the alias modules already imported."""
    finder = _finder()
    if finder is not None:
        sys.meta_path.remove(finder)
    for name in list(sys.modules):
        if (name == "flash_attn" or name.startswith("flash_attn.")) and _is_alias(sys.modules[name]):
            del sys.modules[name]


def is_installed() -> bool:
    return _finder() is not None
