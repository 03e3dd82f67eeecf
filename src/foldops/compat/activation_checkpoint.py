"""Activation checkpointing: fairscale's ``checkpoint_wrapper`` drop-in, with real recompute.

    from foldops.compat import checkpoint_wrapper
    layers.append(checkpoint_wrapper(PairformerLayer(...), offload_to_cpu=False))

As fairscale's, it returns the *same* module with its ``forward`` replaced, so parameter
names (and so state-dict keys of existing checkpoints) do not change. In training with
autograd on, the forward runs under non-reentrant ``torch.utils.checkpoint``: only the
module's inputs are kept, everything inside is recomputed in backward (with the same RNG
state, so dropout masks match). With ``offload_to_cpu=True`` those inputs are kept in host
memory until backward. In eval mode or under ``torch.no_grad()`` it is a plain call.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_wrapper", "is_checkpoint_wrapped", "remove_checkpoint_wrapper"]

_FLAG = "_foldops_checkpoint_offload"
_INNER = "_foldops_checkpoint_inner_forward"


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _inner_forward(module: nn.Module) -> Callable[..., Any]:
    inner = module.__dict__.get(_INNER)
    if inner is not None:
        return inner
    return functools.partial(type(module).forward, module)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = _inner_forward(self)
    if not (self.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    if not self.__dict__.get(_FLAG, False):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    devices = {}

    def to_host(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        devices[id(t)] = t.device
        return t.to("cpu", non_blocking=True)

    # Only the host copies stay referenced by the checkpoint; the device inputs can be
    # freed. The first thing the checkpointed region does is copy them back, which is
    # also what the recomputation in backward does.
    host_args = _map_tensors(args, to_host)
    host_kwargs = _map_tensors(kwargs, to_host)
    device = next(iter(devices.values()), None)

    def run(*a: Any, **kw: Any) -> Any:
        if device is not None:
            back = lambda t: t.to(device, non_blocking=True) if t.device.type == "cpu" else t  # noqa: E731
            a, kw = _map_tensors(a, back), _map_tensors(kw, back)
        return forward(*a, **kw)

    return checkpoint(run, *host_args, use_reentrant=False, **host_kwargs)


def checkpoint_wrapper(module: nn.Module, offload_to_cpu: bool = False) -> nn.Module:
    """Activation-checkpoint ``module`` in training; fairscale's signature and behaviour.

    Args:
        module: any ``nn.Module``; it is modified in place and returned.
        offload_to_cpu: keep the saved inputs in host memory until backward (saves device
            memory at the cost of two copies per block; a no-op for CPU tensors).

    Returns:
        ``module`` itself (same parameters, same state-dict keys).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(offload_to_cpu, bool):
        raise TypeError(f"offload_to_cpu: expected a bool, got {type(offload_to_cpu).__name__}")
    if not is_checkpoint_wrapped(module):
        existing = module.__dict__.get("forward")
        if existing is not None:  # someone already replaced forward on the instance
            module.__dict__[_INNER] = existing
        module.forward = types.MethodType(_checkpointed_forward, module)
    module.__dict__[_FLAG] = offload_to_cpu
    return module


def is_checkpoint_wrapped(module: nn.Module) -> bool:
    return _FLAG in module.__dict__


def remove_checkpoint_wrapper(module: nn.Module) -> nn.Module:
    """Undo :func:`checkpoint_wrapper` (returns the module)."""
    if is_checkpoint_wrapped(module):
        del module.__dict__[_FLAG]
        inner = module.__dict__.pop(_INNER, None)
        if inner is not None:
            module.forward = inner
        else:
            del module.__dict__["forward"]
    return module
