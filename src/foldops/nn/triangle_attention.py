"""Triangle attention around the starting / ending node (AF3 Algorithms 13/14, Boltz-2).

Same constructor arguments, forward signature and state-dict keys as Boltz-2's
``TriangleAttention`` (``layer_norm``, ``linear``, ``mha.linear_{q,k,v,o,g}``), so a
Boltz checkpoint loads with ``strict=True``. The attention itself is
``foldops.ops.triangle_attention``; the ending node hands it transposed *views* of q, k,
v, the bias and the mask, so no transposed copy of the pair tensor is made.

Differences from Boltz, by design: rows whose keys are all masked (padding) give
zeros instead of an average over masked keys; masking is exact rather than a
``-inf`` bias; at inference the projections are computed a bounded number of rows at a
time, so no ``[B, N, N, 4 * H * D]`` tensor is ever held whole.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foldops._checks import as_bool_mask, check_layer_input, check_positive_int, check_tensor
from foldops.backends import AUTO, check_module_backend, for_op
from foldops.budget import rows_per_chunk
from foldops.nn import _init
from foldops.ops.triangle_attention import OP, triangle_attention


class _Attention(nn.Module):
    """Holds the gated multi-head projections under Boltz's ``mha.*`` names."""

    def __init__(self, c_in: int, c_hidden: int, no_heads: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        width = c_hidden * no_heads
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.linear_q = nn.Linear(c_in, width, bias=False, **factory)
        self.linear_k = nn.Linear(c_in, width, bias=False, **factory)
        self.linear_v = nn.Linear(c_in, width, bias=False, **factory)
        self.linear_o = nn.Linear(width, c_in, bias=False, **factory)
        self.linear_g = nn.Linear(c_in, width, bias=False, **factory)
        for linear in (self.linear_q, self.linear_k, self.linear_v):
            _init.glorot_uniform_(linear.weight)
        _init.zeros_(self.linear_o.weight)
        _init.zeros_(self.linear_g.weight)

    def qkvg_weight(self) -> Tensor:
        # One matmul for the four projections; the concatenation is tiny (4HD x C).
        return torch.cat([self.linear_q.weight, self.linear_k.weight, self.linear_v.weight, self.linear_g.weight])


class TriangleAttention(nn.Module):
    """Gated triangle self-attention over a pair representation.

    Args:
        c_in: pair channels C.
        c_hidden: per-head width D.
        no_heads: heads H.
        starting: True attends along rows (starting node), False along columns.
        inf: kept for Boltz compatibility; masking here is exact.
        backend: backend of ``foldops.ops.triangle_attention`` (``"auto"``, ...).
        device, dtype: factory kwargs for the parameters.

    Shapes: ``x`` ``[*, N, N, C]``, ``mask`` ``[*, N, N]`` (True/1 = keep) or None;
    output ``[*, N, N, C]``.
    """

    def __init__(
        self,
        c_in: int,
        c_hidden: int,
        no_heads: int,
        starting: bool = True,
        inf: float = 1e9,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("c_in", c_in), ("c_hidden", c_hidden), ("no_heads", no_heads)):
            check_positive_int(name, value, allow_none=False)
        factory = {"device": device, "dtype": dtype}
        self.c_in = c_in
        self.c_hidden = c_hidden
        self.no_heads = no_heads
        self.starting = starting
        self.inf = inf
        self.backend = check_module_backend(backend)
        self.layer_norm = nn.LayerNorm(c_in, eps=1e-5, **factory)
        self.linear = nn.Linear(c_in, no_heads, bias=False, **factory)
        _init.normal_(self.linear.weight)
        self.mha = _Attention(c_in, c_hidden, no_heads, **factory)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        chunk_size: Optional[int] = None,
        use_kernels: bool = False,
    ) -> Tensor:
        """Args:
            x: ``[*, N, N, C]``.
            mask: ``[*, N, N]`` pair keep-mask (bool or 0/1 float), or None.
            chunk_size: at most this many rows per step at inference (Boltz's
                ``chunk_size``); fewer where the memory bound asks for it. Ignored when
                gradients are needed.
            use_kernels: accepted for Boltz compatibility; kernels are chosen by ``backend``.

        Returns:
            ``[*, N, N, C]`` in the compute dtype.
        """
        check_tensor("x", x)
        if x.dim() < 3 or x.shape[-1] != self.c_in or x.shape[-2] != x.shape[-3]:
            raise ValueError(f"x: expected shape (*, N, N, {self.c_in}), got {tuple(x.shape)}")
        check_layer_input("x", x, self.layer_norm.weight)
        check_positive_int("chunk_size", chunk_size)
        lead, n = x.shape[:-3], x.shape[-2]
        x = x.reshape(math.prod(lead), n, n, self.c_in)
        batch = x.shape[0]
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask: expected a torch.Tensor or None, got {type(mask).__name__}")
            if tuple(mask.shape) != tuple(lead) + (n, n):
                raise ValueError(f"mask: expected shape {tuple(lead) + (n, n)}, got {tuple(mask.shape)}")
            mask = as_bool_mask("mask", mask.reshape(batch, n, n), (batch, n, n), x.device)
            # A mask that keeps everything changes nothing; on CPU in eager mode, where checking
            # is one cheap pass and no device sync, drop it so the op skips its mask work
            # (unpadded inference). Never on accelerators (a host sync) nor while torch.compile
            # traces (a branch on tensor values breaks the graph): the masked path gives the
            # same result.
            if x.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all()):
                mask = None
        if x.numel() == 0:  # no tokens (or no batch): empty in, empty out
            return x.clone().reshape(*lead, n, n, self.c_in)

        heads, width = self.no_heads, self.no_heads * self.c_hidden
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        if needs_grad:
            step = n
        else:
            # One step's activations (q/k/v/gate projections, attention output, gated
            # product, layer norm and output projection) stay within foldops.budget's
            # chunk budget; Boltz's chunk_size (e.g. its stack's 512 below 384 tokens)
            # caps the rows per step.
            per_row = batch * n * (6 * width + 2 * self.c_in) * x.element_size()
            step = rows_per_chunk(x.device, per_row, n)
            if chunk_size is not None:
                step = min(step, chunk_size)
        one_shot = step >= n

        # bias[b, h, q, k] = linear(x')[b, q, k, h] with x' = x (start) or x^T (end).
        if one_shot:
            xn = self.layer_norm(x)
            tri = self.linear(xn)
        else:
            # Only the [B, N, N, H] bias is kept whole; each chunk's rows are normalised again
            # in the loop (cheap next to attention) instead of holding a normalised copy of x.
            tri = torch.cat([self.linear(self.layer_norm(x[:, r : r + step])) for r in range(0, n, step)], dim=1)
        bias = tri.permute(0, 3, 1, 2) if self.starting else tri.permute(0, 3, 2, 1)
        if not self.starting and mask is not None:
            mask = mask.transpose(1, 2)
        w_qkvg = self.mha.qkvg_weight()

        # Ending node, one shot: the op gets transposed views (no copy of the pair tensor).
        # In inference chunks: the chunk's columns are projected in the transposed frame,
        # so the op gets row-major q/k/v (the copy is chunk-sized, made inside F.linear).
        transposed_views = not self.starting and one_shot
        out = None
        for start in range(0, n, step):
            stop = min(n, start + step)
            rows = slice(start, stop)
            if one_shot:
                xc = xn
            elif self.starting:
                xc = self.layer_norm(x[:, rows])
            else:
                xc = self.layer_norm(x[:, :, rows].transpose(1, 2))
            proj = F.linear(xc, w_qkvg).unflatten(-1, (4, heads, self.c_hidden))
            q, k, v, g = proj.unbind(-3)  # each [B, rows, N, H, D] in xc's frame
            if transposed_views:
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            o = triangle_attention(
                q,
                k,
                v,
                bias,
                None if mask is None else mask[:, rows],
                chunk_size=None,
                backend=for_op(OP, self.backend),
            )
            if transposed_views:
                o = o.transpose(1, 2)
            o = self.mha.linear_o((o * torch.sigmoid(g)).flatten(-2))  # [B, rows, N, C] in xc's frame
            if one_shot:
                out = o
                break
            if out is None:
                out = o.new_empty(batch, n, n, self.c_in)
            if self.starting:
                out[:, rows] = o
            else:
                out[:, :, rows] = o.transpose(1, 2)
        return out.reshape(*lead, n, n, self.c_in)

    def extra_repr(self) -> str:
        return (
            f"c_in={self.c_in}, c_hidden={self.c_hidden}, no_heads={self.no_heads}, "
            f"starting={self.starting}, backend={self.backend!r}"
        )


# Algorithm 13: Boltz names the starting node by the base class.
TriangleAttentionStartingNode = TriangleAttention


class TriangleAttentionEndingNode(TriangleAttention):
    """Triangle attention around the ending node (AF3 Algorithm 14): ``starting=False``."""

    def __init__(
        self,
        c_in: int,
        c_hidden: int,
        no_heads: int,
        inf: float = 1e9,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(c_in, c_hidden, no_heads, starting=False, inf=inf, backend=backend, device=device, dtype=dtype)
