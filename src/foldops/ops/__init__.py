"""Public functional ops. Each takes ``backend="auto"`` and dispatches through
``foldops.backends``. Importing this touches no device and does not import Triton."""

from foldops.ops.triangle_attention import triangle_attention

__all__ = [
    "triangle_attention",
]
