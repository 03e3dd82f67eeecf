"""Drop-ins for what structure models took from Lightning and FairScale.

- ``lightning.py``: :func:`load_checkpoint`, Lightning ``.ckpt`` (and foldops) checkpoint
  files into a plain ``nn.Module``, safe by default, with key-prefix remapping and EMA weights.
- ``activation_checkpoint.py``: :func:`checkpoint_wrapper`, fairscale's
  ``checkpoint_wrapper(module, offload_to_cpu=False)`` with real (non-reentrant) activation
  checkpointing (recompute in backward).
- ``seed.py``: :func:`seed_everything`, seeds python, numpy and torch.
- ``flash_attn/`` (a subpackage, imported on demand): flash_attn's functions,
  ``FusedDense``/``FusedMLP``, rotary embeddings and an opt-in ``install()`` alias.

Importing this package does not import Lightning, FairScale or flash_attn (none is needed).
"""

from foldops.compat.lightning import (
    AttributeDict,
    CheckpointError,
    LoadedCheckpoint,
    UnsafeCheckpointError,
    UnverifiedCheckpointWarning,
    lightning_safe_globals,
    load_checkpoint,
    remap_keys,
)
from foldops.compat.activation_checkpoint import checkpoint_wrapper, is_checkpoint_wrapped, remove_checkpoint_wrapper
from foldops.compat.seed import seed_everything

__all__ = [
    "AttributeDict",
    "CheckpointError",
    "LoadedCheckpoint",
    "UnsafeCheckpointError",
    "UnverifiedCheckpointWarning",
    "checkpoint_wrapper",
    "is_checkpoint_wrapped",
    "lightning_safe_globals",
    "load_checkpoint",
    "remap_keys",
    "remove_checkpoint_wrapper",
    "seed_everything",
]
