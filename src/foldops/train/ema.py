"""Exponential moving average of a model's weights, independent of any trainer.

    ema = EMA(model, decay=0.999)
    ...
    optimizer.step()
    ema.update(model)               # after each optimizer step
    with ema.swap(model):           # evaluate with the averaged weights
        evaluate(model)
    torch.save(ema.export(), "ema.pt")   # a plain state dict for model.load_state_dict

The shadow weights are keyed by ``model.state_dict()`` names, so an exported EMA loads
straight into the model, and Boltz's Lightning EMA entries (``{"cur_step", "ema_weights"}``)
load into it unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Mapping, Optional

import torch
from torch import nn


def _full(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 keeps DTensor shards; checkpoints and exports hold the whole tensor.
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


class EMA:
    """EMA of every floating-point entry of ``model.state_dict()`` (parameters and buffers).

    Args:
        model: the module whose weights are averaged (the shadow starts as a copy).
        decay: the decay ``d`` in ``shadow = d * shadow + (1 - d) * weight``, in [0, 1].
        warmup: use ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that early
            averages are not dominated by the random initialisation (Boltz's ``warm_start``).
        include_buffers: also average floating-point buffers; integer buffers (e.g. batch
            norm's counter) are copied.
        device: where to keep the shadow (default: with the weights).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        *,
        warmup: bool = True,
        include_buffers: bool = True,
        device: Optional[torch.device] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a float in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.include_buffers = include_buffers
        self.device = device
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {}
        self._bind(model)
        with torch.no_grad():
            for name, t in self._averaged.items():
                self.shadow[name] = t.detach().clone() if device is None else t.detach().to(device, copy=True)

    def _bind(self, model: nn.Module) -> None:
        # References into the live model, built once; load_state_dict copies in place so
        # they stay valid.
        params = set(id(p) for p in model.parameters())
        self._averaged: Dict[str, torch.Tensor] = {}
        self._copied: Dict[str, torch.Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            if not isinstance(t, torch.Tensor):
                continue
            if t.is_floating_point() and (self.include_buffers or id(t) in params):
                self._averaged[name] = t
            else:
                self._copied[name] = t
        self._model_id = id(model)

    def _check_model(self, model: nn.Module) -> None:
        if id(model) != self._model_id:
            self._bind(model)
            missing = set(self.shadow) - set(self._averaged)
            if missing:
                raise ValueError(f"model: does not have the averaged weights {sorted(missing)[:10]}")

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (call after optimizer.step)."""
        self._check_model(model)
        weight = 1.0 - self.current_decay()
        names = list(self.shadow)
        shadow = [self.shadow[n] for n in names]
        current = [self._averaged[n].detach() for n in names]
        if self.device is not None:
            current = [c.to(self.device, non_blocking=True) for c in current]
        if shadow:
            torch._foreach_lerp_(shadow, current, weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the averages."""
        self._check_model(model)
        for name, s in self.shadow.items():
            self._averaged[name].detach().copy_(s)

    @contextlib.contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the EMA weights; its own come back after."""
        self._check_model(model)
        with torch.no_grad():
            backup = {n: self._averaged[n].detach().clone() for n in self.shadow}
            self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, b in backup.items():
                    self._averaged[n].detach().copy_(b)

    def export(self) -> Dict[str, torch.Tensor]:
        """The EMA weights as a complete model state dict (integer buffers from the model)."""
        out = {n: _full(t).detach().clone() for n, t in self._copied.items()}
        out.update({n: _full(s).detach().clone() for n, s in self.shadow.items()})
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {n: _full(s).detach() for n, s in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load a foldops EMA state, or Boltz/Lightning's ``{"cur_step", "ema_weights"}``."""
        if "ema_weights" in state:  # Boltz's EMA callback
            weights = state["ema_weights"]
            num_updates = int(state.get("cur_step") or 0)
        elif "shadow" in state:
            weights = state["shadow"]
            num_updates = int(state.get("num_updates", 0))
        else:
            raise ValueError(
                f"state: expected a foldops EMA state ('shadow') or a Lightning/Boltz one "
                f"('ema_weights'), got keys {sorted(state)}"
            )
        missing = [n for n in self.shadow if n not in weights]
        mismatched = [
            f"{n}: model {tuple(self.shadow[n].shape)} vs checkpoint {tuple(weights[n].shape)}"
            for n in self.shadow
            if n in weights and tuple(_full(self.shadow[n]).shape) != tuple(weights[n].shape)
        ]
        if mismatched or (strict and missing):
            raise ValueError(f"state: EMA weights do not fit the model; shapes differ: {mismatched[:10]}; "
                             f"missing: {missing[:10]}")
        for n, s in self.shadow.items():
            if n in weights:
                _copy_into(s, weights[n])
        self.num_updates = num_updates


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    if hasattr(dst, "device_mesh") and not hasattr(src, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements)
        dst.copy_(src)
    else:
        dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
