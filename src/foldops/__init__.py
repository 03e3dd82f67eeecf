"""foldops: fast, portable building blocks for biomolecular structure and sequence models.

``import foldops`` touches no device. Subpackages load on first use:

- ``foldops.device``: device resolution, autocast, memory, kernel capability
- ``foldops.backends``: backend registry and selection (``FOLDOPS_BACKEND``)
- ``foldops.ops``: functional ops, each with ``backend=``
- ``foldops.reference``: pure-PyTorch reference of every op (fp64-capable)
- ``foldops.nn``: Boltz-2-compatible layers
- ``foldops.models``: whole models (SEDD)
- ``foldops.train`` / ``foldops.compat``: trainer, checkpoints, drop-ins
- ``foldops.patch``: patch a loaded Boltz model in place to foldops modules
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("backends", "bench", "compat", "device", "kernels", "models", "nn", "ops", "patch", "reference", "train")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"foldops.{name}")
    raise AttributeError(f"module 'foldops' has no attribute {name!r}")


__all__ = ["__version__", *_SUBMODULES]
