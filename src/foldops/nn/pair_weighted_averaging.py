"""MSA pair-weighted averaging (AF3 Algorithm 10, Boltz-2's ``PairWeightedAveraging``).

Same constructor arguments, forward signature and state-dict keys as Boltz-2's
(``norm_m``, ``norm_z``, ``proj_m``, ``proj_g``, ``proj_z``, ``proj_o``), so a Boltz
checkpoint loads with ``strict=True``; same initialisation (PyTorch defaults,
``proj_o`` zeros). The averaging is ``foldops.ops.pair_weighted_averaging``.

Differences from Boltz, by design: masking is exact (``inf`` is kept for
compatibility only), and rows i whose pair mask is all zero (padding) give zeros
instead of an unmasked average. At inference the layer runs a chunk of MSA rows at a
time, from the layer norm to the output projection (each chunk one call of the op,
whose softmax costs O(H N^2) next to the chunk's O(chunk H N^2 c_h) weighted sum), so
besides its output it holds O(H N^2 + chunk * N * H * c_h) activations instead of
several ``[B, S, N, H * c_h]`` tensors.

``convert_ligo_state_dict`` maps the Ligo AlphaFold3 naming of the same layer
(``msa_ln``, ``msa_proj.0``, ``to_gamma.0``, ``proj_pair_bias.0/1``, ``output_proj``)
to this one; pass ``msa_mask`` to ``forward`` to get Ligo's masking of the values.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from foldops._checks import as_bool_mask, check_layer_input, check_positive_int, check_tensor
from foldops.backends import AUTO, check_module_backend, for_op
from foldops.budget import rows_per_chunk
from foldops.device import autocast_dtype_in_effect
from foldops.nn import _init
from foldops.ops.pair_weighted_averaging import OP, pair_weighted_averaging

# Ligo AlphaFold3 ``MSAPairWeightedAveraging`` key -> Boltz-2 / foldops key.
LIGO_KEY_MAP = {
    "msa_ln.weight": "norm_m.weight",
    "msa_ln.bias": "norm_m.bias",
    "msa_proj.0.weight": "proj_m.weight",
    "to_gamma.0.weight": "proj_g.weight",
    "proj_pair_bias.0.weight": "norm_z.weight",
    "proj_pair_bias.0.bias": "norm_z.bias",
    "proj_pair_bias.1.weight": "proj_z.weight",
    "output_proj.weight": "proj_o.weight",
}


def convert_ligo_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> "OrderedDict[str, Tensor]":
    """Rename a Ligo ``MSAPairWeightedAveraging`` state dict to this layer's keys.

    Keys ``prefix + <Ligo name>`` become ``prefix + <foldops name>``; every other key
    is kept as is, so a whole-model state dict can be converted one layer (prefix) at
    a time. Tensors are not copied. Raises ``ValueError`` if nothing under ``prefix``
    matched.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
    converted: "OrderedDict[str, Tensor]" = OrderedDict()
    renamed = 0
    for key, value in state_dict.items():
        if key.startswith(prefix) and key[len(prefix) :] in LIGO_KEY_MAP:
            key = prefix + LIGO_KEY_MAP[key[len(prefix) :]]
            renamed += 1
        converted[key] = value
    if renamed == 0:
        raise ValueError(
            f"state_dict: no Ligo MSAPairWeightedAveraging keys under prefix {prefix!r} "
            f"(expected e.g. {prefix + 'msa_proj.0.weight'!r})"
        )
    return converted


def _to_autocast_dtype(x: Tensor) -> Tensor:
    """A layer norm's fp32 output cast once to the autocast dtype in effect (what
    autocast would hand each projection): both projections then share, and save for
    backward, one low-precision copy instead of the fp32 output plus one cast each."""
    low = autocast_dtype_in_effect(x)
    return x.to(low) if low is not None and x.dtype == torch.float32 else x


