"""Triton kernels, one module per op. Imported lazily by the ops; never at ``import foldops``."""
