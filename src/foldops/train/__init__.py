"""A Lightning-free training and inference runtime in plain PyTorch.

- :class:`Trainer` / :class:`TrainerConfig` (grouped: :class:`RunConfig`,
  :class:`NumericsConfig`, :class:`OptimConfig`, :class:`EMAConfig`,
  :class:`CheckpointConfig`, :class:`LoggingConfig`, :class:`DistributedConfig`): fit / validate / predict for a plain
  ``nn.Module`` with ``training_step``, ``configure_optimizers`` and optional
  ``validation_step`` / ``predict_step``; mixed precision on any device, gradient
  accumulation, clipping, DDP / FSDP2 under torchrun, EMA, atomic and exactly resumable
  checkpoints, OOM recovery, JSONL/CSV (and TensorBoard/W&B) logging, a progress bar.
- :func:`log`: replaces Lightning's ``self.log`` (or inherit :class:`LogMixin`).
- :class:`EMA`: a standalone exponential moving average of the weights.
- :func:`transfer_to_device`, :class:`ResumableSampler`: data helpers.
- Training-state files (atomic writes, verified reads, top-k): ``checkpointing.py``.

See docs/training.md.
"""

from foldops.train.checkpointing import (
    CheckpointError,
    CheckpointManager,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
    atomic_save,
    read_checkpoint,
)
from foldops.train.config import (
    CheckpointConfig,
    DistributedConfig,
    EMAConfig,
    LoggingConfig,
    NumericsConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
)
from foldops.train.data import ResumableSampler, transfer_to_device
from foldops.train.ema import EMA
from foldops.train.loggers import CSVLogger, JSONLLogger, Logger, TensorBoardLogger, WandbLogger
from foldops.train.metrics import LogMixin, log
from foldops.train.predict import PredictionWriter
from foldops.train.trainer import Trainer

__all__ = [
    "CSVLogger",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "DistributedConfig",
    "EMA",
    "EMAConfig",
    "JSONLLogger",
    "LogMixin",
    "Logger",
    "LoggingConfig",
    "NumericsConfig",
    "OptimConfig",
    "PredictionWriter",
    "ResumableSampler",
    "RunConfig",
    "TensorBoardLogger",
    "Trainer",
    "TrainerConfig",
    "UnsafeCheckpointError",
    "UnverifiedCheckpointWarning",
    "WandbLogger",
    "atomic_save",
    "log",
    "read_checkpoint",
    "transfer_to_device",
]
