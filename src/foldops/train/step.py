"""The small objects one training step works with, and the parsing of what a model returns.

- :class:`AccumulationWindow`: the micro-batches of one optimizer step and their losses;
- :class:`StepMeters`: device-side loss sums and counts between logged rows and epochs;
- :class:`Gradients`: the total gradient norm and clipping over the optimizer's parameters;
- :class:`LRSchedule`: a scheduler with its interval, frequency and monitored metric;
- :func:`extract_loss`, :func:`parse_optimizers`: what ``training_step`` and
  ``configure_optimizers`` return, checked, with errors that name the method.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from foldops.train import distributed as fdist


def extract_loss(out: Any, where: str) -> Optional[torch.Tensor]:
    """The 0-dim loss in ``out`` (a tensor, a dict with ``"loss"``, or ``None``: skip)."""
    if isinstance(out, torch.Tensor) and out.dim() == 0:  # the common case first
        return out
    if out is None:
        return None
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise ValueError(f"{where}: returned a dict without a 'loss' entry (keys: {sorted(map(str, out))})")
        out = out["loss"]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where}: expected a loss tensor, a dict with 'loss', or None, got {type(out).__name__}")
    if out.dim() == 0:
        return out
    if out.numel() != 1:
        raise ValueError(f"{where}: the loss must be a scalar, got shape {tuple(out.shape)}")
    return out.reshape(())


def parse_optimizers(result: Any) -> Tuple[torch.optim.Optimizer, "LRSchedule"]:
    """``configure_optimizers()``'s result -> (optimizer, its schedule)."""
    def scheduler_entry(s):
        if s is None:
            return None, "epoch", 1, None
        if isinstance(s, Mapping):
            if "scheduler" not in s:
                raise ValueError("configure_optimizers: a scheduler dict needs a 'scheduler' entry")
            interval = s.get("interval", "epoch")
            if interval not in ("step", "epoch"):
                raise ValueError(f"configure_optimizers: scheduler interval must be 'step' or 'epoch', got {interval!r}")
            return s["scheduler"], interval, int(s.get("frequency", 1)), s.get("monitor")
        return s, "epoch", 1, None

    def single(x, what):
        if isinstance(x, (list, tuple)):
            if len(x) != 1:
                raise ValueError(f"configure_optimizers: the Trainer drives one optimizer (and at most one "
                                 f"scheduler), got {len(x)} {what}s")
            return x[0]
        return x

    sched = None
    if isinstance(result, torch.optim.Optimizer):
        opt = result
    elif isinstance(result, Mapping):
        if "optimizer" not in result:
            raise ValueError("configure_optimizers: a returned dict needs an 'optimizer' entry")
        opt, sched = result["optimizer"], result.get("lr_scheduler")
    elif isinstance(result, (list, tuple)) and len(result) == 2 and not isinstance(result[1], torch.optim.Optimizer):
        opt, sched = single(result[0], "optimizer"), single(result[1], "scheduler")
    elif isinstance(result, (list, tuple)):
        opt = single(list(result), "optimizer")
    else:
        opt = result
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"configure_optimizers: expected a torch.optim.Optimizer, got {type(opt).__name__}")
    return opt, LRSchedule(*scheduler_entry(sched))


class AccumulationWindow:
    """The micro-batches of one optimizer step: how many it holds, how many were run, their losses.

    Each micro-batch's loss is divided by ``size`` before backward, so that the window's
    gradient is the mean of its micro-batches' gradients.
    """

    __slots__ = ("size", "count", "loss_sum", "losses")

    def __init__(self) -> None:
        self.reset(1)

    def reset(self, size: int) -> None:
        self.size = size
        self.count = 0  # micro-batches run (a None loss counts: its batch was drawn)
        self.loss_sum: Optional[torch.Tensor] = None  # fp32 device tensor, no host read
        self.losses = 0  # micro-batches that returned a loss

    def add_loss(self, loss: torch.Tensor) -> None:
        detached = loss.detach().float()
        self.loss_sum = detached if self.loss_sum is None else self.loss_sum + detached
        self.losses += 1

    def mean_loss(self) -> Optional[torch.Tensor]:
        if self.loss_sum is None or self.losses == 1:
            return self.loss_sum
        return self.loss_sum / self.losses


