"""A configurable trunk: a sequence of blocks chosen by type, for representation enrichment.

IPA-based design models (FrameFlow, Multiflow) enrich their single and pair tracks
with IPA blocks; a trunk here may mix in Pairformer blocks or the cheaper single-track
attention with pair bias:

- ``BlockType.IPA``: ``s = LN(s + IPA(s, z, frames))``, a SwiGLU transition, then the
  frame update (AlphaFold 2's backbone update: a linear map to a quaternion
  ``(1, b, c, d)`` and a translation, masked at padded residues, composed on the right).
  Only these blocks move frames.
- ``BlockType.PAIRFORMER``: ``foldops.nn.PairformerLayer`` (Boltz-2's block: triangle
  multiplication and attention on z, attention with pair bias on s).
- ``BlockType.PAIR_ATTENTION``: ``s = s + AttentionPairBias(LN(s), z)`` and a SwiGLU
  transition; z is read, never written: the cheap invariant option.

``Trunk(c_s, c_z, blocks, configs=None, backend="auto")`` builds ``blocks`` in order;
each type's constructor arguments start from ``DEFAULT_CONFIGS[type]``, shared by all
blocks of that type, updated by ``configs[type]``. One ``backend`` reaches every op.
"""

from __future__ import annotations

import copy
import enum
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from foldops._checks import as_bool_mask, check_positive_int, check_tensor
from foldops.backends import AUTO
from foldops.nn import _init
from foldops.nn.attention_pair_bias import AttentionPairBias
from foldops.nn.invariant_point_attention import InvariantPointAttention
from foldops.nn.pairformer import PairformerLayer
from foldops.nn.rigid import Rigid, as_rigid
from foldops.nn.transition import Transition


class BlockType(str, enum.Enum):
    """Kinds of trunk block (their values are what configs and strings name them by)."""

    IPA = "ipa"
    PAIRFORMER = "pairformer"
    PAIR_ATTENTION = "pair_attention"


DEFAULT_CONFIGS: Dict[BlockType, Dict[str, Any]] = {
    # FrameFlow-size IPA (the benchmark's shape): 12 heads of 16 channels, 4 / 8 points.
    BlockType.IPA: {"c_hidden": 16, "no_heads": 12, "no_qk_points": 4, "no_v_points": 8, "transition_factor": 4},
    # Boltz-2's PairformerLayer defaults.
    BlockType.PAIRFORMER: {"num_heads": 16, "dropout": 0.25, "pairwise_head_width": 32, "pairwise_num_heads": 4},
    # Boltz-2's single-track attention with pair bias.
    BlockType.PAIR_ATTENTION: {"num_heads": 16, "transition_factor": 4},
}


