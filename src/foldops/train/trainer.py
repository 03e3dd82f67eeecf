"""The Trainer: a linear, readable training loop in plain PyTorch (after torchtitan).

The model is a plain ``nn.Module`` with

- ``training_step(batch, step)`` -> a loss tensor, a dict with ``"loss"``, or ``None``
  (skip the batch; single process only);
- optional ``validation_step(batch, index)`` and ``predict_step(batch, index)``
  (without ``predict_step``, ``model(batch)`` is called);
- ``configure_optimizers()`` -> an optimizer, ``(optimizer, scheduler)``, Lightning's
  ``([optimizer], [scheduler])`` or ``{"optimizer": ..., "lr_scheduler": ...}``; a scheduler
  may be a dict with ``"interval"`` (``"step"`` or ``"epoch"``, Lightning's default) and
  ``"frequency"``;
- optional hooks, called when defined: ``on_fit_start()``, ``on_fit_end()``,
  ``on_train_epoch_start()``, ``on_train_epoch_end()``, ``on_validation_epoch_start()``,
  ``on_validation_epoch_end()``, ``on_save_checkpoint(checkpoint)``,
  ``on_load_checkpoint(checkpoint)``.

Metrics are recorded with :func:`foldops.train.log` from anywhere in a step.

One optimizer step, in order: forward and backward of each micro-batch of the
accumulation window (gradients synchronised on the last one only), unscale (fp16),
gradient norm, skip if the loss or the norm is not finite, clip, optimizer step, scheduler
step, EMA update; then logging, validation and checkpoints when due.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from foldops import device as fdevice
from foldops.compat.seed import seed_everything
from foldops.train import distributed as fdist
from foldops.train.checkpointing import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    atomic_save,
    capture_rng_state,
    check_state_dict,
    read_checkpoint,
    remove_stale_temporaries,
    restore_rng_state,
)
from foldops.train.config import TrainerConfig
from foldops.train.data import EpochData, batch_size_of, eval_loader, transfer_to_device
from foldops.train.ema import EMA
from foldops.train.loggers import Logger, make_loggers
from foldops.train.metrics import MetricStore, log
from foldops.train.predict import check_writer, writer_close, writer_setup, writer_write
from foldops.train.progress import ProgressBar

logger = logging.getLogger("foldops.train")

ResumeArg = Union[None, str, os.PathLike]
_NULL_CONTEXT = contextlib.nullcontext()
_AMP_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def _extract_loss(out: Any, where: str) -> Optional[torch.Tensor]:
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


def _parse_optimizers(result: Any):
    """-> (optimizer, scheduler or None, interval, frequency, monitor)."""
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
    s, interval, frequency, monitor = scheduler_entry(sched)
    return opt, s, interval, frequency, monitor


def _plain(obj: Any) -> bool:
    """Only types that weights_only loading accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    return False


