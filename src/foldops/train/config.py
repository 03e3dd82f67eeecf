"""TrainerConfig: every knob of the Trainer, typed, checked, and stored in checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
# Lightning's spellings, so that a Lightning config ports unchanged.
_PRECISION_ALIASES = {
    "32": "fp32",
    "32-true": "fp32",
    "fp32": "fp32",
    "bf16": "bf16-mixed",
    "bf16-mixed": "bf16-mixed",
    "16": "fp16-mixed",
    "16-mixed": "fp16-mixed",
    "fp16": "fp16-mixed",
    "fp16-mixed": "fp16-mixed",
}
STRATEGIES = ("auto", "single", "ddp", "fsdp")
LOGGERS = ("jsonl", "csv", "tensorboard", "wandb")


@dataclass
class TrainerConfig:
    """Configuration of :class:`foldops.train.Trainer`.

    Training length (at least one of the two must be set):
        max_steps: stop after this many optimizer steps (``None``: no step limit).
        max_epochs: stop after this many passes over the training data (``None``: no limit).

    Numerics:
        precision: ``"fp32"``, ``"bf16-mixed"`` or ``"fp16-mixed"`` (autocast on the training
            device; fp16 adds a gradient scaler). Lightning's ``"32"``, ``"16-mixed"``,
            ``"bf16-mixed"`` are accepted.
        accumulate_grad_batches: micro-batches per optimizer step. Under DDP gradients are
            synchronised only on the last micro-batch of each window.
        gradient_clip_val: clip threshold, or ``None`` for no clipping.
        gradient_clip_algorithm: ``"norm"`` (total 2-norm) or ``"value"`` (element-wise).
        skip_nonfinite: skip (and count) an optimizer step whose loss or gradient norm is not
            finite. Costs one foreach norm over the gradients and one host read per step; the
            same norm serves clipping and the logged ``train/grad_norm`` (which, with this off
            and no norm clipping, is computed on logging steps only).

    Validation:
        val_every_n_steps: validate every this many optimizer steps; ``None``: at the end of
            each epoch.
        limit_val_batches: at most this many validation batches per run (``None``: all).

    Checkpoints (all written atomically; see ``foldops.train.checkpointing``):
        checkpoint_dir: directory for ``last.ckpt``, step and top-k checkpoints; ``None``: no
            checkpoints.
        checkpoint_every_n_steps: write ``step=NNNNNNNN.ckpt`` and refresh ``last.ckpt`` every
            this many steps (``None``: only at epoch ends and at the end of ``fit``).
        keep_step_checkpoints: keep only the newest this many step checkpoints (``None``: all).
        save_top_k: keep the k best checkpoints by ``monitor`` (``-1``: all, ``0``: none).
        monitor: metric name ranked for top-k, e.g. ``"val/loss"``; ``None``: no top-k.
        monitor_mode: ``"min"`` or ``"max"``.

    EMA:
        ema_decay: decay of an exponential moving average of the weights; ``None``: off.
        ema_warmup: use ``min(decay, (1 + n) / (10 + n))`` after n updates (as Boltz does).
        ema_eval: validate and predict with the EMA weights when EMA is on.

    Reproducibility and placement:
        seed: seed of python, numpy and torch (plus the rank) and of the data order;
            ``None``: do not seed (the data order then uses 0).
        device: ``"auto"`` or a device string; under torchrun the local rank picks the index.
        deterministic: ``torch.use_deterministic_algorithms(True)`` during fit.

    Distributed:
        strategy: ``"auto"`` (DDP when started by torchrun with more than one process, else
            single), ``"single"``, ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard`` per block).
        fsdp_blocks: class names of the modules sharded one by one under ``"fsdp"``;
            ``None``: every child of every ``nn.ModuleList`` (the blocks of a stack).
        find_unused_parameters: passed to DDP (needed when some parameters get no gradient).
        dist_timeout_s: timeout of collective operations, seconds.

    Logging:
        log_dir: directory of the JSONL/CSV/TensorBoard logs; ``None``: ``checkpoint_dir``
            (or no file loggers when both are ``None``).
        loggers: built-in loggers by name: ``"jsonl"``, ``"csv"``, ``"tensorboard"``,
            ``"wandb"`` (the last two need their packages installed).
        log_every_n_steps: write per-step metrics every this many optimizer steps (values are
            averaged over the interval).
        progress_bar: show a progress bar on rank 0 (stderr).
        run_name: a name for the run (used by W&B and in the logs).

    Faults:
        max_consecutive_ooms: stop after this many out-of-memory batches in a row.
    """

    max_steps: Optional[int] = None
    max_epochs: Optional[int] = None

    precision: str = "fp32"
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"
    skip_nonfinite: bool = True

    val_every_n_steps: Optional[int] = None
    limit_val_batches: Optional[int] = None

    checkpoint_dir: Optional[str] = None
    checkpoint_every_n_steps: Optional[int] = None
    keep_step_checkpoints: Optional[int] = None
    save_top_k: int = 1
    monitor: Optional[str] = None
    monitor_mode: str = "min"

    ema_decay: Optional[float] = None
    ema_warmup: bool = True
    ema_eval: bool = True

    seed: Optional[int] = 0
    device: str = "auto"
    deterministic: bool = False

    strategy: str = "auto"
    fsdp_blocks: Optional[Tuple[str, ...]] = None
    find_unused_parameters: bool = False
    dist_timeout_s: float = 1800.0

    log_dir: Optional[str] = None
    loggers: Tuple[str, ...] = ("jsonl", "csv")
    log_every_n_steps: int = 10
    progress_bar: bool = True
    run_name: Optional[str] = None

    max_consecutive_ooms: int = 3

    def __post_init__(self) -> None:
        self.precision = _normalise_precision(self.precision)
        for name in ("max_steps", "max_epochs", "val_every_n_steps", "limit_val_batches",
                     "checkpoint_every_n_steps", "keep_step_checkpoints"):
            _positive_int_or_none(name, getattr(self, name))
        for name in ("accumulate_grad_batches", "log_every_n_steps", "max_consecutive_ooms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("max_steps / max_epochs: set at least one, got both None")
        if self.gradient_clip_val is not None:
            if isinstance(self.gradient_clip_val, bool) or not isinstance(self.gradient_clip_val, (int, float)) \
                    or not self.gradient_clip_val > 0:
                raise ValueError(f"gradient_clip_val: expected a number > 0 or None, got {self.gradient_clip_val!r}")
            self.gradient_clip_val = float(self.gradient_clip_val)
        _choice("gradient_clip_algorithm", self.gradient_clip_algorithm, ("norm", "value"))
        _choice("monitor_mode", self.monitor_mode, ("min", "max"))
        _choice("strategy", self.strategy, STRATEGIES)
        if isinstance(self.save_top_k, bool) or not isinstance(self.save_top_k, int) or self.save_top_k < -1:
            raise ValueError(f"save_top_k: expected an int >= -1, got {self.save_top_k!r}")
        if self.ema_decay is not None:
            if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                    or not 0.0 <= self.ema_decay <= 1.0:
                raise ValueError(f"ema_decay: expected a float in [0, 1] or None, got {self.ema_decay!r}")
            self.ema_decay = float(self.ema_decay)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(self.seed).__name__}")
        if not isinstance(self.device, str):
            raise TypeError(f"device: expected a string such as 'auto' or 'cpu', got {type(self.device).__name__}")
        if isinstance(self.loggers, str):
            self.loggers = (self.loggers,)
        self.loggers = tuple(self.loggers)
        for name in self.loggers:
            _choice("loggers", name, LOGGERS)
        if self.fsdp_blocks is not None:
            if isinstance(self.fsdp_blocks, str):
                self.fsdp_blocks = (self.fsdp_blocks,)
            self.fsdp_blocks = tuple(self.fsdp_blocks)
            if not all(isinstance(n, str) for n in self.fsdp_blocks):
                raise TypeError("fsdp_blocks: expected class names (strings)")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s: expected > 0, got {self.dist_timeout_s!r}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain python types only, so checkpoints load with ``weights_only=True``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainerConfig: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)


def _normalise_precision(value: object) -> str:
    key = str(value).lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if key not in _PRECISION_ALIASES:
        raise ValueError(f"precision: expected one of {PRECISIONS} (or Lightning's '32', '16-mixed'), got {value!r}")
    return _PRECISION_ALIASES[key]


def _positive_int_or_none(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")


def _choice(name: str, value: object, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
