"""``log(name, value)``: the replacement for Lightning's ``self.log``.

Inside a Trainer's loops ``foldops.train.log("train/lddt", x)`` records a value; outside
them it does nothing, so a model's steps also run in a plain script. Models that would
rather keep ``self.log(...)`` can inherit :class:`LogMixin`.

Values are kept as detached tensors (no device sync per call) and reduced when written:
per step (averaged over the ``log_every_n_steps`` interval) and per epoch (mean over the
epoch, weighted by ``batch_size`` when given), averaged across ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

_ACTIVE: contextvars.ContextVar[Optional["MetricStore"]] = contextvars.ContextVar("foldops_metric_store", default=None)

_REDUCES = ("mean", "sum", "max", "min")


def log(
    name: str,
    value: Any,
    *,
    on_step: Optional[bool] = None,
    on_epoch: Optional[bool] = None,
    prog_bar: bool = False,
    batch_size: Optional[int] = None,
    reduce_fx: str = "mean",
    **lightning_kwargs: Any,
) -> None:
    """Record a metric from inside a training, validation or prediction step.

    Args:
        name: metric name, e.g. ``"train/distogram_loss"``.
        value: a number, a one-element tensor, or an object with ``compute()`` (a torchmetrics
            metric, computed and ``reset()`` at the end of the epoch).
        on_step: write per step. Default: True in training, False in validation.
        on_epoch: write the epoch mean. Default: False in training, True in validation.
        prog_bar: also show it on the progress bar.
        batch_size: weight of this value in the epoch mean (default 1).
        reduce_fx: how to combine values within an epoch: ``"mean"``, ``"sum"``, ``"max"``,
            ``"min"``; across ranks the same reduction is applied (means weighted).
        lightning_kwargs: Lightning's other arguments (``sync_dist``, ``logger``, ...) are
            accepted and ignored: values are always reduced across ranks.
    """
    store = _ACTIVE.get()
    if store is None:
        return
    store.record(name, value, on_step=on_step, on_epoch=on_epoch, prog_bar=prog_bar,
                 batch_size=batch_size, reduce_fx=reduce_fx)


class LogMixin:
    """Gives an ``nn.Module`` Lightning's ``self.log`` / ``self.log_dict`` spelling."""

    def log(self, name: str, value: Any, **kwargs: Any) -> None:  # noqa: D401
        log(name, value, **kwargs)

    def log_dict(self, values: Dict[str, Any], **kwargs: Any) -> None:
        for name, value in values.items():
            log(name, value, **kwargs)


def _as_value(name: str, value: Any):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value.detach()
        if value.numel() != 1:
            raise ValueError(f"log: {name!r} needs a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(())
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool):
        return float(value)
    if hasattr(value, "compute"):
        return value
    raise TypeError(f"log: {name!r} expects a number, a one-element tensor or a metric object, "
                    f"got {type(value).__name__}")


