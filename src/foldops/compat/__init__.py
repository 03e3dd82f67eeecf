"""Drop-ins for what structure models took from Lightning and FairScale.

- :func:`load_checkpoint`: Lightning ``.ckpt`` (and foldops) checkpoints into a plain
  ``nn.Module``, safe by default, with key-prefix remapping and EMA weights.
- :func:`checkpoint_wrapper`: fairscale's ``checkpoint_wrapper(module, offload_to_cpu=False)``
  with real (non-reentrant) activation checkpointing.
- :func:`seed_everything`: seeds python, numpy and torch.
- ``foldops.compat.flash_attn`` (a subpackage, imported on demand): flash_attn's functions,
  ``FusedDense``/``FusedMLP``, rotary embeddings and an opt-in ``install()`` alias.

Importing this package does not import Lightning, FairScale or flash_attn (none is needed).
"""

from foldops.compat.checkpoint import (
    AttributeDict,
    CheckpointError,
    LoadedCheckpoint,
    UnsafeCheckpointError,
    lightning_safe_globals,
    load_checkpoint,
    remap_keys,
)
from foldops.compat.checkpoint_wrapper import checkpoint_wrapper, is_checkpoint_wrapped, remove_checkpoint_wrapper
from foldops.compat.seed import seed_everything

__all__ = [
    "AttributeDict",
    "CheckpointError",
    "LoadedCheckpoint",
    "UnsafeCheckpointError",
    "checkpoint_wrapper",
    "is_checkpoint_wrapped",
    "lightning_safe_globals",
    "load_checkpoint",
    "remap_keys",
    "remove_checkpoint_wrapper",
    "seed_everything",
]
