"""Backend registry and selection policy.

Each op registers its implementations under a backend name (``reference``, ``torch``,
``triton``, third-party names such as ``trifast``/``cuequivariance``) with a
``supports(**ctx)`` check that returns ``None`` if the backend can run on the given
inputs, or a short reason why not.

Selection, for ``backend="auto"``:

1. ``FOLDOPS_BACKEND_<OP>`` (e.g. ``FOLDOPS_BACKEND_TRIANGLE_ATTENTION=torch``) if set:
   an explicit request, so it raises if that backend cannot run;
2. ``FOLDOPS_BACKEND`` if set and the op has a backend of that name (explicit: it
   raises if it cannot run); ops without such a backend skip it. A name that no op
   has (``bogus``, ``trition``, ``TORCH``: names are case-sensitive) is an error
   naming the valid ones, for every op alike;
3. otherwise the backend that ``foldops.backend_rules`` prefers for this op, device
   class, mode (inference / training) and size, if its check passes (e.g. ``torch``
   below the size where the kernels stop being host-bound); logged once per choice at
   debug level with the rule's reason;
4. otherwise the first backend in priority order whose check passes. The fallback is
   silent, logged once per (op, backend, reason) at debug level.

A ``backend=`` argument other than ``"auto"`` wins over the environment and raises
``BackendUnavailableError`` naming the reason if it cannot run.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from foldops import backend_rules

logger = logging.getLogger("foldops.backends")

AUTO = "auto"
ENV_GLOBAL = "FOLDOPS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these inputs or this machine."""


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of one op."""

    op: str
    """Op name, e.g. ``"triangle_attention"``."""
    name: str
    """Backend name, e.g. ``"triton"``."""
    fn: Callable[..., Any]
    """The implementation; called with the op's own arguments."""
    supports: Callable[..., Optional[str]]
    """``supports(explicit=bool, **ctx) -> None | reason``: can it run for this context?
    ``explicit`` is True when the backend was named (argument or environment), False
    when ``auto`` is asking: e.g. the Triton interpreter runs only when named."""
    priority: int
    """Higher is tried first by ``auto``."""
    auto: bool = True
    """Whether ``auto`` may pick it (third-party and reference backends may opt out)."""


_REGISTRY: Dict[str, Dict[str, Backend]] = {}
_logged: set = set()


def _always(**_: Any) -> Optional[str]:
    return None


def register(
    op: str,
    name: str,
    fn: Callable[..., Any],
    *,
    priority: int,
    supports: Callable[..., Optional[str]] = _always,
    auto: bool = True,
) -> Backend:
    """Register ``fn`` as backend ``name`` of ``op`` (re-registering replaces it)."""
    if name == AUTO:
        raise ValueError("name: 'auto' is reserved")
    backend = Backend(op=op, name=name, fn=fn, supports=supports, priority=priority, auto=auto)
    _REGISTRY.setdefault(op, {})[name] = backend
    return backend


def ops() -> List[str]:
    """Names of the ops that have registered backends."""
    return sorted(_REGISTRY)


def backends_of(op: str) -> List[Backend]:
    """The backends of ``op``, best first."""
    if op not in _REGISTRY:
        raise ValueError(f"op: unknown op {op!r}; known ops: {ops()}")
    return sorted(_REGISTRY[op].values(), key=lambda b: -b.priority)


def _env_var(op: str) -> str:
    return f"{ENV_GLOBAL}_{op.upper()}"


def _log_once(key: Tuple[str, str, str], message: str, *args: Any) -> None:
    """Debug-log ``message`` the first time ``key`` is seen. Not while torch.compile
    traces: Dynamo cannot trace a logger call (a graph break, an error under
    ``fullgraph=True``); the next eager call logs the choice."""
    if torch.compiler.is_compiling() or key in _logged:  # in this order: no guard on _logged
        return
    _logged.add(key)
    logger.debug(message, *args)


def _check(backend: Backend, ctx: Dict[str, Any], explicit: bool) -> Optional[str]:
    try:
        return backend.supports(explicit=explicit, **ctx)
    except Exception as exc:  # a broken third-party install must not break auto
        return f"support check failed: {type(exc).__name__}: {exc}"


