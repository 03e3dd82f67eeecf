"""Public functional ops. Each takes ``backend="auto"`` and dispatches through
``foldops.backends``. Importing this touches no device and does not import Triton."""

from foldops.ops.attention_pair_bias import attention_pair_bias
from foldops.ops.outer_product_mean import outer_product_mean
from foldops.ops.pair_weighted_averaging import pair_weighted_averaging, pair_weighted_averaging_core
from foldops.ops.transition import swiglu_transition
from foldops.ops.triangle_attention import triangle_attention
from foldops.ops.triangle_multiplication import triangle_multiplication

__all__ = [
    "attention_pair_bias",
    "outer_product_mean",
    "pair_weighted_averaging",
    "pair_weighted_averaging_core",
    "swiglu_transition",
    "triangle_attention",
    "triangle_multiplication",
]
