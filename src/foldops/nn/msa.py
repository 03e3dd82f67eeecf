"""Boltz-2's MSA module (``boltz.model.modules.trunkv2.MSAModule``) and its block (``MSALayer``).

Same constructor arguments, forward signatures and state-dict keys (module:
``s_proj``, ``msa_proj``, ``layers.<i>.*``; block: ``msa_transition``,
``pair_weighted_averaging``, ``pairformer_layer``, ``outer_product_mean``), so Boltz
checkpoints load with ``strict=True``.

Shapes: ``z`` ``[B, N, N, token_z]``, ``m`` ``[B, S, N, msa_s]``, ``token_mask`` the
*pair* mask ``[B, N, N]`` (Boltz's name, Boltz's usage), ``msa_mask`` ``[B, S, N]``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from foldops._checks import as_bool_mask, check_layer_input, check_positive_int, check_tensor
from foldops.backends import AUTO
from foldops.nn.dropout import check_dropout_rate, dropout_residual
from foldops.nn.outer_product_mean import OuterProductMean
from foldops.nn.pair_weighted_averaging import PairWeightedAveraging
from foldops.nn.pairformer import CHUNK_SIZE_LARGE, CHUNK_SIZE_SMALL, CHUNK_SIZE_THRESHOLD, PairformerNoSeqLayer, _Stack
from foldops.nn.transition import Transition


class MSALayer(nn.Module):
    """MSA block: pair-weighted averaging and transition on the MSA, outer product mean
    into the pair, then a Pairformer block without single track on the pair.

    Args:
        msa_s, token_z: MSA and pair channels.
        msa_dropout: row-wise dropout (whole MSA rows) of the pair-weighted averaging update.
        z_dropout: dropout of the pair block's updates.
        pairwise_head_width, pairwise_num_heads: triangle attention D and H.
        backend: backend for every op of the block that has it (the others take ``"auto"``).
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


# Boltz-2's vocabulary (boltz.data.const.num_tokens): the one-hot width of ``feats["msa"]``.
NUM_TOKENS = 33


