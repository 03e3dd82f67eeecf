"""Public functional ops. Each takes ``backend="auto"`` and dispatches through
``foldops.backends``. Importing this touches no device and does not import Triton."""

from foldops.ops.attention_pair_bias import attention_pair_bias
from foldops.ops.outer_product_mean import outer_product_mean
from foldops.ops.pair_weighted_averaging import pair_weighted_averaging
from foldops.ops.transition import swiglu_transition
from foldops.ops.triangle_attention import triangle_attention
from foldops.ops.triangle_multiplication import triangle_multiplication
from foldops.ops.varlen_attention import padded_attention, varlen_attention

__all__ = [
    "attention_pair_bias",
    "outer_product_mean",
    "padded_attention",
    "pair_weighted_averaging",
    "swiglu_transition",
    "triangle_attention",
    "triangle_multiplication",
    "varlen_attention",
]