def known_backends() -> List[str]:
    """Every backend name some op registers (after importing all of ``foldops.ops``)."""
    importlib.import_module("foldops.ops")
    return sorted({name for table in _REGISTRY.values() for name in table})


def _explicit(op: str, name: str, ctx: Dict[str, Any], source: str) -> Backend:
    table = _REGISTRY.get(op, {})
    if name not in table:
        raise BackendUnavailableError(
            f"{source}: op {op!r} has no backend {name!r}; available: {sorted(table)} or 'auto'"
        )
    backend = table[name]
    reason = _check(backend, ctx, explicit=True)
    if reason is not None:
        raise BackendUnavailableError(f"{source}: backend {name!r} cannot run {op}: {reason}")
    return backend


def select(op: str, requested: Optional[str] = AUTO, **ctx: Any) -> Backend:
    """Pick the backend for ``op`` given the request and the input context ``ctx``.

    ``ctx`` is whatever the op's ``supports`` checks read (device, dtype, shapes,
    whether gradients are needed, ...).
    """
    if requested is None:
        requested = AUTO
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a backend name string, got {type(requested).__name__}")
    if requested != AUTO:
        return _explicit(op, requested, ctx, "backend")
    per_op = os.environ.get(_env_var(op), "").strip()
    if per_op and per_op != AUTO:
        return _explicit(op, per_op, ctx, _env_var(op))
    global_choice = os.environ.get(ENV_GLOBAL, "").strip()
    if global_choice and global_choice != AUTO:
        if global_choice in _REGISTRY.get(op, {}):
            return _explicit(op, global_choice, ctx, ENV_GLOBAL)
        known = known_backends()
        if global_choice not in known:
            raise BackendUnavailableError(
                f"{ENV_GLOBAL}: unknown backend {global_choice!r}; valid: {known} or 'auto'"
            )
    ruled = backend_rules.preferred(op, **ctx)
    if ruled is not None:
        backend = _REGISTRY.get(op, {}).get(ruled[0])
        if backend is not None and backend.auto and _check(backend, ctx, explicit=False) is None:
            _log_once((op, backend.name, ruled[1]), "%s: auto picks backend %r by rule: %s", op, backend.name,
                      ruled[1])
            return backend
    skipped = []
    for backend in backends_of(op):
        if not backend.auto:
            continue
        reason = _check(backend, ctx, explicit=False)
        if reason is None:
            _log_once((op, backend.name, "priority"),
                      "%s: auto picks backend %r by priority order (no size rule applies)", op, backend.name)
            return backend
        skipped.append(f"{backend.name}: {reason}")
        _log_once((op, backend.name, reason), "%s: auto skips backend %r: %s", op, backend.name, reason)
    raise BackendUnavailableError(f"{op}: no backend can run these inputs ({'; '.join(skipped)})")


def check_module_backend(value: Any) -> str:
    """A module's ``backend=`` argument, checked when the module is built rather than at
    its first call: ``"auto"`` or a name some op registers. Like ``FOLDOPS_BACKEND`` it
    names the backend of every op the module runs that has one; the others take
    ``auto`` (see :func:`for_op`), so ``PairformerLayer(backend="triton")`` runs its
    transitions, which have no kernel, on their ``auto`` choice."""
    if not isinstance(value, str):
        raise TypeError(f"backend: expected a backend name string, got {type(value).__name__}")
    if value != AUTO and value not in known_backends():
        raise ValueError(f"backend: unknown backend {value!r}; valid: {known_backends()} or {AUTO!r}")
    return value


def for_op(op: str, requested: str) -> str:
    """What a module whose ``backend=`` is ``requested`` passes to ``op``: the name if
    ``op`` has a backend of that name, else ``"auto"``; a name no op has (a module's
    ``backend`` attribute set after it was built) is refused as the constructor would."""
    if requested in _REGISTRY.get(op, ()) or requested == AUTO:
        return requested
    if not any(requested in table for table in _REGISTRY.values()):
        check_module_backend(requested)  # raises, after registering every op
    return AUTO


def availability(op: str, explicit: bool = True, **ctx: Any) -> List[Tuple[str, Optional[str]]]:
    """``[(backend name, None | reason)]`` for ``op`` in priority order (for doctor/bench)."""
    return [(b.name, _check(b, ctx, explicit)) for b in backends_of(op)]
