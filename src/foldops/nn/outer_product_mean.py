"""Outer product mean (AF3 Algorithm 9, Boltz-2's ``OuterProductMean``).

Same constructor arguments, forward signature and state-dict keys as Boltz-2's
(``norm``, ``proj_a``, ``proj_b``, ``proj_o``), so a Boltz checkpoint loads with
``strict=True``; same initialisation (PyTorch defaults, ``proj_o`` zeros). The
contraction is ``foldops.ops.outer_product_mean``: its ``torch`` backend never holds
the ``[B, N, N, c_hidden^2]`` outer product, in training or at inference.

Difference from Boltz, by design: ``chunk_size`` counts token rows per step of the
op (Boltz counts hidden channels); any value gives the same result, only the memory
bound changes, and without one the op bounds its temporaries itself.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from foldops._checks import check_layer_input, check_positive_int, check_tensor
from foldops.backends import AUTO, check_module_backend, for_op
from foldops.nn import _init
from foldops.ops.outer_product_mean import OP, outer_product_mean


class OuterProductMean(nn.Module):
    """MSA -> pair update: mean over MSA rows of projected outer products.

    Args:
        c_in: MSA channels.
        c_hidden: width of each of the two projections (the outer product has
            ``c_hidden ** 2`` channels).
        c_out: pair channels.
        backend: backend of ``foldops.ops.outer_product_mean``.
        chunk_size: default token rows per step of the op (None: automatic).
        device, dtype: factory kwargs for the parameters.

    Shapes: ``m`` ``[B, S, N, c_in]``, ``mask`` ``[B, S, N]`` (1/True = keep);
    output ``[B, N, N, c_out]``.
    """

    def __init__(
        self,
        c_in: int,
        c_hidden: int,
        c_out: int,
        *,
        backend: str = AUTO,
        chunk_size: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.c_in = c_in
        self.c_hidden = c_hidden
        self.c_out = c_out
        self.backend = check_module_backend(backend)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.norm = nn.LayerNorm(c_in, **factory)
        self.proj_a = nn.Linear(c_in, c_hidden, bias=False, **factory)
        self.proj_b = nn.Linear(c_in, c_hidden, bias=False, **factory)
        self.proj_o = nn.Linear(c_hidden * c_hidden, c_out, **factory)
        _init.zeros_(self.proj_o.weight)
        _init.zeros_(self.proj_o.bias)

    def forward(self, m: Tensor, mask: Tensor, chunk_size: Optional[int] = None) -> Tensor:
        """``m`` ``[B, S, N, c_in]``, ``mask`` ``[B, S, N]`` -> ``[B, N, N, c_out]``.

        ``chunk_size``: token rows per step of the op (overrides the constructor's).
        """
        check_tensor("m", m, (None, None, None, self.c_in))
        check_layer_input("m", m, self.norm.weight)
        chunk_size = check_positive_int("chunk_size", chunk_size) or self.chunk_size
        m = self.norm(m)
        # The op masks a and b itself (and never lets masked positions get gradient).
        a, b = self.proj_a(m), self.proj_b(m)
        return outer_product_mean(
            a, b, mask, self.proj_o.weight, self.proj_o.bias, chunk_size=chunk_size, backend=for_op(OP, self.backend)
        )

    def extra_repr(self) -> str:
        return f"c_in={self.c_in}, c_hidden={self.c_hidden}, c_out={self.c_out}, backend={self.backend!r}"
