"""Whole models users run (ESM-2 in ``foldops.models.esm``)."""

from foldops.models.esm import ESM2, ESM2Config, Alphabet, BatchConverter  # noqa: F401
