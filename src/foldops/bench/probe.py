"""Which backends of an op can run on given inputs, without running them.

Each op hands its support context (device, dtype, shapes, ...) to
``foldops.backends.select``; the keys differ per op. :func:`capture_context` calls the
op once with ``select`` intercepted, so the bench and ``foldops doctor`` ask
``foldops.backends.availability`` exactly what the op itself would ask.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from foldops import backend_rules, backends


class _Captured(BaseException):
    # BaseException: an op's own ``except Exception`` must not swallow it.
    def __init__(self, ctx: Dict[str, Any]):
        super().__init__("captured")
        self.ctx = ctx


def capture_context(op: str, call: Callable[[], Any], grad: bool = False) -> Optional[Dict[str, Any]]:
    """The ``ctx`` that ``call()`` (a call of op ``op``) passes to ``backends.select``.

    ``call`` runs under ``torch.no_grad()``, or with gradients enabled if ``grad`` (pass
    inputs that require grad then: ops whose ``auto`` differs between inference and
    training read the mode from there). ``None`` if the op returned without selecting
    through ``foldops.backends.select`` (e.g. it imported ``select`` by name); other ops
    it calls select as usual. Exceptions from the op's validation propagate.
    """
    real_select = backends.select

    def spy(op_name, requested=backends.AUTO, **ctx):
        if op_name == op:
            raise _Captured(ctx)
        return real_select(op_name, requested, **ctx)

    backends.select = spy
    try:
        with torch.set_grad_enabled(grad):
            call()
    except _Captured as captured:
        return captured.ctx
    finally:
        backends.select = real_select
    return None


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    """What the registry says about one backend for one input."""

    name: str
    reason: Optional[str]
    """None if it can run when named, else why not."""
    auto_reason: Optional[str]
    """None if ``auto`` could pick it (its check passes unprompted), else why not."""
    auto: bool
    """Whether the backend takes part in ``auto`` at all."""
    selected: bool = False
    """Whether ``auto`` picks it for this input (with the current environment)."""

    @property
    def available(self) -> bool:
        return self.reason is None

    @property
    def named_only(self) -> bool:
        """Runs only when asked for by name (e.g. the Triton interpreter)."""
        return self.reason is None and self.auto_reason is not None


def backend_statuses(op: str, ctx: Dict[str, Any]) -> List[BackendStatus]:
    """Status of every backend of ``op`` (best first) for the support context ``ctx``."""
    explicit = dict(backends.availability(op, explicit=True, **ctx))
    unprompted = dict(backends.availability(op, explicit=False, **ctx))
    try:
        chosen = backends.select(op, backends.AUTO, **ctx).name
    except Exception:  # env override naming a backend that cannot run, or none can
        chosen = None
    return [
        BackendStatus(
            name=b.name,
            reason=explicit[b.name],
            auto_reason=unprompted[b.name],
            auto=b.auto,
            selected=b.name == chosen,
        )
        for b in backends.backends_of(op)
    ]


def auto_choice(op: str, ctx: Dict[str, Any]) -> Tuple[Optional[str], str]:
    """``(backend, why)``: what ``backend="auto"`` runs for the support context ``ctx``
    (``None`` and the error if nothing can), and why: a ``FOLDOPS_BACKEND*`` override,
    a size rule of :mod:`foldops.backend_rules`, or the priority order."""
    try:
        chosen = backends.select(op, backends.AUTO, **ctx).name
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    per_op = f"{backends.ENV_GLOBAL}_{op.upper()}"
    for var in (per_op, backends.ENV_GLOBAL):
        value = os.environ.get(var, "").strip()
        if value and value != backends.AUTO and value == chosen:
            return chosen, f"{var}={value}"
    ruled = backend_rules.preferred(op, **ctx)
    if ruled is not None and ruled[0] == chosen:
        return chosen, f"size rule: {ruled[1]}"
    return chosen, "priority order"
