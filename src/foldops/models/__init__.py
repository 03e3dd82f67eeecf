"""Whole models on foldops ops (imported lazily; importing this touches no device).

- ``sedd.py``: SEDD's DDiT score network (``SEDD``, ``DDiTBlock``, ``DDitFinalLayer``,
  ``TimestepEmbedder``, ``EmbeddingLayer``, ``Rotary``), checkpoint-compatible with the
  original, with variable-length batches and mixed precision on every device.
"""

from foldops.models.sedd import DDiTBlock, DDitFinalLayer, EmbeddingLayer, Rotary, SEDD, TimestepEmbedder

__all__ = ["DDiTBlock", "DDitFinalLayer", "EmbeddingLayer", "Rotary", "SEDD", "TimestepEmbedder"]
