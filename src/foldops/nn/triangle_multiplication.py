"""Triangle multiplicative updates, outgoing and incoming edges (AF3 Algorithms 12/13, Boltz-2).

Same constructor arguments, forward signature and state-dict keys as Boltz-2's
``TriangleMultiplicationOutgoing`` / ``TriangleMultiplicationIncoming`` (``norm_in``,
``p_in``, ``g_in``, ``norm_out``, ``p_out``, ``g_out``), and the same initialisation
scheme, so a Boltz checkpoint loads with ``strict=True``. The whole update is
``foldops.ops.triangle_multiplication``: ``auto`` runs its fused Triton kernels on CUDA
GPUs of compute capability >= 8.0 (at inference building the product a block of rows
at a time), and elsewhere its ``torch`` backend, which at inference never holds the
2D-wide gated projection whole (see that module for memory bounds).

As in Boltz, the triangular product and the output LayerNorm run in fp32, and the
output at a masked pair is not zeroed (only its contribution to the products is).

``hidden_dim`` (default ``dim``, Boltz-2's layers) sets the product's width H
separately, as AF2 / OpenFold's ``TriangleMultiplicativeUpdate(c_z, c_hidden)``: then
``p_in``, ``g_in`` are ``dim -> 2 * hidden_dim``, ``norm_out`` is over ``hidden_dim``
and ``p_out`` is ``hidden_dim -> dim``; ``g_out`` stays ``dim -> dim`` (OpenFold's
``linear_g``, applied after the output projection). The key names stay Boltz's.
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor, nn

from foldops._checks import check_layer_input, check_positive_int, check_tensor
from foldops.backends import AUTO, check_module_backend, for_op
from foldops.nn import _init
from foldops.ops.triangle_multiplication import OP, triangle_multiplication


class _TriangleMultiplication(nn.Module):
    direction = ""

    def __init__(
        self,
        dim: int = 128,
        *,
        hidden_dim: Optional[int] = None,
        backend: str = AUTO,
        chunk_size: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim, allow_none=False)
        check_positive_int("hidden_dim", hidden_dim)
        check_positive_int("chunk_size", chunk_size)
        factory = {"device": device, "dtype": dtype}
        hidden = dim if hidden_dim is None else hidden_dim
        self.dim = dim
        self.hidden_dim = hidden
        self.backend = check_module_backend(backend)
        self.chunk_size = chunk_size
        self.norm_in = nn.LayerNorm(dim, eps=1e-5, **factory)
        self.p_in = nn.Linear(dim, 2 * hidden, bias=False, **factory)
        self.g_in = nn.Linear(dim, 2 * hidden, bias=False, **factory)
        self.norm_out = nn.LayerNorm(hidden, eps=1e-5, **factory)
        self.p_out = nn.Linear(hidden, dim, bias=False, **factory)
        self.g_out = nn.Linear(dim, dim, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Boltz's scheme: LayerNorms at identity, LeCun-normal p_in, zero gates and
        zero final projection (the update starts as exactly zero)."""
        for norm in (self.norm_in, self.norm_out):
            _init.ones_(norm.weight)
            _init.zeros_(norm.bias)
        _init.lecun_normal_(self.p_in.weight)
        _init.zeros_(self.g_in.weight)
        _init.zeros_(self.p_out.weight)
        _init.zeros_(self.g_out.weight)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, use_kernels: bool = False) -> Tensor:
        """Args:
            x: ``[*, N, N, D]`` pair representation (Boltz: ``[B, N, N, D]``).
            mask: ``[*, N, N]`` pair keep-mask (bool or 0/1 float), or None.
            use_kernels: accepted for Boltz compatibility; it selects nothing: the
                implementation is chosen by the ``backend`` constructor argument (and
                ``FOLDOPS_BACKEND``). ``backend="cuequivariance"`` gives Boltz's
                ``use_kernels=True`` path where cuEquivariance is installed.

        Returns:
            ``[*, N, N, D]`` in x's dtype (autocast's dtype under autocast).
        """
        check_tensor("x", x)
        if x.dim() < 3 or x.shape[-1] != self.dim or x.shape[-2] != x.shape[-3]:
            raise ValueError(f"x: expected shape (*, N, N, {self.dim}), got {tuple(x.shape)}")
        check_layer_input("x", x, self.norm_in.weight)
        lead, n = x.shape[:-3], x.shape[-2]
        batch = math.prod(lead)
        if mask is not None:
            check_tensor("mask", mask, dtypes=None)
            if tuple(mask.shape) != tuple(lead) + (n, n):
                raise ValueError(f"mask: expected shape {tuple(lead) + (n, n)}, got {tuple(mask.shape)}")
            mask = mask.reshape(batch, n, n)
        out = triangle_multiplication(
            x.reshape(batch, n, n, self.dim),
            mask,
            direction=self.direction,
            norm_in_weight=self.norm_in.weight,
            norm_in_bias=self.norm_in.bias,
            p_in_weight=self.p_in.weight,
            g_in_weight=self.g_in.weight,
            norm_out_weight=self.norm_out.weight,
            norm_out_bias=self.norm_out.bias,
            p_out_weight=self.p_out.weight,
            g_out_weight=self.g_out.weight,
            eps=self.norm_in.eps,
            chunk_size=self.chunk_size,
            backend=for_op(OP, self.backend),
        )
        return out.reshape(*lead, n, n, self.dim)

    def extra_repr(self) -> str:
        hidden = "" if self.hidden_dim == self.dim else f", hidden_dim={self.hidden_dim}"
        return f"dim={self.dim}{hidden}, backend={self.backend!r}, chunk_size={self.chunk_size}"


class TriangleMultiplicationOutgoing(_TriangleMultiplication):
    """Update from outgoing edges: ``t[i, j] = sum_k a[i, k] * b[j, k]`` (AF3 Algorithm 12).

    Args:
        dim: pair channels D (Boltz default 128).
        hidden_dim: channels H of the triangular product (default ``dim``, as Boltz-2;
            AF2 / OpenFold's ``c_hidden``).
        backend: backend of ``foldops.ops.triangle_multiplication`` (``"auto"``,
            ``"triton"``, ``"torch"``, ``"reference"``, ``"cuequivariance"``).
        chunk_size: hidden channels of the product per step at inference (None: memory-bounded
            default).
        device, dtype: factory kwargs for the parameters.
    """

    direction = "outgoing"


class TriangleMultiplicationIncoming(_TriangleMultiplication):
    """Update from incoming edges: ``t[i, j] = sum_k a[k, i] * b[k, j]`` (AF3 Algorithm 13).

    Args: as :class:`TriangleMultiplicationOutgoing`.
    """

    direction = "incoming"
