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

:meth:`Trainer.train_step` is one optimizer step, top to bottom; :meth:`Trainer.fit` loops
over epochs and accumulation windows around it and validates and checkpoints when due.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Sized, Union

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
from foldops.train.loggers import Logger, flush_logger, make_loggers, truncate_logger
from foldops.train.metrics import MetricStore, log
from foldops.train.predict import check_writer, writer_close, writer_setup, writer_write
from foldops.train.progress import ProgressBar
from foldops.train.step import (
    AccumulationWindow,
    Gradients,
    LRSchedule,
    StepMeters,
    extract_loss,
    is_nonfinite,
    parse_optimizers,
)

logger = logging.getLogger("foldops.train")

ResumeArg = Union[None, str, os.PathLike]
_NULL_CONTEXT = contextlib.nullcontext()
_AMP_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
_END = object()


def _plain(obj: Any) -> bool:
    """Only types that weights_only loading accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    return False


def _refuse_loss(loss: torch.Tensor) -> None:
    what = (f"a {loss.dtype} tensor" if not loss.is_floating_point()
            else "a tensor detached from the autograd graph (requires_grad=False)")
    error = TypeError if not loss.is_floating_point() else ValueError
    raise error(
        f"training_step: the loss must be a floating-point tensor attached to the autograd graph of the "
        f"model's parameters, got {what}. Compute it from the model's outputs without .detach(), .item(), "
        f"torch.no_grad() or an integer cast; return None to skip a batch."
    )


def _qualified_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _optimizer_differences(optimizer: torch.optim.Optimizer, saved: Any, saved_class: Optional[str]) -> List[str]:
    """What keeps a saved optimizer state from fitting ``optimizer`` (empty: it fits)."""
    problems = []
    ours = _qualified_name(optimizer)
    if saved_class is not None and saved_class != ours:
        problems.append(f"the checkpoint's optimizer is {saved_class}, this run's is {ours}")
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        return problems + ["the checkpoint's optimizer state has no parameter groups"]
    if len(groups) != len(optimizer.param_groups):
        problems.append(f"{len(groups)} parameter group(s) in the checkpoint, {len(optimizer.param_groups)} here")
    else:
        for i, (theirs, mine) in enumerate(zip(groups, optimizer.param_groups)):
            if len(theirs["params"]) != len(mine["params"]):
                problems.append(f"parameter group {i} holds {len(theirs['params'])} tensors in the checkpoint, "
                                f"{len(mine['params'])} here")
    if saved_class is None and groups:
        # Files without the class name: the option names tell optimizers apart. A newer torch
        # may add options (filled with defaults on load), so only a difference both ways counts.
        ignored = {"params", "param_names", "initial_lr"}
        missing = sorted(set(optimizer.defaults) - set(groups[0]) - ignored)
        extra = sorted(set(groups[0]) - set(optimizer.defaults) - ignored)
        if missing and extra:
            problems.append(f"the checkpoint's optimizer has options {extra} that {ours} lacks, and lacks "
                            f"{missing}: another optimizer type")
    return problems


class _Loop:
    """Where the fit loop is within the data, and what it has decided (one per ``fit``)."""

    __slots__ = ("batches_in_epoch", "epoch_exhausted", "stop", "last_saved_step", "consecutive_ooms",
                 "row_step", "rows_at_step")

    def __init__(self) -> None:
        self.batches_in_epoch = 0  # batches drawn this epoch (the data position a checkpoint stores)
        self.epoch_exhausted = False  # the epoch's iterator has ended
        self.stop = False  # max_steps reached
        self.last_saved_step = -1
        self.consecutive_ooms = 0
        # Metric rows written at step row_step so far: a checkpoint stores the count, and a
        # resumed run drops that step's later rows (written after the checkpoint).
        self.row_step = -1
        self.rows_at_step: Optional[int] = 0


class _WindowBatches:
    """Up to ``size`` batches drawn from an epoch's iterator, counted into the loop's position."""

    __slots__ = ("batches", "size", "loop")

    def __init__(self, batches: Iterator[Any], size: int, loop: _Loop) -> None:
        self.batches, self.size, self.loop = batches, size, loop

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.size):
            batch = next(self.batches, _END)
            if batch is _END:
                self.loop.epoch_exhausted = True
                return
            self.loop.batches_in_epoch += 1
            yield batch


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
        # What the user reads: progress, counters, the last metrics, the objects driven.
        self.global_step = 0
        self.epoch = 0
        self.counters: Dict[str, int] = {"skipped_nonfinite": 0, "oom_batches": 0, "null_loss_batches": 0}
        self.callback_metrics: Dict[str, float] = {}
        self.model: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scaler: Optional[torch.amp.GradScaler] = None
        self.ema: Optional[EMA] = None
        self.checkpoints: Optional[CheckpointManager] = None
        self.device: Optional[torch.device] = None
        # Placement: the process group, the wrapped model and how its steps are called.
        self._ctx: Optional[fdist.DistContext] = None
        self._strategy = "single"
        self._dispatch: Optional[fdist.StepDispatch] = None
        self._engine: Optional[nn.Module] = None
        self._train_fn = None
        # One optimizer step's helpers (see foldops.train.step) and the loop's state.
        self._schedule = LRSchedule(None, "epoch", 1, None)
        self._grads: Optional[Gradients] = None
        self._window = AccumulationWindow()
        self._meters = StepMeters()
        self._loop = _Loop()
        self._train_data: Optional[EpochData] = None
        self._val_loader: Any = None
        # Output.
        self._metrics = MetricStore()
        self._extra_loggers = list(loggers)
        self._loggers: List[Logger] = []
        self._progress: Optional[ProgressBar] = None

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
    def scheduler(self) -> Any:
        """The learning-rate scheduler from ``configure_optimizers`` (``None`` if none)."""
        return self._schedule.scheduler

    @property
    def best_model_path(self) -> Optional[Path]:
        return self.checkpoints.best_path if self.checkpoints else None

    @property
    def last_checkpoint_path(self) -> Optional[Path]:
        return Path(self.config.checkpointing.checkpoint_dir) / "last.ckpt" if self.config.checkpointing.checkpoint_dir else None

    @property
    def _fast_norm(self) -> bool:
        return self._grads is not None and self._grads.fast

    # Set-up -------------------------------------------------------------------------------

    def _setup_runtime(self) -> None:
        if self._ctx is None:
            dist_cfg = self.config.distributed
            self._ctx, self.device = fdist.setup(self.config.run.device, dist_cfg.dist_timeout_s, dist_cfg.strategy)
            strategy = dist_cfg.strategy
            if strategy == "auto":
                strategy = "ddp" if self._ctx.enabled else "single"
            self._strategy = strategy

    def _autocast(self):
        dtype = _AMP_DTYPES.get(self.config.numerics.precision)
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
            self._engine = fdist.wrap_ddp(self._dispatch, self.device, self.config.distributed.find_unused_parameters)
        elif self._strategy == "fsdp":
            self._engine = fdist.apply_fsdp(self._dispatch, self.config.distributed.fsdp_blocks, None, self.device)
        else:
            self._engine = self._dispatch
        self.optimizer = None
        self.ema = None

    def _resolve_resume(self, resume: ResumeArg) -> Optional[Path]:
        if resume is None:
            return None
        if isinstance(resume, str) and resume == "last":
            if self.config.checkpointing.checkpoint_dir is None:
                raise ValueError("resume: 'last' needs config.checkpoint_dir to be set")
            path = Path(self.config.checkpointing.checkpoint_dir) / "last.ckpt"
            if not path.exists():
                # A first run has nothing to resume; a run whose last checkpoint is gone must
                # not silently start over (and overwrite its step files).
                if path.is_symlink():
                    raise CheckpointError(
                        f"resume: 'last' is {str(path)!r}, a link to {os.readlink(path)!r}, which does not exist; "
                        f"pass the checkpoint to continue from as resume=PATH, or resume=None to start over"
                    )
                others = sorted(p.name for p in path.parent.glob("*.ckpt")) if path.parent.is_dir() else []
                if others:
                    shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                    raise CheckpointError(
                        f"resume: 'last' found no {str(path)!r}, but the directory holds {len(others)} other "
                        f"checkpoint(s) ({shown}): pass the one to continue from as resume=PATH, or resume=None "
                        f"to start over"
                    )
                if self.is_main:
                    logger.info("resume='last': no %s yet, starting from scratch", path)
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

    def fit(self, model: nn.Module, train_loader: Any, val_loader: Any = None, resume: ResumeArg = None, *,
            trust_checkpoint: bool = False, safe_globals: Sequence[Any] = ()) -> None:
        """Train ``model`` until ``max_steps`` or ``max_epochs``.

        Args:
            model: an ``nn.Module`` with ``training_step`` and ``configure_optimizers``.
            train_loader: a ``DataLoader`` (rebuilt around a resumable, rank-sharded sampler)
                or any iterable of batches.
            val_loader: optional validation data.
            resume: ``None`` (fresh start), ``"last"`` (``checkpoint_dir/last.ckpt`` if it
                exists, else a fresh start) or a checkpoint path.
            trust_checkpoint: read the resumed checkpoint with full unpickling, which can run
                code from the file (only for files you trust); by default it is read with
                ``torch.load(weights_only=True)``, which refuses python objects (an
                ``argparse.Namespace`` that ``on_save_checkpoint`` stored, say).
            safe_globals: classes to allow in the resumed checkpoint beside the default
                allow-list (as for :func:`foldops.compat.load_checkpoint`).
        """
        if not isinstance(trust_checkpoint, bool):
            raise TypeError(f"trust_checkpoint: expected a bool, got {type(trust_checkpoint).__name__}")
        if isinstance(safe_globals, (str, bytes)) or not isinstance(safe_globals, (list, tuple)):
            raise TypeError(f"safe_globals: expected a list or tuple of classes, got {type(safe_globals).__name__}")
        cfg = self.config
        for name in ("training_step", "configure_optimizers") + (("validation_step",) if val_loader is not None else ()):
            if not callable(getattr(model, name, None)):
                raise TypeError(f"model: {type(model).__name__} has no {name}() method"
                                + (" (needed with a val_loader)" if name == "validation_step" else ""))
        self._setup_runtime()
        resume_path = self._resolve_resume(resume)
        if cfg.run.seed is not None:
            seed_everything(cfg.run.seed + self.rank)
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self._attach(model)
        # DDP and FSDP hook the wrapper's __call__ (FSDP2 shards the dispatcher in place, so
        # the engine may be the dispatcher itself: its root hooks unshard the parameters the
        # blocks do not own); a single process calls the step directly, without the
        # module-call machinery on every batch.
        self._train_fn = model.training_step if self._strategy == "single" \
            else functools.partial(self._engine, "train")
        self.global_step = 0
        self.epoch = 0
        self.counters = {k: 0 for k in self.counters}
        self._loop = _Loop()
        self._window = AccumulationWindow()
        self._meters = StepMeters()

        self.optimizer, self._schedule = parse_optimizers(model.configure_optimizers())
        self.optimizer.zero_grad(set_to_none=True)  # gradients left by code before fit are not ours
        self._grads = Gradients(self.optimizer, self.device, sharded=self._strategy == "fsdp")
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.numerics.precision == "fp16-mixed" else None
        if cfg.ema.ema_decay is not None:
            self.ema = EMA(model, cfg.ema.ema_decay, warmup=cfg.ema.ema_warmup)
        self.checkpoints = None
        ck = cfg.checkpointing
        if ck.checkpoint_dir is not None and self.is_main:
            remove_stale_temporaries(ck.checkpoint_dir)
            self.checkpoints = CheckpointManager(ck.checkpoint_dir, save_top_k=ck.save_top_k, monitor=ck.monitor,
                                                 mode=ck.monitor_mode, keep_step=ck.keep_step_checkpoints)
        self._train_data = EpochData(train_loader, seed=cfg.run.seed or 0, rank=self.rank,
                                     world_size=self.world_size, train=True)
        self._val_loader = val_loader
        if resume_path is not None:
            self._restore(resume_path, trust_checkpoint=trust_checkpoint, safe_globals=safe_globals)

        self._open_loggers(resumed=resume_path is not None)
        self._progress = ProgressBar(self._total_steps(), enabled=cfg.logging.progress_bar and self.is_main)
        self._progress.start(self.global_step)
        try:
            self._call_hook("on_fit_start")
            self._fit_loop()
            if ck.checkpoint_dir is not None and self._loop.last_saved_step != self.global_step:
                self._save()
            self._call_hook("on_fit_end")
            fdist.barrier()
        finally:
            self._progress.close()
            for lg in self._loggers:
                lg.close()
            if cfg.run.deterministic and not deterministic_before:
                torch.use_deterministic_algorithms(False)

    def _total_steps(self) -> Optional[int]:
        cfg = self.config
        if cfg.run.max_steps is not None:
            return cfg.run.max_steps
        n = self._train_data.num_batches(0)
        if n is None:
            return None
        return cfg.run.max_epochs * math.ceil(n / cfg.optim.accumulate_grad_batches)

    def _open_loggers(self, resumed: bool) -> None:
        cfg = self.config
        self._loggers = []
        if not self.is_main:
            return
        log_dir = cfg.logging.log_dir or cfg.checkpointing.checkpoint_dir
        self._loggers = make_loggers(cfg.logging.loggers, log_dir, cfg.logging.run_name, cfg.to_dict()) \
            + self._extra_loggers
        for lg in self._loggers:
            if resumed:
                truncate_logger(lg, self.global_step, self._loop.rows_at_step)
            else:
                lg.log_hyperparams(cfg.to_dict())

    def _done(self) -> bool:
        run = self.config.run
        if run.max_steps is not None and self.global_step >= run.max_steps:
            return True
        return run.max_epochs is not None and self.epoch >= run.max_epochs

    def _fit_loop(self) -> None:
        """Epochs of accumulation windows; validation and checkpoints when due."""
        loop = self._loop
        self._engine.train()
        while not self._done():
            n_epoch = self._train_data.num_batches(self.epoch)
            batches = self._train_data.epoch_iter(self.epoch, loop.batches_in_epoch)
            start_batches = loop.batches_in_epoch
            loop.epoch_exhausted = False
            self._call_hook("on_train_epoch_start")
            with self._metrics.active("train"):
                while not loop.epoch_exhausted:
                    if self.train_step(self._micro_batches(batches, n_epoch)):
                        self._after_step()
                        if loop.stop:
                            break
            exhausted = loop.epoch_exhausted or (n_epoch is not None and loop.batches_in_epoch >= n_epoch)
            if exhausted:
                if loop.batches_in_epoch == 0 and start_batches == 0:
                    raise ValueError("train_loader: yielded no batches in an epoch")
                self._end_epoch()
            if loop.stop:
                break

    def _micro_batches(self, batches: Iterator[Any], n_epoch: Optional[int]) -> "_WindowBatches":
        """The next accumulation window, drawn lazily from the epoch's iterator ``batches``.

        It holds ``accumulate_grad_batches`` batches, fewer at the end of a sized epoch; an
        unsized epoch that ends mid-window ends the window there.
        """
        accum = self.config.optim.accumulate_grad_batches
        remaining = None if n_epoch is None else n_epoch - self._loop.batches_in_epoch
        return _WindowBatches(batches, accum if remaining is None or remaining <= 0 else min(accum, remaining),
                              self._loop)

    def train_step(self, micro_batches: Sized) -> bool:
        """One optimizer step over one accumulation window; False if nothing was stepped.

        In order: forward and backward of each micro-batch (gradients synchronised across
        ranks on the last one only), unscale (fp16), one gradient norm (serves the
        non-finite check, clipping and the log), skip the step if the loss or the norm is
        not finite, clip, optimizer step, release the gradients, scheduler step, EMA
        update, per-step metrics and the progress bar. Gradients are released (set to
        ``None``) right after the step rather than before the next one, so that
        validation, checkpointing and data loading in between do not hold them.

        ``micro_batches`` is the window: ``len()`` batches are planned (each loss is divided
        by that), iteration may end earlier. Returns False, without stepping, when the
        window had no batch (the epoch ended) or one of its batches ran out of memory (the
        window is dropped).
        """
        cfg = self.config
        opt, window = self.optimizer, self._window
        window.reset(len(micro_batches))

        # 1. Forward and backward over the window.
        for batch in micro_batches:
            window.count += 1
            n = batch_size_of(batch)
            if n:
                self._meters.interval_samples += n * self.world_size
                self._progress.add_samples(n * self.world_size)
            last = window.count >= window.size  # gradients are synchronised on this one
            if not self._forward_backward(transfer_to_device(batch, self.device), sync=last):
                self._recover_from_oom()
                return False
        if window.count == 0:
            return False

        # 2. Gradient norm and the non-finite check.
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        clip = cfg.optim.gradient_clip_val
        clip_by_norm = clip is not None and cfg.optim.gradient_clip_algorithm == "norm"
        norm = None
        if cfg.optim.skip_nonfinite or clip_by_norm or self._log_due(self.global_step + 1):
            norm = self._grads.norm()
        skip = cfg.optim.skip_nonfinite and is_nonfinite(norm, window.loss_sum, self._ctx.enabled)

        # 3. Clip and step (or count the skipped step).
        if skip:
            self.counters["skipped_nonfinite"] += 1
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale, as a skipped fp16 step should
            if self.is_main:
                logger.warning("non-finite loss or gradient at step %d: optimizer step skipped (%d so far)",
                               self.global_step, self.counters["skipped_nonfinite"])
        else:
            if clip is not None:
                self._grads.clip(clip, cfg.optim.gradient_clip_algorithm, norm)
            if self.scaler is not None:
                self.scaler.step(opt)
                self.scaler.update()
            else:
                opt.step()
            self._schedule.stepped_once = True

        # 4. Release the gradients.
        opt.zero_grad(set_to_none=True)
        self.global_step += 1

        # 5. Schedule (per-step schedulers; per-epoch ones at epoch ends).
        self._schedule.after_optimizer_step(self.global_step, self.callback_metrics, cfg.checkpointing.monitor)

        # 6. EMA.
        if self.ema is not None and not skip:
            self.ema.update(self.model)

        # 7. Log.
        loss = window.mean_loss()
        self._meters.add_step(loss, norm)
        if self._log_due(self.global_step):
            self._write_step_metrics()
        self._progress.update(self.global_step, self.epoch, loss=loss)
        return True

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

    def _forward_backward(self, batch: Any, sync: bool) -> bool:
        """One micro-batch's forward and backward; False when it ran out of memory."""
        window = self._window
        oom = False
        try:
            with self._no_sync(sync):
                with self._autocast():
                    out = self._train_fn(batch, self.global_step)
                loss = extract_loss(out, "training_step")
                if loss is None:
                    if self._ctx.enabled:
                        raise ValueError("training_step: returned None under DDP/FSDP, where every rank must "
                                         "run backward; return a zero loss instead")
                    self.counters["null_loss_batches"] += 1
                    return True
                if not loss.requires_grad:
                    _refuse_loss(loss)
                window.add_loss(loss)
                scaled = loss / window.size if window.size > 1 else loss
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            self._loop.consecutive_ooms = 0
            return True
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
        return not oom

    def _recover_from_oom(self) -> None:
        """Drop the window's gradients, free memory, count; stop after too many in a row."""
        limit = self.config.run.max_consecutive_ooms
        self.optimizer.zero_grad(set_to_none=True)
        self._window.reset(1)
        gc.collect()
        fdevice.empty_cache(self.device)
        self.counters["oom_batches"] += 1
        self._loop.consecutive_ooms += 1
        logger.warning("out of memory at step %d (epoch %d, batch %d): batch skipped, gradient window dropped "
                       "(%d OOM batches so far)", self.global_step, self.epoch, self._loop.batches_in_epoch,
                       self.counters["oom_batches"])
        self._emit({"train/oom_batches": float(self.counters["oom_batches"])}, self.global_step)
        if self._loop.consecutive_ooms >= limit:
            raise RuntimeError(
                f"out of memory in {self._loop.consecutive_ooms} consecutive training batches "
                f"(max_consecutive_ooms={limit}); stopping. Reduce the batch or crop "
                f"size, use bf16-mixed precision, or enable activation checkpointing "
                f"(foldops.compat.checkpoint_wrapper)."
            )

    def _log_due(self, step: int) -> bool:
        run = self.config.run
        return step % self.config.logging.log_every_n_steps == 0 or (run.max_steps is not None
                                                                      and step >= run.max_steps)

    def _after_step(self) -> None:
        """Validation and checkpoints when due; stop at ``max_steps``."""
        cfg = self.config
        step = self.global_step
        validated = False
        every = cfg.run.val_every_n_steps
        if self._val_loader is not None and every is not None and step % every == 0:
            self._validate_in_fit()
            validated = True
        ck = cfg.checkpointing
        step_file = ck.checkpoint_every_n_steps is not None and step % ck.checkpoint_every_n_steps == 0
        if ck.checkpoint_dir is not None and (step_file or (validated and ck.monitor is not None)):
            self._save(step_file=step_file)
        if cfg.run.max_steps is not None and step >= cfg.run.max_steps:
            self._loop.stop = True

    def _write_step_metrics(self) -> None:
        values = self._metrics.take_step()
        elapsed, steps, samples = self._meters.take_interval(values)
        metrics = fdist.reduce_across_ranks(values)
        if elapsed > 0 and steps:
            metrics["train/steps_per_s"] = steps / elapsed
            if samples:
                metrics["train/samples_per_s"] = samples / elapsed
        if self._meters.last_norm is not None:
            metrics["train/grad_norm"] = float(self._meters.last_norm.item())
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["epoch"] = float(self.epoch)
        metrics["train/skipped_nonfinite"] = float(self.counters["skipped_nonfinite"])
        metrics["train/oom_batches"] = float(self.counters["oom_batches"])
        if self.scaler is not None:
            metrics["train/loss_scale"] = float(self.scaler.get_scale())
        self._emit(metrics, self.global_step)

    def _emit(self, metrics: Dict[str, float], step: int) -> None:
        loop = self._loop
        if loop.row_step == step:
            loop.rows_at_step = (loop.rows_at_step or 0) + 1
        else:
            loop.row_step, loop.rows_at_step = step, 1
        self.callback_metrics.update(metrics)
        if self.is_main:
            for lg in self._loggers:
                lg.log_metrics(dict(metrics), step)

    def _end_epoch(self) -> None:
        cfg = self.config
        with self._metrics.active("train"):
            self._call_hook("on_train_epoch_end")
        values = self._metrics.take_epoch("train")
        self._meters.take_epoch(values)
        metrics = fdist.reduce_across_ranks(values)
        if metrics:
            self._emit(metrics, self.global_step)
        self._schedule.after_epoch(self.epoch, self.callback_metrics, cfg.checkpointing.monitor)
        self.epoch += 1
        self._loop.batches_in_epoch = 0
        if self._val_loader is not None and cfg.run.val_every_n_steps is None:
            self._validate_in_fit()
        if cfg.checkpointing.checkpoint_dir is not None:
            self._save()

    # Evaluation ---------------------------------------------------------------------------

    def _validate_in_fit(self) -> Dict[str, float]:
        metrics = self._evaluate(self._val_loader, self.config.run.limit_val_batches)
        self._emit(metrics, self.global_step)
        return metrics

    def _eval_module(self) -> nn.Module:
        # DDP's forward syncs buffers (a collective) and ranks may hold unequal shares of
        # evaluation data, so evaluation bypasses it; FSDP needs its root's forward.
        return self._engine if self._strategy == "fsdp" else self._dispatch

    def _ema_context(self):
        if self.ema is not None and self.config.ema.ema_eval:
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
                    loss = extract_loss(out, "validation_step") if isinstance(out, (torch.Tensor, Mapping)) \
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
        metrics = self._evaluate(loader, self.config.run.limit_val_batches)
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
            "batches": self._loop.batches_in_epoch,
            "samples": -1 if per_batch is None else self._loop.batches_in_epoch * per_batch,
            "world_size": self.world_size,
        }

    def _checkpoint_parts(self) -> Dict[str, Any]:
        """Everything a checkpoint holds; collectives run on every rank, the dict on rank 0."""
        model_state = self._model_state()
        optimizer_state = self._optimizer_state()
        ema_state = self.ema.state_dict() if self.ema is not None else None
        rng = fdist.gather_objects(capture_rng_state(self.device))
        # Per rank: the open logging interval and epoch, so a resumed run writes the same rows.
        log_state = fdist.gather_objects({"meters": self._meters.state_dict(), "metrics": self._metrics.state_dict()})
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
            "optimizer_class": _qualified_name(self.optimizer),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": ema_state,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "data": self._data_position(),
            "rng": rng,
            "log_state": log_state,
            "log_rows_at_step": self._loop.rows_at_step if self._loop.row_step == self.global_step else 0,
            "counters": dict(self.counters),
            "config": self.config.to_dict(),
            "hyper_parameters": hparams,
            "world_size": self.world_size,
        }

    def _flush_loggers(self) -> None:
        """Before a checkpoint is written: the metric files then hold every row it accounts for."""
        for lg in self._loggers:
            flush_logger(lg)

    def _save(self, step_file: bool = False) -> None:
        self._flush_loggers()
        parts = self._checkpoint_parts()
        self._loop.last_saved_step = self.global_step
        if not self.is_main or self.checkpoints is None:
            return
        score = self.callback_metrics.get(self.config.checkpointing.monitor) if self.config.checkpointing.monitor else None

        def make_state(manager_state):
            state = dict(parts)
            state["checkpoints"] = manager_state
            self._call_hook("on_save_checkpoint", state)
            return state

        self.checkpoints.save(make_state, step=self.global_step, last=True, step_file=step_file, score=score)

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write the full training state to ``path`` (atomically; call on every rank)."""
        self._flush_loggers()
        parts = self._checkpoint_parts()
        if self.is_main:
            parts["checkpoints"] = self.checkpoints.state_dict() if self.checkpoints else None
            self._call_hook("on_save_checkpoint", parts)
            atomic_save(parts, path)
        fdist.barrier()

    def _restore(self, path: Path, trust_checkpoint: bool = False, safe_globals: Sequence[Any] = ()) -> None:
        ckpt = read_checkpoint(path, map_location="cpu", trust_checkpoint=trust_checkpoint,
                               safe_globals=safe_globals)
        if ckpt.get("format") != FORMAT:
            raise CheckpointError(
                f"{path}: not a foldops training checkpoint (format {ckpt.get('format')!r}); to start from the "
                f"weights of a Lightning or other checkpoint, call foldops.compat.load_checkpoint(path, model) "
                f"before fit() and do not pass resume="
            )
        self._call_hook("on_load_checkpoint", ckpt)
        model_state = ckpt["state_dict"]
        check_state_dict(self.model.state_dict(), model_state, strict=True, source=f"checkpoint {path.name}")
        problems = _optimizer_differences(self.optimizer, ckpt.get("optimizer"), ckpt.get("optimizer_class"))
        if problems:
            raise CheckpointError(f"{path}: the optimizer state does not fit this run's optimizer: "
                                  + "; ".join(problems) + ". Resume with the optimizer the checkpoint was trained "
                                  "with, or load only the weights with foldops.compat.load_checkpoint(path, model)")
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
        self._loop.batches_in_epoch = self._train_data.resumed_skip(int(data["samples"]), int(data["batches"]))
        if self.checkpoints is not None and ckpt.get("checkpoints"):
            self.checkpoints.load_state_dict(ckpt["checkpoints"])
        self._loop.last_saved_step = self.global_step
        self._loop.row_step = self.global_step
        self._loop.rows_at_step = ckpt.get("log_rows_at_step")  # None (older files): keep the step's rows
        log_state = ckpt.get("log_state")
        if log_state is not None and len(log_state) == self.world_size:
            self._meters.load_state_dict(log_state[self.rank]["meters"], self.device)
            self._metrics.load_state_dict(log_state[self.rank]["metrics"])
        rng = ckpt["rng"]
        if len(rng) == self.world_size:
            restore_rng_state(rng[self.rank], self.device)
        else:
            # Another process count: the data order continues exactly, the random streams
            # cannot; each rank gets a fresh, distinct one.
            restore_rng_state(rng[self.rank % len(rng)], self.device)
            if self.rank >= len(rng):
                seed_everything(((self.config.run.seed or 0) + self.rank + 7919 * self.global_step) % (2**32 - 1))
        if self.is_main:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.global_step, self.epoch,
                        self._loop.batches_in_epoch)