class StepMeters:
    """What the per-step and per-epoch rows report, accumulated without a host read per step.

    The window-mean losses are summed into one preallocated ``[interval, epoch]`` device
    buffer (one in-place add per step) and read only when a row is written.
    """

    def __init__(self) -> None:
        self.loss_sums: Optional[torch.Tensor] = None
        self.interval_steps = 0  # steps with a loss since the last step row
        self.epoch_steps = 0  # steps with a loss since the last epoch row
        self.timed_steps = 0  # steps since interval_t0 (throughput)
        self.interval_samples = 0
        self.interval_t0 = time.perf_counter()
        self.last_norm: Optional[torch.Tensor] = None

    def state_dict(self) -> Dict[str, Any]:
        """The loss sums and counts of the open interval and epoch (throughput restarts)."""
        sums = [0.0, 0.0] if self.loss_sums is None else [float(v) for v in self.loss_sums.tolist()]
        return {"loss_sums": sums, "interval_steps": self.interval_steps, "epoch_steps": self.epoch_steps}

    def load_state_dict(self, state: Dict[str, Any], device: torch.device) -> None:
        self.loss_sums = torch.tensor([float(v) for v in state["loss_sums"]], dtype=torch.float32, device=device)
        self.interval_steps = int(state["interval_steps"])
        self.epoch_steps = int(state["epoch_steps"])

    def add_step(self, window_mean: Optional[torch.Tensor], norm: Optional[torch.Tensor]) -> None:
        self.timed_steps += 1
        if norm is not None:
            self.last_norm = norm
        if window_mean is None:
            return
        if self.loss_sums is None:
            self.loss_sums = torch.zeros(2, dtype=torch.float32, device=window_mean.device)
        self.loss_sums.add_(window_mean)
        self.interval_steps += 1
        self.epoch_steps += 1

    def _take(self, index: int) -> float:
        entry = self.loss_sums.select(0, index)
        value = float(entry.item())
        entry.zero_()
        return value

    def take_interval(self, values: Dict[str, Any]) -> Tuple[float, int, int]:
        """Add the interval's mean loss to ``values``; -> (elapsed s, steps timed, samples); restart it."""
        if self.interval_steps:
            values["train/loss"] = (self._take(0), float(self.interval_steps), "mean")
        now = time.perf_counter()
        out = (now - self.interval_t0, self.timed_steps, self.interval_samples)
        self.interval_steps = 0
        self.timed_steps = 0
        self.interval_samples = 0
        self.interval_t0 = now
        return out

    def take_epoch(self, values: Dict[str, Any]) -> None:
        """Add the epoch's mean loss to ``values`` and restart the epoch sum."""
        if self.epoch_steps:
            values["train/loss_epoch"] = (self._take(1), float(self.epoch_steps), "mean")
        self.epoch_steps = 0


class Gradients:
    """The total 2-norm and clipping of the gradients of the optimizer's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, sharded: bool) -> None:
        self.params: List[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        self.device = device
        # Gradients share their parameter's device and dtype: one group (and no sharded
        # DTensors) allows a single foreach norm.
        self.fast = (not sharded and len({(p.device, p.dtype) for p in self.params}) == 1
                     and all(type(p) in (nn.Parameter, torch.Tensor) for p in self.params))

    def norm(self) -> torch.Tensor:
        """Total 2-norm as a 0-dim device tensor (no host sync)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        if self.fast:
            # One foreach kernel over all gradients, then the norm of the per-tensor norms:
            # torch's get_total_norm without its per-call grouping and support checks.
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return fdist.full_tensor(torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None))

    def clip(self, value: float, algorithm: str, norm: Optional[torch.Tensor]) -> None:
        if algorithm == "norm":
            torch.nn.utils.clip_grads_with_norm_(self.params, value, norm)
        else:
            torch.nn.utils.clip_grad_value_(self.params, value)


class LRSchedule:
    """A learning-rate scheduler stepped per optimizer step or per epoch, every ``frequency``."""

    def __init__(self, scheduler: Any, interval: str, frequency: int, monitor: Optional[str]) -> None:
        self.scheduler = scheduler
        self.interval = interval
        self.frequency = frequency
        self.monitor = monitor
        self.stepped_once = False  # an optimizer step was taken (not skipped) at least once

    def after_optimizer_step(self, step: int, metrics: Dict[str, float], monitor: Optional[str]) -> None:
        if self.scheduler is not None and self.interval == "step" and step % self.frequency == 0:
            self._step(metrics, monitor)

    def after_epoch(self, epoch: int, metrics: Dict[str, float], monitor: Optional[str]) -> None:
        if self.scheduler is not None and self.interval == "epoch" and (epoch + 1) % self.frequency == 0:
            self._step(metrics, monitor)

    def _step(self, metrics: Dict[str, float], monitor: Optional[str]) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            name = self.monitor or monitor
            value = metrics.get(name) if name else None
            if value is not None:  # nothing to compare before the first value
                self.scheduler.step(value)
        elif self.stepped_once:
            self.scheduler.step()
        else:
            with warnings.catch_warnings():
                # The schedule follows global_step, skipped steps included (fp16 scaler
                # warm-up skips the first steps); torch warns about that order.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                self.scheduler.step()


def is_nonfinite(norm: torch.Tensor, loss_sum: Optional[torch.Tensor], distributed: bool) -> bool:
    """True when the window's loss or the gradient norm is inf/NaN (on any rank)."""
    # The sum is finite only when both terms are: one op and one host read.
    probe = norm if loss_sum is None else norm + loss_sum.to(norm.device)
    if distributed:
        return bool(fdist.any_true(~torch.isfinite(probe)).item())
    return not math.isfinite(probe.item())
