"""Former name of :mod:`foldops.train.checkpointing` (training-state files), kept so that
``from foldops.train.checkpoint import ...`` keeps working: both names are one module."""

import sys

from foldops.train import checkpointing as _checkpointing

sys.modules[__name__] = _checkpointing
