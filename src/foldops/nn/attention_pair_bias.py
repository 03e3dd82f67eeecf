"""Gated multi-head attention with a pair bias: Boltz-2's ``AttentionPairBias`` (v2).

Constructor arguments, forward signature and state-dict keys (``proj_q``, ``proj_k``,
``proj_v``, ``proj_g``, ``proj_z.0`` (LayerNorm), ``proj_z.1``, ``proj_o``) are
Boltz-2's, so its checkpoints load with ``strict=True``. The attention is
``foldops.ops.attention_pair_bias``: with ``multiplicity`` M the pair bias is shared by
the M samples of each item instead of being repeated M times.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from foldops._checks import as_bool_mask, check_layer_input, check_positive_int, check_same_dtype, check_tensor
from foldops.backends import AUTO, check_module_backend, for_op
from foldops.budget import rows_per_chunk
from foldops.nn import _init
from foldops.ops.attention_pair_bias import OP, attention_pair_bias


class HeadsFirst(nn.Module):
    """``[B, ..., H] -> [B, H, ...]`` as a view (Boltz's ``Rearrange("b ... h -> b h ...")``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1)


class AttentionPairBias(nn.Module):
    """Boltz-2 ``AttentionPairBias`` (attentionv2).

    Args:
        c_s: single channels (H * D).
        c_z: pair channels, when ``compute_pair_bias``.
        num_heads: heads H; must divide ``c_s``.
        inf: kept for Boltz compatibility; masking here is exact.
        compute_pair_bias: True: ``z`` is a pair tensor projected to a bias by
            ``proj_z`` (LayerNorm + Linear). False: ``z`` already is the bias ``[B, Nq, Nk, H]``.
        backend: backend of the attention op (``"auto"``, ``"triton"``, ``"torch"``, ...).
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(
        self,
        c_s: int,
        c_z: Optional[int] = None,
        num_heads: Optional[int] = None,
        inf: float = 1e6,
        compute_pair_bias: bool = True,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("c_s", c_s, allow_none=False)
        check_positive_int("num_heads", num_heads, allow_none=False)
        if c_s % num_heads != 0:
            raise ValueError(f"num_heads: expected a divisor of c_s={c_s}, got {num_heads}")
        factory = {"device": device, "dtype": dtype}
        self.c_s = c_s
        self.num_heads = num_heads
        self.head_dim = c_s // num_heads
        self.inf = inf
        self.compute_pair_bias = compute_pair_bias
        self.backend = check_module_backend(backend)
        self.proj_q = nn.Linear(c_s, c_s, **factory)
        self.proj_k = nn.Linear(c_s, c_s, bias=False, **factory)
        self.proj_v = nn.Linear(c_s, c_s, bias=False, **factory)
        self.proj_g = nn.Linear(c_s, c_s, bias=False, **factory)
        if compute_pair_bias:
            check_positive_int("c_z", c_z, allow_none=False)
            self.proj_z = nn.Sequential(
                nn.LayerNorm(c_z, **factory),
                nn.Linear(c_z, num_heads, bias=False, **factory),
                HeadsFirst(),
            )
        else:
            self.proj_z = HeadsFirst()
        self.proj_o = nn.Linear(c_s, c_s, bias=False, **factory)
        _init.zeros_(self.proj_o.weight)

    def forward(
        self,
        s: Tensor,
        z: Tensor,
        mask: Optional[Tensor],
        k_in: Tensor,
        multiplicity: int = 1,
    ) -> Tensor:
        """Args:
            s: queries' input ``[B * M, Nq, c_s]`` (M = ``multiplicity``).
            z: pair tensor ``[B, Nq, Nk, c_z]`` (or the bias ``[B, Nq, Nk, H]`` when
                ``compute_pair_bias=False``), shared by the M samples of an item.
            mask: key keep-mask ``[B * M, Nk]`` (bool or 0/1 float), or None.
            k_in: keys' input ``[B * M, Nk, c_s]``.
            multiplicity: samples M per item of ``z``.

        Returns:
            ``[B * M, Nq, c_s]``.
        """
        check_positive_int("multiplicity", multiplicity, allow_none=False)
        check_tensor("s", s, (None, None, self.c_s))
        rows, queries = s.shape[:2]
        check_tensor("k_in", k_in, (rows, None, self.c_s), device=s.device)
        keys = k_in.shape[1]
        check_tensor("z", z, (None, queries, keys, None if self.compute_pair_bias else self.num_heads), device=s.device)
        check_layer_input("s", s, self.proj_q.weight)
        check_layer_input("k_in", k_in, self.proj_k.weight)
        check_same_dtype("s", s, k_in=k_in)
        batch = z.shape[0]
        if batch * multiplicity != rows:
            raise ValueError(
                f"s: expected batch {batch} x multiplicity {multiplicity} = {batch * multiplicity} rows "
                f"(z has batch {batch}), got {rows}"
            )
        if mask is not None:
            mask = as_bool_mask("mask", mask, (rows, keys), s.device).reshape(batch, multiplicity, keys)

        shape_q = (batch, multiplicity, queries, self.num_heads, self.head_dim)
        shape_k = (batch, multiplicity, keys, self.num_heads, self.head_dim)
        q = self.proj_q(s).view(shape_q)
        k = self.proj_k(k_in).view(shape_k)
        v = self.proj_v(k_in).view(shape_k)
        g = torch.sigmoid(self.proj_g(s))
        bias = self._pair_bias(z)  # [B, H, Nq, Nk]
        if bias.dtype not in (q.dtype, torch.float32):
            bias = bias.float()
        o = attention_pair_bias(q, k, v, bias, mask, backend=for_op(OP, self.backend))
        o = o.reshape(rows, queries, self.c_s)
        return self.proj_o(g * o)

    def _pair_bias(self, z: Tensor) -> Tensor:
        if not self.compute_pair_bias:
            return self.proj_z(z)
        batch, queries, keys, channels = z.shape
        needs_grad = torch.is_grad_enabled() and (z.requires_grad or any(p.requires_grad for p in self.proj_z.parameters()))
        if needs_grad:  # autograd keeps the normalised z whole anyway
            return self.proj_z(z)
        # Query rows per step: their normalised z (and LayerNorm's temporaries) stay
        # within foldops.budget's chunk budget.
        step = rows_per_chunk(z.device, 2 * batch * keys * channels * z.element_size(), queries)
        if step >= queries:
            return self.proj_z(z)
        # Inference: normalise z a few rows at a time, so no normalised copy of z exists whole.
        return torch.cat([self.proj_z(z[:, r : r + step]) for r in range(0, queries, step)], dim=2)

    def extra_repr(self) -> str:
        return f"c_s={self.c_s}, num_heads={self.num_heads}, backend={self.backend!r}"
