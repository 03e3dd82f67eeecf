"""TrainerConfig: every knob of the Trainer, grouped by concern, typed, checked, stored in checkpoints.

Groups (each a small dataclass that checks its own fields):

- ``run``: how long and where: steps, epochs, validation cadence, seed, device, OOM limit;
- ``numerics``: precision (autocast, gradient scaling);
- ``optim``: what happens to the gradients: accumulation, clipping, non-finite steps;
- ``ema``: the moving average of the weights;
- ``checkpointing``: which training-state files are written and kept;
- ``logging``: metric files, loggers, progress bar;
- ``distributed``: DDP / FSDP2 under torchrun.

Every field has one name, read and written either through its group or flat:
``TrainerConfig(max_steps=100, precision="bf16-mixed")`` and
``TrainerConfig(run=RunConfig(max_steps=100), numerics=NumericsConfig(precision="bf16-mixed"))``
are the same config, and ``config.max_steps is config.run.max_steps``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple

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

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed"]
ClipAlgorithm = Literal["norm", "value"]
MonitorMode = Literal["min", "max"]
Strategy = Literal["auto", "single", "ddp", "fsdp"]
LoggerName = Literal["jsonl", "csv", "tensorboard", "wandb"]


@dataclass
class RunConfig:
    """How long the run is, when it validates, where and how reproducibly it runs."""

    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (``None``: no step limit). At least one of
    ``max_steps`` and ``max_epochs`` must be set."""

    max_epochs: Optional[int] = None
    """Stop after this many passes over the training data (``None``: no epoch limit)."""

    val_every_n_steps: Optional[int] = None
    """Validate every this many optimizer steps; ``None``: at the end of each epoch."""

    limit_val_batches: Optional[int] = None
    """At most this many validation batches per validation run (``None``: all)."""

    seed: Optional[int] = 0
    """Seed of python, numpy and torch (plus the rank) and of the data order; ``None``: do
    not seed (the data order then uses 0)."""

    device: str = "auto"
    """``"auto"`` or any torch device string (``"cpu"``, ``"xpu"``, ``"mps"``, an NVIDIA
    GPU's); under torchrun the local rank picks the index."""

    deterministic: bool = False
    """``torch.use_deterministic_algorithms(True)`` during ``fit``."""

    max_consecutive_ooms: int = 3
    """Stop after this many out-of-memory training batches in a row (single process)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_epochs", "val_every_n_steps", "limit_val_batches"):
            _positive_int_or_none(name, getattr(self, name))
        _positive_int("max_consecutive_ooms", self.max_consecutive_ooms)
        if self.max_steps is None and self.max_epochs is None:
            raise ValueError("max_steps / max_epochs: set at least one, got both None")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(self.seed).__name__}")
        if not isinstance(self.device, str):
            raise TypeError(f"device: expected a string such as 'auto' or 'cpu', got {type(self.device).__name__}")


@dataclass
class NumericsConfig:
    """The precision of the forward and backward passes."""

    precision: Precision = "fp32"
    """``"fp32"``, ``"bf16-mixed"`` or ``"fp16-mixed"``: autocast on the training device
    (``foldops.device.autocast``); fp16 adds a gradient scaler. Lightning's ``"32"``,
    ``"16-mixed"``, ``"bf16"`` spellings are accepted and stored normalised. Parameters and
    optimizer state stay fp32."""

    def __post_init__(self) -> None:
        self.precision = _normalise_precision(self.precision)


@dataclass
class OptimConfig:
    """What happens between the backward passes and the optimizer step."""

    accumulate_grad_batches: int = 1
    """Micro-batches per optimizer step; each loss is divided by the window's size. Under
    DDP/FSDP gradients are synchronised on the last micro-batch of each window only."""

    gradient_clip_val: Optional[float] = None
    """Clip threshold, or ``None`` for no clipping."""

    gradient_clip_algorithm: ClipAlgorithm = "norm"
    """``"norm"``: scale all gradients so that their total 2-norm is at most the threshold;
    ``"value"``: clamp each element to ``[-threshold, threshold]``."""

    skip_nonfinite: bool = True
    """Skip (and count) an optimizer step whose loss or gradient norm is not finite. Costs
    one foreach norm over the gradients and one host read per step; the same norm serves
    clipping and the logged ``train/grad_norm`` (which, with this off and no norm
    clipping, is computed on logging steps only)."""

    def __post_init__(self) -> None:
        _positive_int("accumulate_grad_batches", self.accumulate_grad_batches)
        if self.gradient_clip_val is not None:
            if isinstance(self.gradient_clip_val, bool) or not isinstance(self.gradient_clip_val, (int, float)) \
                    or not self.gradient_clip_val > 0:
                raise ValueError(f"gradient_clip_val: expected a number > 0 or None, got {self.gradient_clip_val!r}")
            self.gradient_clip_val = float(self.gradient_clip_val)
        _choice("gradient_clip_algorithm", self.gradient_clip_algorithm, ("norm", "value"))


@dataclass
class EMAConfig:
    """An exponential moving average of the weights, updated after every optimizer step."""

    ema_decay: Optional[float] = None
    """Decay of the average, in [0, 1]; ``None``: no EMA."""

    ema_warmup: bool = True
    """Use ``min(decay, (1 + n) / (10 + n))`` after n updates (as Boltz does)."""

    ema_eval: bool = True
    """Validate and predict with the EMA weights when EMA is on."""

    def __post_init__(self) -> None:
        if self.ema_decay is not None:
            if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                    or not 0.0 <= self.ema_decay <= 1.0:
                raise ValueError(f"ema_decay: expected a float in [0, 1] or None, got {self.ema_decay!r}")
            self.ema_decay = float(self.ema_decay)


@dataclass
class CheckpointConfig:
    """Training-state files (all written atomically; see :mod:`foldops.train.checkpointing`)."""

    checkpoint_dir: Optional[str] = None
    """Directory of ``last.ckpt``, step and top-k checkpoints; ``None``: no checkpoints."""

    checkpoint_every_n_steps: Optional[int] = None
    """Write ``step=NNNNNNNN.ckpt`` and refresh ``last.ckpt`` every this many steps
    (``None``: only at epoch ends and at the end of ``fit``)."""

    keep_step_checkpoints: Optional[int] = None
    """Keep only the newest this many step checkpoints (``None``: all)."""

    save_top_k: int = 1
    """Keep the k best checkpoints by ``monitor`` (``-1``: all, ``0``: none)."""

    monitor: Optional[str] = None
    """Metric ranked for top-k, e.g. ``"val/loss"``; ``None``: no top-k files."""

    monitor_mode: MonitorMode = "min"
    """``"min"``: lower is better; ``"max"``: higher is better."""

    def __post_init__(self) -> None:
        for name in ("checkpoint_every_n_steps", "keep_step_checkpoints"):
            _positive_int_or_none(name, getattr(self, name))
        if isinstance(self.save_top_k, bool) or not isinstance(self.save_top_k, int) or self.save_top_k < -1:
            raise ValueError(f"save_top_k: expected an int >= -1, got {self.save_top_k!r}")
        _choice("monitor_mode", self.monitor_mode, ("min", "max"))


@dataclass
class LoggingConfig:
    """Metric files, loggers and the progress bar (rank 0 only)."""

    log_dir: Optional[str] = None
    """Directory of the JSONL/CSV/TensorBoard logs; ``None``: ``checkpoint_dir`` (no file
    loggers when both are ``None``)."""

    loggers: Tuple[LoggerName, ...] = ("jsonl", "csv")
    """Built-in loggers by name: ``"jsonl"``, ``"csv"``, ``"tensorboard"``, ``"wandb"`` (the
    last two need their packages installed). A single name is accepted."""

    log_every_n_steps: int = 10
    """Write per-step metrics every this many optimizer steps (values averaged over the
    interval)."""

    progress_bar: bool = True
    """Show a progress bar on rank 0 (stderr)."""

    run_name: Optional[str] = None
    """A name for the run (used by W&B and in the logs)."""

    def __post_init__(self) -> None:
        _positive_int("log_every_n_steps", self.log_every_n_steps)
        if isinstance(self.loggers, str):
            self.loggers = (self.loggers,)
        self.loggers = tuple(self.loggers)
        for name in self.loggers:
            _choice("loggers", name, LOGGERS)


@dataclass
class DistributedConfig:
    """Several processes under torchrun."""

    strategy: Strategy = "auto"
    """``"auto"``: DDP when started by torchrun with more than one process, else a single
    process; ``"single"``, ``"ddp"`` or ``"fsdp"`` (FSDP2 ``fully_shard`` per block), which
    join torchrun's process group of any size, one process included."""

    fsdp_blocks: Optional[Tuple[str, ...]] = None
    """Class names of the modules sharded one by one under ``"fsdp"``; ``None``: every child
    of every ``nn.ModuleList`` (the blocks of a stack)."""

    find_unused_parameters: bool = False
    """Passed to DDP (needed when some parameters get no gradient)."""

    dist_timeout_s: float = 1800.0
    """Timeout of collective operations, seconds."""

    def __post_init__(self) -> None:
        _choice("strategy", self.strategy, STRATEGIES)
        if self.fsdp_blocks is not None:
            if isinstance(self.fsdp_blocks, str):
                self.fsdp_blocks = (self.fsdp_blocks,)
            self.fsdp_blocks = tuple(self.fsdp_blocks)
            if not all(isinstance(n, str) for n in self.fsdp_blocks):
                raise TypeError("fsdp_blocks: expected class names (strings)")
        if isinstance(self.dist_timeout_s, bool) or not isinstance(self.dist_timeout_s, (int, float)) \
                or not self.dist_timeout_s > 0:
            raise ValueError(f"dist_timeout_s: expected a number > 0, got {self.dist_timeout_s!r}")