class PairWeightedAveraging(nn.Module):
    """Update the MSA by averaging it over tokens j with weights from the pair tensor.

    Args:
        c_m: MSA channels.
        c_z: pair channels.
        c_h: per-head width.
        num_heads: heads H.
        inf: kept for Boltz compatibility; masking here is exact.
        backend: backend of ``foldops.ops.pair_weighted_averaging``.
        device, dtype: factory kwargs for the parameters.

    Shapes: ``m`` ``[B, S, N, c_m]``, ``z`` ``[B, N, N, c_z]``, ``mask`` ``[B, N, N]``
    pair keep-mask (1/True = keep); output ``[B, S, N, c_m]``.
    """

    def __init__(
        self,
        c_m: int,
        c_z: int,
        c_h: int,
        num_heads: int,
        inf: float = 1e6,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("c_m", c_m), ("c_z", c_z), ("c_h", c_h), ("num_heads", num_heads)):
            check_positive_int(name, value, allow_none=False)
        factory = {"device": device, "dtype": dtype}
        self.c_m = c_m
        self.c_z = c_z
        self.c_h = c_h
        self.num_heads = num_heads
        self.inf = inf
        self.backend = check_module_backend(backend)
        self.norm_m = nn.LayerNorm(c_m, **factory)
        self.norm_z = nn.LayerNorm(c_z, **factory)
        self.proj_m = nn.Linear(c_m, c_h * num_heads, bias=False, **factory)
        self.proj_g = nn.Linear(c_m, c_h * num_heads, bias=False, **factory)
        self.proj_z = nn.Linear(c_z, num_heads, bias=False, **factory)
        self.proj_o = nn.Linear(c_h * num_heads, c_m, bias=False, **factory)
        _init.zeros_(self.proj_o.weight)

    def _rows(self, m: Tensor, logits: Tensor, mask, msa_mask) -> Tensor:
        """The layer on a block of MSA rows, from the layer norm to ``proj_o``.

        The op takes the gate before its sigmoid and the MSA mask, so the only
        S * N-sized activations are the two projections and the op's output (the
        triton backend applies both inside its kernel).
        """
        m = _to_autocast_dtype(self.norm_m(m))
        # Two matmuls, not one on concatenated weights: slicing a joint output costs
        # two full-size zero-filled gradients in backward.
        v = self.proj_m(m).unflatten(-1, (self.num_heads, self.c_h))
        g = self.proj_g(m).unflatten(-1, (self.num_heads, self.c_h))
        del m
        o = pair_weighted_averaging(v, logits, mask, gate=g, msa_mask=msa_mask, backend=for_op(OP, self.backend))
        del v, g
        return self.proj_o(o.flatten(-2))

    def forward(
        self,
        m: Tensor,
        z: Tensor,
        mask: Tensor,
        chunk_heads: bool = False,
        msa_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """``m`` ``[B, S, N, c_m]``, ``z`` ``[B, N, N, c_z]``, ``mask`` ``[B, N, N]``.

        ``chunk_heads``: Boltz's low-memory switch; here the layer always works in
        bounded row chunks at inference, and this makes the chunks H times smaller.
        ``msa_mask`` (foldops extension, for converted Ligo weights): ``[B, S, N]``
        keep-mask multiplied into the values, or None (Boltz's behaviour).
        Returns ``[B, S, N, c_m]``.
        """
        check_tensor("m", m, (None, None, None, self.c_m))
        batch, rows, n, _ = m.shape
        check_tensor("z", z, (batch, n, n, self.c_z), device=m.device)
        check_layer_input("m", m, self.norm_m.weight)
        check_layer_input("z", z, self.norm_z.weight)
        mask = as_bool_mask("mask", mask, (batch, n, n), m.device)
        if msa_mask is not None:
            msa_mask = as_bool_mask("msa_mask", msa_mask, (batch, rows, n), m.device)
        logits = self.proj_z(_to_autocast_dtype(self.norm_z(z))).permute(0, 3, 1, 2)  # [B, H, N, N] view

        if self.training or torch.is_grad_enabled():
            return self._rows(m, logits, mask, msa_mask)
        # Inference: MSA rows per step so that one step's activations (layer norm,
        # projections, the op's output and the gated product) stay within
        # foldops.budget's chunk budget; chunk_heads makes the steps H times smaller.
        width = self.num_heads * self.c_h
        per_row = batch * n * (2 * self.c_m + 4 * width) * m.element_size()
        step = rows_per_chunk(m.device, per_row * (self.num_heads if chunk_heads else 1), rows)
        if step >= rows:
            return self._rows(m, logits, mask, msa_mask)
        out = None
        for s0 in range(0, rows, step):
            s1 = min(rows, s0 + step)
            chunk_mask = None if msa_mask is None else msa_mask[:, s0:s1]
            o = self._rows(m[:, s0:s1], logits, mask, chunk_mask)
            if out is None:
                out = o.new_empty((batch, rows, n, o.shape[-1]))
            out[:, s0:s1] = o
        return out

    def extra_repr(self) -> str:
        return (
            f"c_m={self.c_m}, c_z={self.c_z}, c_h={self.c_h}, num_heads={self.num_heads}, "
            f"backend={self.backend!r}"
        )