def _to_float(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return float(v)


class _Series:
    __slots__ = ("values", "weights", "reduce_fx", "metric")

    def __init__(self, reduce_fx: str) -> None:
        self.values: List[Any] = []
        self.weights: List[float] = []
        self.reduce_fx = reduce_fx
        self.metric = None

    def add(self, value: Any, weight: float) -> None:
        if hasattr(value, "compute") and not isinstance(value, torch.Tensor):
            self.metric = value
            return
        self.values.append(value)
        self.weights.append(weight)

    def summarise(self) -> Optional[Tuple[float, float, str]]:
        """(weighted sum, weight, "mean") or (value, 1, "sum" | "max" | "min")."""
        if self.metric is not None:
            v = _to_float(self.metric.compute())
            if hasattr(self.metric, "reset"):
                self.metric.reset()
            return v, 1.0, "mean"
        if not self.values:
            return None
        vals = [v if not isinstance(v, torch.Tensor) else None for v in self.values]
        by_device: Dict[torch.device, List[int]] = {}
        for i, v in enumerate(self.values):
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(i)
        for dev, idx in by_device.items():
            if dev.type == "cpu":  # no sync to save: a read each is cheaper than a stack
                for i in idx:
                    vals[i] = float(self.values[i].item())
                continue
            for i, x in zip(idx, torch.stack([self.values[i].float() for i in idx]).tolist()):  # one sync
                vals[i] = x
        if self.reduce_fx == "mean":
            total_w = sum(self.weights)
            return sum(v * w for v, w in zip(vals, self.weights)), total_w, "mean"
        if self.reduce_fx == "sum":
            return sum(vals), 1.0, "sum"
        if self.reduce_fx == "max":
            return max(vals), 1.0, "max"
        return min(vals), 1.0, "min"


def _series(table: Dict[str, _Series], name: str, reduce_fx: str) -> _Series:
    s = table.get(name)
    if s is None:  # built only for a new name, not on every call
        s = table[name] = _Series(reduce_fx)
    return s


class MetricStore:
    """Collects logged values, per stage ("train", "val", "predict")."""

    def __init__(self) -> None:
        self.stage = "train"
        self._step: Dict[str, _Series] = {}
        self._epoch: Dict[str, Dict[str, _Series]] = {}
        self.prog_bar_names: set = set()
        self.latest: Dict[str, Any] = {}

    def record(self, name: str, value: Any, *, on_step: Optional[bool], on_epoch: Optional[bool],
               prog_bar: bool, batch_size: Optional[int], reduce_fx: str) -> None:
        if reduce_fx not in _REDUCES:
            raise ValueError(f"log: reduce_fx must be one of {_REDUCES}, got {reduce_fx!r}")
        if isinstance(value, torch.Tensor) and value.dim() == 0:  # the common case, checked first
            value = value.detach()
        else:
            value = _as_value(name, value)
        if not isinstance(name, str) or not name:
            raise TypeError(f"log: name must be a non-empty string, got {name!r}")
        training = self.stage == "train"
        if on_step is None:
            on_step = training
        if on_epoch is None:
            on_epoch = not training
        weight = float(batch_size) if batch_size is not None else 1.0
        if on_step and training:
            _series(self._step, name, reduce_fx).add(value, weight)
        # Outside training there are no per-step rows: step values join the epoch mean.
        if on_epoch or (on_step and not training):
            _series(self._epoch.setdefault(self.stage, {}), name, reduce_fx).add(value, weight)
        if prog_bar:
            self.prog_bar_names.add(name)
            self.latest[name] = value

    @staticmethod
    def _summarise(series: Dict[str, _Series]) -> Dict[str, Tuple[float, float, str]]:
        out = {}
        for name, s in series.items():
            summary = s.summarise()
            if summary is not None:
                out[name] = summary
        return out

    def take_step(self) -> Dict[str, Tuple[float, float, str]]:
        """{name: (weighted sum, weight)} of the training values since the last call."""
        out = self._summarise(self._step)
        self._step = {}
        return out

    def take_epoch(self, stage: str) -> Dict[str, Tuple[float, float, str]]:
        """{name: (weighted sum, weight)} of ``stage``'s epoch values since the last call."""
        out = self._summarise(self._epoch.pop(stage, {}))
        return out

    def state_dict(self) -> Dict[str, Any]:
        """The pending training values (this step interval's and this epoch's), summarised.

        What a checkpoint keeps so that a resumed run writes the rows the uninterrupted
        run would have written. Metric objects (``compute()``) keep their own state and
        are left out.
        """
        def summaries(table: Dict[str, _Series]) -> Dict[str, Any]:
            out = {}
            for name, s in table.items():
                if s.metric is None:
                    summary = s.summarise()
                    if summary is not None:
                        out[name] = [float(summary[0]), float(summary[1]), s.reduce_fx]
            return out

        return {"step": summaries(self._step), "epoch": summaries(self._epoch.get("train", {}))}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        def restore(table: Dict[str, _Series], saved: Dict[str, Any]) -> None:
            for name, (value, weight, reduce_fx) in saved.items():
                series = _series(table, name, reduce_fx)
                if reduce_fx == "mean":  # (weighted sum, weight) -> one value of that weight
                    series.add(value / weight if weight else 0.0, weight)
                else:
                    series.add(value, 1.0)

        self.clear()
        restore(self._step, state.get("step", {}))
        restore(self._epoch.setdefault("train", {}), state.get("epoch", {}))

    def clear(self) -> None:
        self._step = {}
        self._epoch = {}

    @contextlib.contextmanager
    def active(self, stage: str) -> Iterator["MetricStore"]:
        previous_stage = self.stage
        self.stage = stage
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)
            self.stage = previous_stage
