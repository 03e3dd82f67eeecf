"""One block of Boltz-2's MSA module (``boltz.model.modules.trunkv2.MSALayer``).

Same constructor arguments, forward signature and state-dict keys
(``msa_transition``, ``pair_weighted_averaging``, ``pairformer_layer``,
``outer_product_mean``), so Boltz checkpoints load with ``strict=True``.

Shapes: ``z`` ``[B, N, N, token_z]``, ``m`` ``[B, S, N, msa_s]``, ``token_mask`` the
*pair* mask ``[B, N, N]`` (Boltz's name, Boltz's usage), ``msa_mask`` ``[B, S, N]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from foldops._checks import as_bool_mask, check_layer_input, check_tensor
from foldops.backends import AUTO
from foldops.nn.dropout import check_dropout_rate, dropout_residual
from foldops.nn.outer_product_mean import OuterProductMean
from foldops.nn.pair_weighted_averaging import PairWeightedAveraging
from foldops.nn.pairformer import PairformerNoSeqLayer
from foldops.nn.transition import Transition


class MSALayer(nn.Module):
    """MSA block: pair-weighted averaging and transition on the MSA, outer product mean
    into the pair, then a Pairformer block without single track on the pair.

    Args:
        msa_s, token_z: MSA and pair channels.
        msa_dropout: row-wise dropout (whole MSA rows) of the pair-weighted averaging update.
        z_dropout: dropout of the pair block's updates.
        pairwise_head_width, pairwise_num_heads: triangle attention D and H.
        backend: backend for every op of the block.
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(
        self,
        msa_s: int,
        token_z: int,
        msa_dropout: float,
        z_dropout: float,
        pairwise_head_width: int = 32,
        pairwise_num_heads: int = 4,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"backend": backend, "device": device, "dtype": dtype}
        self.msa_s = msa_s
        self.token_z = token_z
        self.msa_dropout = check_dropout_rate("msa_dropout", msa_dropout)
        self.msa_transition = Transition(dim=msa_s, hidden=msa_s * 4, **factory)
        # Boltz-2 fixes these widths: 8 heads of 32 for the averaging, 32 for the outer product.
        self.pair_weighted_averaging = PairWeightedAveraging(c_m=msa_s, c_z=token_z, c_h=32, num_heads=8, **factory)
        self.pairformer_layer = PairformerNoSeqLayer(
            token_z=token_z,
            dropout=z_dropout,
            pairwise_head_width=pairwise_head_width,
            pairwise_num_heads=pairwise_num_heads,
            **factory,
        )
        self.outer_product_mean = OuterProductMean(c_in=msa_s, c_hidden=32, c_out=token_z, **factory)

    def forward(
        self,
        z: Tensor,
        m: Tensor,
        token_mask: Tensor,
        msa_mask: Tensor,
        chunk_heads_pwa: bool = False,
        chunk_size_transition_z: Optional[int] = None,
        chunk_size_transition_msa: Optional[int] = None,
        chunk_size_outer_product: Optional[int] = None,
        chunk_size_tri_attn: Optional[int] = None,
        use_kernels: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Args:
            z: ``[B, N, N, token_z]``; m: ``[B, S, N, msa_s]``.
            token_mask: pair mask ``[B, N, N]``; msa_mask: ``[B, S, N]``.
            chunk_*: Boltz's inference chunking knobs (``chunk_size_transition_z`` is
                accepted and, as in Boltz, unused).
            use_kernels: accepted for Boltz compatibility; kernels follow ``backend``.

        Returns:
            ``(z, m)`` with the input shapes.
        """
        check_tensor("z", z, (None, None, None, self.token_z))
        check_tensor("m", m, (z.shape[0], None, z.shape[1], self.msa_s), device=z.device)
        check_layer_input("z", z, self.pair_weighted_averaging.norm_z.weight)
        check_layer_input("m", m, self.pair_weighted_averaging.norm_m.weight)
        batch, rows, n = m.shape[:3]
        token_mask = as_bool_mask("token_mask", token_mask, (batch, n, n), z.device)
        msa_mask = as_bool_mask("msa_mask", msa_mask, (batch, rows, n), z.device)
        m = dropout_residual(
            m, self.pair_weighted_averaging(m, z, token_mask, chunk_heads_pwa), self.msa_dropout, self.training
        )
        m = m + self.msa_transition(m, chunk_size_transition_msa)
        z = z + self.outer_product_mean(m, msa_mask, chunk_size_outer_product)
        z = self.pairformer_layer(z, token_mask, chunk_size_tri_attn, use_kernels=use_kernels)
        return z, m