class Trainer:
    """Fit, validate and predict with a plain ``nn.Module``; see the module docstring.

    Args:
        config: a :class:`TrainerConfig`; keyword arguments override its fields (or build
            one when ``config`` is None): ``Trainer(max_steps=100, precision="bf16-mixed")``.
        loggers: extra logger objects (see ``foldops.train.loggers``) beside the built-in ones.
    """

    def __init__(self, config: Optional[TrainerConfig] = None, *, loggers: Sequence[Logger] = (), **overrides: Any):
        if config is None:
            config = TrainerConfig(**overrides)
        elif not isinstance(config, TrainerConfig):
            raise TypeError(f"config: expected a TrainerConfig, got {type(config).__name__}")
        elif overrides:
            config = config.replace(**overrides)
        self.config = config
        self._extra_loggers = list(loggers)
        self.global_step = 0
        self.epoch = 0
        self.counters: Dict[str, int] = {"skipped_nonfinite": 0, "oom_batches": 0, "null_loss_batches": 0}
        self.callback_metrics: Dict[str, float] = {}
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.scaler = None
        self.ema: Optional[EMA] = None
        self.checkpoints: Optional[CheckpointManager] = None
        self.device: Optional[torch.device] = None
        self._ctx: Optional[fdist.DistContext] = None
        self._engine: Optional[nn.Module] = None
        self._dispatch: Optional[fdist.StepDispatch] = None
        self._strategy = "single"
        self._metrics = MetricStore()
        self._loggers: List[Logger] = []
        self._progress: Optional[ProgressBar] = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._batches_in_epoch = 0
        self._window_count = 0
        self._window_size = 1
        self._window_loss: Optional[torch.Tensor] = None
        self._window_n = 0
        self._stepped_once = False
        self._loss_sums: Optional[torch.Tensor] = None  # [interval, epoch] sums of window means
        self._interval_steps = 0
        self._interval_t0 = time.perf_counter()
        self._interval_samples = 0
        self._epoch_loss_steps = 0
        self._consecutive_ooms = 0
        self._last_norm: Optional[torch.Tensor] = None
        self._last_saved_step = -1
        self._stop = False

    # Properties ---------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._ctx.rank if self._ctx else 0

    @property
    def world_size(self) -> int:
        return self._ctx.world_size if self._ctx else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def best_model_path(self) -> Optional[Path]:
        return self.checkpoints.best_path if self.checkpoints else None

    @property
    def last_checkpoint_path(self) -> Optional[Path]:
        return Path(self.config.checkpoint_dir) / "last.ckpt" if self.config.checkpoint_dir else None

    # Set-up -------------------------------------------------------------------------------

    def _setup_runtime(self) -> None:
        if self._ctx is None:
            self._ctx, self.device = fdist.setup(self.config.device, self.config.dist_timeout_s, self.config.strategy)
            strategy = self.config.strategy
            if strategy == "auto":
                strategy = "ddp" if self._ctx.enabled else "single"
            self._strategy = strategy

    def _autocast(self):
        dtype = _AMP_DTYPES.get(self.config.precision)
        if dtype is None:
            return _NULL_CONTEXT
        return fdevice.autocast(self.device, dtype=dtype)

    def _attach(self, model: nn.Module) -> None:
        """Move to the device and wrap for the strategy (once per model)."""
        if self.model is model and self._engine is not None:
            return
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        model.to(self.device)
        self.model = model
        self._dispatch = fdist.StepDispatch(model)
        if self._strategy == "ddp":
            self._engine = fdist.wrap_ddp(self._dispatch, self.device, self.config.find_unused_parameters)
        elif self._strategy == "fsdp":
            self._engine = fdist.apply_fsdp(self._dispatch, self.config.fsdp_blocks, None, self.device)
        else:
            self._engine = self._dispatch
        self.optimizer = None
        self.ema = None

    def _resolve_resume(self, resume: ResumeArg) -> Optional[Path]:
        if resume is None:
            return None
        if isinstance(resume, str) and resume == "last":
            if self.config.checkpoint_dir is None:
                raise ValueError("resume: 'last' needs config.checkpoint_dir to be set")
            path = Path(self.config.checkpoint_dir) / "last.ckpt"
            if not path.exists():
                if self.is_main:
                    logger.warning("resume='last': no %s yet, starting from scratch", path)
                return None
            return path
        if not isinstance(resume, (str, os.PathLike)):
            raise TypeError(f"resume: expected None, 'last' or a path, got {type(resume).__name__}")
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
        return path

    def _call_hook(self, name: str, *args: Any) -> None:
        fn = getattr(self.model, name, None)
        if callable(fn):
            fn(*args)

    # Fit ----------------------------------------------------------------------------------

    def fit(self, model: nn.Module, train_loader: Any, val_loader: Any = None, resume: ResumeArg = None) -> None:
        """Train ``model`` until ``max_steps`` or ``max_epochs``.

        Args:
            model: an ``nn.Module`` with ``training_step`` and ``configure_optimizers``.
            train_loader: a ``DataLoader`` (rebuilt around a resumable, rank-sharded sampler)
                or any iterable of batches.
            val_loader: optional validation data.
            resume: ``None`` (fresh start), ``"last"`` (``checkpoint_dir/last.ckpt`` if it
                exists, else a fresh start) or a checkpoint path.
        """
        cfg = self.config
        for name in ("training_step", "configure_optimizers") + (("validation_step",) if val_loader is not None else ()):
            if not callable(getattr(model, name, None)):
                raise TypeError(f"model: {type(model).__name__} has no {name}() method"
                                + (" (needed with a val_loader)" if name == "validation_step" else ""))
        self._setup_runtime()
        resume_path = self._resolve_resume(resume)
        if cfg.seed is not None:
            seed_everything(cfg.seed + self.rank)
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self._attach(model)
        # DDP and FSDP hook the wrapper's __call__; a single process calls the step directly,
        # without the module-call machinery on every batch.
        self._train_step = model.training_step if self._engine is self._dispatch \
            else functools.partial(self._engine, "train")
        self._reset_run_state()
        self.global_step = 0
        self.epoch = 0
        self.counters = {k: 0 for k in self.counters}

        opt, sched, interval, frequency, monitor = _parse_optimizers(model.configure_optimizers())
        self.optimizer, self.scheduler = opt, sched
        self._sched_interval, self._sched_frequency, self._sched_monitor = interval, frequency, monitor
        self._params = [p for group in opt.param_groups for p in group["params"]]
        # Gradients share their parameter's device and dtype: one group (and no sharded
        # DTensors) lets _grad_norm use a single foreach norm.
        self._fast_norm = (self._strategy != "fsdp" and len({(p.device, p.dtype) for p in self._params}) == 1
                           and all(type(p) in (nn.Parameter, torch.Tensor) for p in self._params))
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16-mixed" else None
        if cfg.ema_decay is not None:
            self.ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
        self.checkpoints = None
        if cfg.checkpoint_dir is not None and self.is_main:
            remove_stale_temporaries(cfg.checkpoint_dir)
            self.checkpoints = CheckpointManager(cfg.checkpoint_dir, save_top_k=cfg.save_top_k, monitor=cfg.monitor,
                                                 mode=cfg.monitor_mode, keep_step=cfg.keep_step_checkpoints)
        self._train_data = EpochData(train_loader, seed=cfg.seed or 0, rank=self.rank,
                                     world_size=self.world_size, train=True)
        self._val_loader = val_loader
        if resume_path is not None:
            self._restore(resume_path)

        self._open_loggers(resumed=resume_path is not None)
        total = self._total_steps()
        self._progress = ProgressBar(total, enabled=cfg.progress_bar and self.is_main)
        self._progress.start(self.global_step)
        try:
            self._call_hook("on_fit_start")
            self._fit_loop()
            if cfg.checkpoint_dir is not None and self._last_saved_step != self.global_step:
                self._save()
            self._call_hook("on_fit_end")
            fdist.barrier()
        finally:
            self._progress.close()
            for lg in self._loggers:
                lg.close()
            if cfg.deterministic and not deterministic_before:
                torch.use_deterministic_algorithms(False)

    def _total_steps(self) -> Optional[int]:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        n = self._train_data.num_batches(0)
        if n is None:
            return None
        return cfg.max_epochs * math.ceil(n / cfg.accumulate_grad_batches)

    def _open_loggers(self, resumed: bool) -> None:
        cfg = self.config
        self._loggers = []
        if not self.is_main:
            return
        log_dir = cfg.log_dir or cfg.checkpoint_dir
        self._loggers = make_loggers(cfg.loggers, log_dir, cfg.run_name, cfg.to_dict()) + self._extra_loggers
        for lg in self._loggers:
            if resumed:
                lg.truncate_after(self.global_step)
            else:
                lg.log_hyperparams(cfg.to_dict())

    def _done(self) -> bool:
        cfg = self.config
        if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
            return True
        return cfg.max_epochs is not None and self.epoch >= cfg.max_epochs

    def _fit_loop(self) -> None:
        self._engine.train()
        while not self._done():
            n_epoch = self._train_data.num_batches(self.epoch)
            it = self._train_data.epoch_iter(self.epoch, self._batches_in_epoch)
            start_batches = self._batches_in_epoch
            self._call_hook("on_train_epoch_start")
            exhausted = True
            with self._metrics.active("train"):
                for batch in it:
                    self._batches_in_epoch += 1
                    self._train_batch(batch, n_epoch)
                    if self._stop:
                        exhausted = n_epoch is not None and self._batches_in_epoch >= n_epoch
                        break
                if exhausted and self._window_count > 0:  # a loader without len() ended mid-window
                    self._optimizer_step()
            if exhausted:
                if self._batches_in_epoch == 0 and start_batches == 0:
                    raise ValueError("train_loader: yielded no batches in an epoch")
                self._end_epoch()
            if self._stop:
                break

    def _train_batch(self, batch: Any, n_epoch: Optional[int]) -> None:
        accum = self.config.accumulate_grad_batches
        if self._window_count == 0:
            remaining = None if n_epoch is None else n_epoch - (self._batches_in_epoch - 1)
            self._window_size = accum if remaining is None or remaining <= 0 else min(accum, remaining)
        self._window_count += 1
        last = self._window_count >= self._window_size
        n = batch_size_of(batch)
        if n:
            self._interval_samples += n * self.world_size
            self._progress.add_samples(n * self.world_size)
        batch = transfer_to_device(batch, self.device)
        if self._forward_backward(batch, sync=last) == "oom":
            return
        if last:
            self._optimizer_step()

    def _no_sync(self, sync: bool):
        if sync or not self._ctx.enabled:
            return _NULL_CONTEXT
        return self._no_sync_distributed()

    @contextlib.contextmanager
    def _no_sync_distributed(self):
        if self._strategy == "ddp":
            with self._engine.no_sync():
                yield
        elif self._strategy == "fsdp":
            self._engine.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self._engine.set_requires_gradient_sync(True)
        else:
            yield

    def _forward_backward(self, batch: Any, sync: bool) -> str:
        """One micro-batch: "ok", "none" (the step returned None) or "oom" (skipped)."""
        oom = False
        try:
            with self._no_sync(sync):
                with self._autocast():
                    out = self._train_step(batch, self.global_step)
                loss = _extract_loss(out, "training_step")
                if loss is None:
                    if self._ctx.enabled:
                        raise ValueError("training_step: returned None under DDP/FSDP, where every rank must "
                                         "run backward; return a zero loss instead")
                    self.counters["null_loss_batches"] += 1
                    return "none"
                detached = loss.detach().float()
                self._window_loss = detached if self._window_loss is None else self._window_loss + detached
                self._window_n += 1
                scaled = loss / self._window_size if self._window_size > 1 else loss
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            self._consecutive_ooms = 0
            return "ok"
        except Exception as exc:  # noqa: BLE001 - only device OOM is handled; the rest re-raised
            if not fdevice.is_out_of_memory(exc):
                raise
            if self._ctx.enabled:
                raise RuntimeError(
                    f"out of memory on rank {self.rank} at step {self.global_step}; under DDP/FSDP a batch "
                    f"cannot be skipped on one rank alone (the others wait for its gradients). Reduce the "
                    f"batch or crop size, or enable activation checkpointing."
                ) from exc
            oom = True
        finally:
            out = loss = scaled = None  # noqa: F841 - drop the graph before recovering
        if oom:
            self._recover_from_oom()
        return "oom"

    def _recover_from_oom(self) -> None:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        self._window_count = 0
        self._window_loss = None
        self._window_n = 0
        gc.collect()
        fdevice.empty_cache(self.device)
        self.counters["oom_batches"] += 1
        self._consecutive_ooms += 1
        logger.warning("out of memory at step %d (epoch %d, batch %d): batch skipped, gradient window dropped "
                       "(%d OOM batches so far)", self.global_step, self.epoch, self._batches_in_epoch,
                       self.counters["oom_batches"])
        self._emit({"train/oom_batches": float(self.counters["oom_batches"])}, self.global_step)
        if self._consecutive_ooms >= cfg.max_consecutive_ooms:
            raise RuntimeError(
                f"out of memory in {self._consecutive_ooms} consecutive training batches "
                f"(max_consecutive_ooms={cfg.max_consecutive_ooms}); stopping. Reduce the batch or crop "
                f"size, use bf16-mixed precision, or enable activation checkpointing "
                f"(foldops.compat.checkpoint_wrapper)."
            )

    def _grad_norm(self) -> torch.Tensor:
        """Total 2-norm of the gradients as a 0-dim device tensor (no host sync)."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        if self._fast_norm:
            # One foreach kernel over all gradients, then the norm of the per-tensor norms:
            # torch's get_total_norm without its per-call grouping and support checks.
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)
        return fdist.full_tensor(norm)

    def _is_nonfinite(self, norm: torch.Tensor) -> bool:
        """True when the window's loss or the gradient norm is inf/NaN (on any rank)."""
        # The sum is finite only when both terms are: one op and one host read.
        probe = norm if self._window_loss is None else norm + self._window_loss.to(norm.device)
        if self._ctx.enabled:
            return bool(fdist.any_true(~torch.isfinite(probe)).item())
        return not math.isfinite(probe.item())

    def _optimizer_step(self) -> None:
        cfg = self.config
        opt = self.optimizer
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        clip_norm = cfg.gradient_clip_val is not None and cfg.gradient_clip_algorithm == "norm"
        # One norm serves the non-finite check, clipping and the logged train/grad_norm;
        # with neither check nor clipping it is computed only on the steps that log it.
        norm = None
        if cfg.skip_nonfinite or clip_norm or self._log_due(self.global_step + 1):
            norm = self._grad_norm()
        skip = cfg.skip_nonfinite and self._is_nonfinite(norm)
        if skip:
            self.counters["skipped_nonfinite"] += 1
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale, as a skipped fp16 step should
            if self.is_main:
                logger.warning("non-finite loss or gradient at step %d: optimizer step skipped (%d so far)",
                               self.global_step, self.counters["skipped_nonfinite"])
        else:
            if clip_norm:
                torch.nn.utils.clip_grads_with_norm_(self._params, cfg.gradient_clip_val, norm)
            elif cfg.gradient_clip_val is not None:
                torch.nn.utils.clip_grad_value_(self._params, cfg.gradient_clip_val)
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            self._stepped_once = True
        opt.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.scheduler is not None and self._sched_interval == "step" \
                and self.global_step % self._sched_frequency == 0:
            self._step_scheduler()
        if self.ema is not None and not skip:
            self.ema.update(self.model)
        if norm is not None:
            self._last_norm = norm
        window_mean = self._window_loss
        if window_mean is not None and self._window_n > 1:
            window_mean = window_mean / self._window_n
        if window_mean is not None:
            self._add_loss(window_mean)
        self._window_count = 0
        self._window_loss = None
        self._window_n = 0
        self._after_step(window_mean)

    def _step_scheduler(self) -> None:
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            name = self._sched_monitor or self.config.monitor
            value = self.callback_metrics.get(name) if name else None
            if value is None:
                return  # nothing to compare yet
            self.scheduler.step(value)
        elif self._stepped_once:
            self.scheduler.step()
        else:
            with warnings.catch_warnings():
                # The schedule follows global_step, skipped steps included (fp16 scaler
                # warm-up skips the first steps); torch warns about that order.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                self.scheduler.step()

    def _add_loss(self, window_mean: torch.Tensor) -> None:
        # [interval sum, epoch sum] in one preallocated device buffer: one in-place op per
        # step, read (one sync) only when a row is written.
        if self._loss_sums is None:
            self._loss_sums = torch.zeros(2, dtype=torch.float32, device=window_mean.device)
        self._loss_sums.add_(window_mean)
        self._interval_steps += 1
        self._epoch_loss_steps += 1

    def _take_loss_sum(self, index: int) -> float:
        entry = self._loss_sums.select(0, index)
        value = float(entry.item())
        entry.zero_()
        return value

    def _log_due(self, step: int) -> bool:
        cfg = self.config
        return step % cfg.log_every_n_steps == 0 or (cfg.max_steps is not None and step >= cfg.max_steps)

    def _after_step(self, loss: Optional[torch.Tensor]) -> None:
        cfg = self.config
        step = self.global_step
        if self._log_due(step):
            self._write_step_metrics()
        self._progress.update(step, self.epoch, loss=loss)
        validated = False
        if self._val_loader is not None and cfg.val_every_n_steps is not None and step % cfg.val_every_n_steps == 0:
            self._validate_in_fit()
            validated = True
        step_file = cfg.checkpoint_every_n_steps is not None and step % cfg.checkpoint_every_n_steps == 0
        if cfg.checkpoint_dir is not None and (step_file or (validated and cfg.monitor is not None)):
            self._save(step_file=step_file)
        if cfg.max_steps is not None and step >= cfg.max_steps:
            self._stop = True

    def _write_step_metrics(self) -> None:
        values = self._metrics.take_step()
        if self._interval_steps:
            values["train/loss"] = (self._take_loss_sum(0), float(self._interval_steps), "mean")
        metrics = fdist.reduce_across_ranks(values)
        now = time.perf_counter()
        elapsed = now - self._interval_t0
        if elapsed > 0 and self._interval_steps:
            metrics["train/steps_per_s"] = self._interval_steps / elapsed
            if self._interval_samples:
                metrics["train/samples_per_s"] = self._interval_samples / elapsed
        if self._last_norm is not None:
            metrics["train/grad_norm"] = float(self._last_norm.item())
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["epoch"] = float(self.epoch)
        metrics["train/skipped_nonfinite"] = float(self.counters["skipped_nonfinite"])
        metrics["train/oom_batches"] = float(self.counters["oom_batches"])
        if self.scaler is not None:
            metrics["train/loss_scale"] = float(self.scaler.get_scale())
        self._emit(metrics, self.global_step)
        self._interval_steps = 0
        self._interval_samples = 0
        self._interval_t0 = now

    def _emit(self, metrics: Dict[str, float], step: int) -> None:
        self.callback_metrics.update(metrics)
        if self.is_main:
            for lg in self._loggers:
                lg.log_metrics(dict(metrics), step)

    def _end_epoch(self) -> None:
        cfg = self.config
        with self._metrics.active("train"):
            self._call_hook("on_train_epoch_end")
        values = self._metrics.take_epoch("train")
        if self._epoch_loss_steps:
            values["train/loss_epoch"] = (self._take_loss_sum(1), float(self._epoch_loss_steps), "mean")
        self._epoch_loss_steps = 0
        metrics = fdist.reduce_across_ranks(values)
        if metrics:
            self._emit(metrics, self.global_step)
        if self.scheduler is not None and self._sched_interval == "epoch" \
                and (self.epoch + 1) % self._sched_frequency == 0:
            self._step_scheduler()
        self.epoch += 1
        self._batches_in_epoch = 0
        if self._val_loader is not None and cfg.val_every_n_steps is None:
            self._validate_in_fit()
        if cfg.checkpoint_dir is not None:
            self._save()

    # Evaluation ---------------------------------------------------------------------------

    def _validate_in_fit(self) -> Dict[str, float]:
        metrics = self._evaluate(self._val_loader, self.config.limit_val_batches)
        self._emit(metrics, self.global_step)
        return metrics

    def _eval_module(self) -> nn.Module:
        # DDP's forward syncs buffers (a collective) and ranks may hold unequal shares of
        # evaluation data, so evaluation bypasses it; FSDP needs its root's forward.
        return self._engine if self._strategy == "fsdp" else self._dispatch

    def _ema_context(self):
        if self.ema is not None and self.config.ema_eval:
            return self.ema.swap(self.model)
        return contextlib.nullcontext()

    def _evaluate(self, loader: Any, limit: Optional[int]) -> Dict[str, float]:
        module = self._eval_module()
        data = eval_loader(loader, rank=self.rank, world_size=self.world_size, pad=self._strategy == "fsdp")
        was_training = self.model.training
        module.eval()
        has_step = callable(getattr(self.model, "validation_step", None))
        if not has_step:
            raise TypeError(f"model: {type(self.model).__name__} has no validation_step() method")
        try:
            with self._metrics.active("val"), torch.no_grad(), self._ema_context():
                self._call_hook("on_validation_epoch_start")
                for i, batch in enumerate(data):
                    if limit is not None and i >= limit:
                        break
                    batch = transfer_to_device(batch, self.device)
                    with self._autocast():
                        out = module("val", batch, i)
                    loss = _extract_loss(out, "validation_step") if isinstance(out, (torch.Tensor, Mapping)) \
                        and (not isinstance(out, Mapping) or "loss" in out) else None
                    if loss is not None:
                        log("val/loss", loss, batch_size=batch_size_of(batch))
                self._call_hook("on_validation_epoch_end")
        finally:
            if was_training:
                self.model.train()
        return fdist.reduce_across_ranks(self._metrics.take_epoch("val"))

    def validate(self, model: nn.Module, loader: Any) -> Dict[str, float]:
        """Run ``validation_step`` over ``loader`` (EMA weights when on); return the metrics."""
        self._setup_runtime()
        if self.model is not model:
            self._attach(model)
        metrics = self._evaluate(loader, self.config.limit_val_batches)
        self.callback_metrics.update(metrics)
        return metrics

    def predict(self, model: nn.Module, loader: Any, writer: Any = None) -> Optional[List[Any]]:
        """Run ``predict_step`` (or ``model(batch)``) over ``loader``, EMA weights when on.

        With a ``writer`` (``write(prediction, batch)``), each prediction goes to it and
        nothing is returned; without, the predictions of this rank are returned as a list.
        Each rank predicts its share of the data.
        """
        check_writer(writer)
        self._setup_runtime()
        if self.model is not model:
            self._attach(model)
        module = self._eval_module()
        data = eval_loader(loader, rank=self.rank, world_size=self.world_size, pad=self._strategy == "fsdp")
        was_training = self.model.training
        module.eval()
        results: List[Any] = []
        if writer is not None:
            writer_setup(writer, self)
        try:
            with self._metrics.active("predict"), torch.no_grad(), self._ema_context():
                for i, batch in enumerate(data):
                    batch = transfer_to_device(batch, self.device)
                    with self._autocast():
                        out = module("predict", batch, i)
                    if writer is not None:
                        writer_write(writer, out, batch, i, self, self.model)
                    else:
                        results.append(out)
        finally:
            if was_training:
                self.model.train()
            if writer is not None:
                writer_close(writer, self, self.model)
        return None if writer is not None else results

    # Checkpoints --------------------------------------------------------------------------

    def _model_state(self) -> Dict[str, torch.Tensor]:
        if self._strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _optimizer_state(self) -> Dict[str, Any]:
        if self._strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _data_position(self) -> Dict[str, int]:
        per_batch = self._train_data.samples_per_batch_all_ranks()
        return {
            "epoch": self.epoch,
            "batches": self._batches_in_epoch,
            "samples": -1 if per_batch is None else self._batches_in_epoch * per_batch,
            "world_size": self.world_size,
        }

    def _checkpoint_parts(self) -> Dict[str, Any]:
        """Everything a checkpoint holds; collectives run on every rank, the dict on rank 0."""
        model_state = self._model_state()
        optimizer_state = self._optimizer_state()
        ema_state = self.ema.state_dict() if self.ema is not None else None
        rng = fdist.gather_objects(capture_rng_state(self.device))
        hparams = getattr(self.model, "hparams", None)
        if hparams is not None:
            hparams = dict(hparams) if isinstance(hparams, Mapping) else None
            if hparams is not None and not _plain(hparams):
                logger.warning("model.hparams holds values safe loading cannot read; not saved in the checkpoint")
                hparams = None
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "torch_version": str(torch.__version__),
            "state_dict": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": ema_state,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "data": self._data_position(),
            "rng": rng,
            "counters": dict(self.counters),
            "config": self.config.to_dict(),
            "hyper_parameters": hparams,
            "world_size": self.world_size,
        }

    def _save(self, step_file: bool = False) -> None:
        parts = self._checkpoint_parts()
        self._last_saved_step = self.global_step
        if not self.is_main or self.checkpoints is None:
            return
        score = self.callback_metrics.get(self.config.monitor) if self.config.monitor else None

        def make_state(manager_state):
            state = dict(parts)
            state["checkpoints"] = manager_state
            self._call_hook("on_save_checkpoint", state)
            return state

        self.checkpoints.save(make_state, step=self.global_step, last=True, step_file=step_file, score=score)

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write the full training state to ``path`` (atomically; call on every rank)."""
        parts = self._checkpoint_parts()
        if self.is_main:
            parts["checkpoints"] = self.checkpoints.state_dict() if self.checkpoints else None
            self._call_hook("on_save_checkpoint", parts)
            atomic_save(parts, path)
        fdist.barrier()

    def _restore(self, path: Path) -> None:
        ckpt = read_checkpoint(path, map_location="cpu")
        if ckpt.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: not a foldops training checkpoint (format {ckpt.get('format')!r}); to start from the "
                f"weights of a Lightning or other checkpoint, call foldops.compat.load_checkpoint(path, model) "
                f"before fit() and do not pass resume="
            )
        self._call_hook("on_load_checkpoint", ckpt)
        model_state = ckpt["state_dict"]
        check_state_dict(self.model.state_dict(), model_state, strict=True, source=f"checkpoint {path.name}")
        try:
            if self._strategy == "fsdp":
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.model, model_state, options=opts)
                set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"], options=opts)
            else:
                self.model.load_state_dict(model_state)
                self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model's optimizer: {exc}") from exc
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            elif self.is_main:
                logger.warning("%s has no EMA state: the average restarts from the loaded weights", path)
        self.global_step = int(ckpt["global_step"])
        self.epoch = int(ckpt["epoch"])
        self.counters.update({k: int(v) for k, v in ckpt.get("counters", {}).items()})
        data = ckpt["data"]
        self._batches_in_epoch = self._train_data.resumed_skip(int(data["samples"]), int(data["batches"]))
        if self.checkpoints is not None and ckpt.get("checkpoints"):
            self.checkpoints.load_state_dict(ckpt["checkpoints"])
        self._last_saved_step = self.global_step
        rng = ckpt["rng"]
        if len(rng) == self.world_size:
            restore_rng_state(rng[self.rank], self.device)
        else:
            # Another process count: the data order continues exactly, the random streams
            # cannot; each rank gets a fresh, distinct one.
            restore_rng_state(rng[self.rank % len(rng)], self.device)
            if self.rank >= len(rng):
                seed_everything(((self.config.seed or 0) + self.rank + 7919 * self.global_step) % (2**32 - 1))
        if self.is_main:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.global_step, self.epoch,
                        self._batches_in_epoch)