class MSAModule(_Stack):
    """Boltz-2's MSA module: embeds the MSA features and runs ``msa_blocks`` ``MSALayer``.

    Args:
        msa_s, token_z, token_s: MSA, pair and single channels.
        msa_blocks: number of ``MSALayer`` blocks.
        msa_dropout, z_dropout, pairwise_head_width, pairwise_num_heads: as ``MSALayer``.
        activation_checkpointing: recompute each block in backward (training only).
        use_paired_feature: the ``msa_paired`` feature is an input channel.
        subsample_msa, num_subsampled_msa: keep a random ``num_subsampled_msa`` rows.
        offload_to_cpu: with ``activation_checkpointing``, keep saved block inputs in host memory.
        num_tokens: one-hot width of ``feats["msa"]`` (Boltz-2: 33).
        chunk_size_threshold: above this many tokens, inference uses the "large" chunking
            below (Boltz-2: 384).
        chunk_size_small, chunk_size_large: triangle-attention rows per step at inference
            at or below / above the threshold (Boltz-2: 512 / 128).
        chunk_size_transition_msa, chunk_size_outer_product, chunk_heads_pwa: inference
            chunking of the MSA transition, outer product mean and pair-weighted averaging
            above the threshold (Boltz-2: 32 / 4 / True); below it none.
        backend, device, dtype: as ``MSALayer``.
        **kwargs: accepted and ignored (with a warning), as Boltz does.

    State-dict keys: ``s_proj.weight``, ``msa_proj.weight``, ``layers.<i>.*``.
    """

    def __init__(
        self,
        msa_s: int,
        token_z: int,
        token_s: int,
        msa_blocks: int,
        msa_dropout: float,
        z_dropout: float,
        pairwise_head_width: int = 32,
        pairwise_num_heads: int = 4,
        activation_checkpointing: bool = False,
        use_paired_feature: bool = True,
        subsample_msa: bool = False,
        num_subsampled_msa: int = 1024,
        *,
        offload_to_cpu: bool = False,
        num_tokens: int = NUM_TOKENS,
        chunk_size_threshold: int = CHUNK_SIZE_THRESHOLD,
        chunk_size_small: Optional[int] = CHUNK_SIZE_SMALL,
        chunk_size_large: Optional[int] = CHUNK_SIZE_LARGE,
        chunk_size_transition_msa: Optional[int] = 32,
        chunk_size_outer_product: Optional[int] = 4,
        chunk_heads_pwa: bool = True,
        backend: str = AUTO,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        super().__init__()
        from foldops.nn.pairformer import _warn_ignored

        _warn_ignored(type(self).__name__, kwargs)
        for name, value in (("msa_s", msa_s), ("token_z", token_z), ("token_s", token_s), ("msa_blocks", msa_blocks)):
            check_positive_int(name, value, allow_none=False)
        check_positive_int("num_subsampled_msa", num_subsampled_msa, allow_none=False)
        self.msa_blocks = msa_blocks
        self.msa_dropout = msa_dropout
        self.z_dropout = z_dropout
        self.use_paired_feature = use_paired_feature
        self.subsample_msa = subsample_msa
        self.num_subsampled_msa = num_subsampled_msa
        self.num_tokens = check_positive_int("num_tokens", num_tokens, allow_none=False)
        self.chunk_size_transition_msa = check_positive_int("chunk_size_transition_msa", chunk_size_transition_msa)
        self.chunk_size_outer_product = check_positive_int("chunk_size_outer_product", chunk_size_outer_product)
        self.chunk_heads_pwa = bool(chunk_heads_pwa)
        self._init_stack(
            activation_checkpointing, chunk_size_threshold, chunk_size_small, chunk_size_large, offload_to_cpu
        )
        factory = {"device": device, "dtype": dtype}
        self.s_proj = nn.Linear(token_s, msa_s, bias=False, **factory)
        self.msa_proj = nn.Linear(num_tokens + 2 + int(use_paired_feature), msa_s, bias=False, **factory)
        self.layers = nn.ModuleList(
            MSALayer(
                msa_s,
                token_z,
                msa_dropout,
                z_dropout,
                pairwise_head_width,
                pairwise_num_heads,
                backend=backend,
                **factory,
            )
            for _ in range(msa_blocks)
        )

    def inference_chunks(self, n: int) -> Tuple:
        """The chunking arguments of every block for N tokens, in ``MSALayer.forward``'s
        order (``chunk_heads_pwa`` .. ``chunk_size_tri_attn``): Boltz-2's rule in eval,
        none in training."""
        if self.training:
            return (False, None, None, None, None)
        if n > self.chunk_size_threshold:
            return (self.chunk_heads_pwa, None, self.chunk_size_transition_msa, self.chunk_size_outer_product,
                    self.chunk_size_large)
        return (False, None, None, None, self.chunk_size_small)

    def forward(self, z: Tensor, emb: Tensor, feats: Dict[str, Tensor], use_kernels: bool = False) -> Tensor:
        """Args:
            z: pair ``[B, N, N, token_z]``; emb: single input ``[B, N, token_s]``.
            feats: ``msa`` int ``[B, S, N]`` (token ids), ``has_deletion``,
                ``deletion_value``, ``msa_paired`` (if ``use_paired_feature``) and
                ``msa_mask`` ``[B, S, N]``, ``token_pad_mask`` ``[B, N]``.
            use_kernels: accepted for Boltz compatibility; kernels follow ``backend``.

        Returns:
            ``z`` ``[B, N, N, token_z]``.
        """
        check_tensor("z", z, (None, None, None, self.layers[0].token_z))
        for key in ("msa", "has_deletion", "deletion_value", "msa_mask", "token_pad_mask"):
            if key not in feats:
                raise ValueError(f"feats: expected a {key!r} entry")
        msa = feats["msa"]
        if msa.is_floating_point():
            raise TypeError(f"feats['msa']: expected integer token ids [B, S, N], got dtype {msa.dtype}")
        token_mask = feats["token_pad_mask"].float()
        pair_mask = token_mask[:, :, None] * token_mask[:, None, :]
        msa_mask = feats["msa_mask"]
        columns = [
            nn.functional.one_hot(msa, num_classes=self.num_tokens),
            feats["has_deletion"].unsqueeze(-1),
            feats["deletion_value"].unsqueeze(-1),
        ]
        if self.use_paired_feature:
            columns.append(feats["msa_paired"].unsqueeze(-1))
        m = torch.cat(columns, dim=-1)
        if self.subsample_msa:
            keep = torch.randperm(msa.shape[1])[: self.num_subsampled_msa]
            m, msa_mask = m[:, keep], msa_mask[:, keep]
        m = self.msa_proj(m.to(self.msa_proj.weight.dtype))
        m = m + self.s_proj(emb).unsqueeze(1)

        batch, rows, n = m.shape[:3]
        # Masks become bool once here, not per block.
        pair_mask = as_bool_mask("token_pad_mask", pair_mask, (batch, n, n), z.device)
        msa_mask = as_bool_mask("msa_mask", msa_mask, (batch, rows, n), z.device)
        chunks = self.inference_chunks(z.shape[1])
        for layer in self.layers:
            z, m = self._run(layer, z, m, pair_mask, msa_mask, *chunks, use_kernels)
        return z