_GROUPS = {
    "run": RunConfig,
    "numerics": NumericsConfig,
    "optim": OptimConfig,
    "ema": EMAConfig,
    "checkpointing": CheckpointConfig,
    "logging": LoggingConfig,
    "distributed": DistributedConfig,
}
# flat field name -> its group
_FLAT = {f.name: group for group, cls in _GROUPS.items() for f in dataclasses.fields(cls)}


@dataclass(init=False)
class TrainerConfig:
    """Configuration of :class:`foldops.train.Trainer`: seven groups (see the module docstring).

    ``TrainerConfig(**flat_fields)``, ``TrainerConfig(run=RunConfig(...), ...)`` or both (flat
    fields then override the groups' values). Every field can be read and set flat
    (``config.max_steps``) or through its group (``config.run.max_steps``).
    """

    run: RunConfig = field(default_factory=RunConfig)
    """Length, validation cadence, seed, device, OOM limit."""

    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    """Precision."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Accumulation, clipping, non-finite steps."""

    ema: EMAConfig = field(default_factory=EMAConfig)
    """The EMA of the weights."""

    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training-state files."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric files, loggers, progress bar."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """DDP / FSDP2."""

    def __init__(
        self,
        *,
        run: Optional[RunConfig] = None,
        numerics: Optional[NumericsConfig] = None,
        optim: Optional[OptimConfig] = None,
        ema: Optional[EMAConfig] = None,
        checkpointing: Optional[CheckpointConfig] = None,
        logging: Optional[LoggingConfig] = None,
        distributed: Optional[DistributedConfig] = None,
        **fields: Any,
    ) -> None:
        given = {"run": run, "numerics": numerics, "optim": optim, "ema": ema, "checkpointing": checkpointing,
                 "logging": logging, "distributed": distributed}
        unknown = sorted(set(fields) - set(_FLAT))
        if unknown:
            raise TypeError(f"TrainerConfig: unknown fields {unknown}; known fields are {sorted(_FLAT)}")
        per_group: Dict[str, Dict[str, Any]] = {}
        for name, value in fields.items():
            per_group.setdefault(_FLAT[name], {})[name] = value
        for group, cls in _GROUPS.items():
            base = given[group]
            if base is not None and not isinstance(base, cls):
                raise TypeError(f"{group}: expected a {cls.__name__}, got {type(base).__name__}")
            changes = per_group.get(group, {})
            if base is None:
                value = cls(**changes)
            elif changes:
                value = dataclasses.replace(base, **changes)  # re-checked
            else:
                value = dataclasses.replace(base)  # a copy: configs do not share groups
            object.__setattr__(self, group, value)

    def replace(self, **fields: Any) -> "TrainerConfig":
        """A copy with some fields (flat names or whole groups) changed, checked again."""
        groups = {g: getattr(self, g) for g in _GROUPS}
        groups.update({k: v for k, v in fields.items() if k in _GROUPS})
        return TrainerConfig(**groups, **{k: v for k, v in fields.items() if k not in _GROUPS})

    def to_dict(self) -> Dict[str, Any]:
        """The flat fields, in plain python types only (checkpoints load with ``weights_only=True``)."""
        return {name: getattr(getattr(self, group), name) for name, group in _FLAT.items()}

    def to_nested_dict(self) -> Dict[str, Dict[str, Any]]:
        """``{group: {field: value}}``."""
        return {group: dataclasses.asdict(getattr(self, group)) for group in _GROUPS}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainerConfig":
        """Inverse of :meth:`to_dict` (flat) or :meth:`to_nested_dict` (groups as dicts)."""
        flat: Dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            if key in _GROUPS and isinstance(value, dict):
                for k, v in value.items():
                    if _FLAT.get(k) != key:
                        unknown.append(f"{key}.{k}")
                    flat[k] = v
            elif key in _FLAT:
                flat[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"TrainerConfig: unknown fields {sorted(unknown)}; known fields are {sorted(_FLAT)}")
        return cls(**flat)


def _flat_property(name: str, group: str) -> property:
    def get(self):
        return getattr(getattr(self, group), name)

    def set_(self, value):
        setattr(getattr(self, group), name, value)

    return property(get, set_, doc=f"``{group}.{name}``")


for _name, _group in _FLAT.items():
    setattr(TrainerConfig, _name, _flat_property(_name, _group))
del _name, _group


def _normalise_precision(value: object) -> str:
    key = str(value).lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if key not in _PRECISION_ALIASES:
        raise ValueError(f"precision: expected one of {PRECISIONS} (or Lightning's '32', '16-mixed'), got {value!r}")
    return _PRECISION_ALIASES[key]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")


def _positive_int_or_none(name: str, value: object) -> None:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1 or None, got {value!r}")


def _choice(name: str, value: object, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