class IPABlock(nn.Module):
    """IPA, residual + LayerNorm, transition, backbone update."""

    moves_frames = True

    def __init__(self, c_s: int, c_z: int, c_hidden: int, no_heads: int, no_qk_points: int, no_v_points: int,
                 transition_factor: int = 4, *, backend: str = AUTO, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.ipa = InvariantPointAttention(c_s, c_z, c_hidden, no_heads, no_qk_points, no_v_points,
                                           backend=backend, **factory)
        self.ipa_ln = nn.LayerNorm(c_s, **factory)
        self.transition = Transition(c_s, transition_factor * c_s, backend=backend, **factory)
        self.bb_update = nn.Linear(c_s, 6, **factory)
        _init.zeros_(self.bb_update.weight)  # frames start unchanged (AlphaFold 2's "final" init)
        _init.zeros_(self.bb_update.bias)

    def forward(self, s: Tensor, z: Tensor, frames: Any, mask: Tensor, pair_mask: Tensor):
        s = self.ipa_ln(s + self.ipa(s, z, frames, mask))
        s = s + self.transition(s)
        update = self.bb_update(s).to(frames.trans.dtype if isinstance(frames, Rigid) else s.dtype)
        frames = frames.compose_q_update_vec(update * mask[..., None].to(update.dtype))
        return s, z, frames


class PairformerBlock(nn.Module):
    moves_frames = False

    def __init__(self, c_s: int, c_z: int, *, backend: str = AUTO, device=None, dtype=None, **config) -> None:
        super().__init__()
        self.layer = PairformerLayer(c_s, c_z, backend=backend, device=device, dtype=dtype, **config)

    def forward(self, s, z, frames, mask, pair_mask):
        s, z = self.layer(s, z, mask, pair_mask)
        return s, z, frames


class PairAttentionBlock(nn.Module):
    moves_frames = False

    def __init__(self, c_s: int, c_z: int, num_heads: int = 16, transition_factor: int = 4, *,
                 backend: str = AUTO, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.norm = nn.LayerNorm(c_s, **factory)
        self.attention = AttentionPairBias(c_s, c_z, num_heads, backend=backend, **factory)
        self.transition = Transition(c_s, transition_factor * c_s, backend=backend, **factory)

    def forward(self, s, z, frames, mask, pair_mask):
        normed = self.norm(s)
        s = s + self.attention(normed, z, mask, k_in=normed)
        s = s + self.transition(s)
        return s, z, frames


_BLOCKS = {BlockType.IPA: IPABlock, BlockType.PAIRFORMER: PairformerBlock,
           BlockType.PAIR_ATTENTION: PairAttentionBlock}


def _block_type(value: Union[str, BlockType], where: str) -> BlockType:
    try:
        return BlockType(value)
    except ValueError:
        raise ValueError(f"{where}: expected one of {[t.value for t in BlockType]}, got {value!r}") from None


class Trunk(nn.Module):
    """A sequence of blocks by type (see the module doc).

    Args:
        c_s, c_z: single and pair channels.
        blocks: block types in order, e.g. ``["ipa", "pairformer", "ipa"]``.
        configs: per type, constructor arguments that replace ``DEFAULT_CONFIGS``'.
        backend: backend of every op in every block.
        device, dtype: factory kwargs.
    """

    def __init__(self, c_s: int, c_z: int, blocks: Sequence[Union[str, BlockType]],
                 configs: Optional[Mapping[Union[str, BlockType], Mapping[str, Any]]] = None, *,
                 backend: str = AUTO, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("c_s", c_s, allow_none=False)
        check_positive_int("c_z", c_z, allow_none=False)
        if isinstance(blocks, (str, BlockType)) or not len(blocks):
            raise ValueError(f"blocks: expected a non-empty sequence of block types, got {blocks!r}")
        merged = copy.deepcopy(DEFAULT_CONFIGS)
        for key, overrides in (configs or {}).items():
            merged[_block_type(key, "configs")].update(overrides)
        self.c_s, self.c_z = c_s, c_z
        self.block_types = [_block_type(b, f"blocks[{i}]") for i, b in enumerate(blocks)]
        self.configs = merged
        self.blocks = nn.ModuleList(
            _BLOCKS[t](c_s, c_z, backend=backend, device=device, dtype=dtype, **merged[t]) for t in self.block_types
        )

    def forward(self, s: Tensor, z: Tensor, frames: Any = None, mask: Optional[Tensor] = None
                ) -> Tuple[Tensor, Tensor, Any]:
        """Args:
            s: ``[B, N, c_s]``; z: ``[B, N, N, c_z]``.
            frames: ``(rotations [B, N, 3, 3], translations [B, N, 3])``, a
                ``foldops.nn.Rigid`` or an OpenFold ``Rigid``; required when the trunk
                has IPA blocks, None (identity) allowed. With a mask, padded residues'
                frames (of the first two forms) may hold anything, zeros or NaN: they
                are replaced by the identity.
            mask: residue mask ``[B, N]`` (bool or 0/1 float), or None.

        Returns:
            ``(s, z, frames)``; frames as given when no IPA block ran (the identity at
            padded residues, see above), else a ``Rigid`` (or the OpenFold object's own
            type).
        """
        check_tensor("s", s, (None, None, self.c_s))
        batch, n = s.shape[:2]
        check_tensor("z", z, (batch, n, n, self.c_z), device=s.device)
        keep = None
        if mask is None:
            mask = torch.ones(batch, n, dtype=torch.bool, device=s.device)
        else:
            check_tensor("mask", mask, (batch, n), dtypes=None, device=s.device)
            keep = mask = as_bool_mask("mask", mask, (batch, n), s.device)
        # Bool masks for the blocks: a float mask would be checked (a host read) in each.
        pair_mask = mask[:, :, None] & mask[:, None, :]
        if frames is None and BlockType.IPA in self.block_types:
            frames = Rigid.identity((batch, n), dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)
        elif frames is not None:
            # Padded residues' frames may be placeholders: checked only at real residues,
            # the identity at padded ones (where the blocks' updates are masked).
            frames = as_rigid(frames, (batch, n), name="frames", mask=keep)
        for block in self.blocks:
            s, z, frames = block(s, z, frames, mask, pair_mask)
        return s, z, frames
