"""Whole models on foldops ops (importing this touches no device).

- ``sedd.py``: SEDD's DDiT score network (``SEDD``, ``DDiTBlock``, ``DDitFinalLayer``,
  ``TimestepEmbedder``, ``EmbeddingLayer``, ``Rotary``), checkpoint-compatible with the
  original, with variable-length batches and mixed precision on every device.
- ``esm.py``: the ESM-2 encoder (``ESM2``, ``ESM2Config``) with fair-esm's interface, its
  alphabet and batch converter (``Alphabet``, ``BatchConverter``), loading Hugging Face
  and fair-esm weights, attention on the packed batch.
"""

from foldops.models.esm import Alphabet, BatchConverter, ESM2, ESM2Config
from foldops.models.sedd import DDiTBlock, DDitFinalLayer, EmbeddingLayer, Rotary, SEDD, TimestepEmbedder

__all__ = [
    "Alphabet", "BatchConverter", "ESM2", "ESM2Config",
    "DDiTBlock", "DDitFinalLayer", "EmbeddingLayer", "Rotary", "SEDD", "TimestepEmbedder",
]
