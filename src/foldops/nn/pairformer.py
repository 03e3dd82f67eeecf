"""The Pairformer (AF3 Algorithm 17) as in Boltz-2: layers and stacks.

Constructor arguments, forward signatures and state-dict keys are Boltz-2's
(``boltz.model.layers.pairformer``): a Boltz ``PairformerModule`` checkpoint loads into
``PairformerStack`` (alias ``PairformerModule``) with ``strict=True``.

What differs, by design:

- The fp32-guarded sequence stack uses ``foldops.device.fp32_region``. Boltz turns
  autocast off for NVIDIA GPUs only, which guards nothing on CPU, XPU or MPS, so there
  its sequence stack silently runs in bf16 under autocast.
- Dropout masks are drawn as Boltz draws them (same shapes, same order), but not at all
  in eval mode or when the rate is 0 (same values, one pass over z fewer per update).
- Padding: rows of a triangle attention whose keys are all masked give zeros (Boltz
  gives an average over masked keys there); unmasked positions never see padding.
- ``use_kernels`` / ``use_cuequiv_*`` are accepted and ignored: kernels are chosen by
  ``backend`` (``"auto"`` takes foldops's Triton kernels where they can run).

Shapes: ``s`` ``[B, N, token_s]``, ``z`` ``[B, N, N, token_z]``, ``mask`` ``[B, N]``,
``pair_mask`` ``[B, N, N]`` (True/1 = keep).
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from foldops._checks import as_bool_mask, check_layer_input, check_positive_int, check_tensor
from foldops.backends import AUTO
from foldops.device import fp32_region
from foldops.nn.attention_pair_bias import AttentionPairBias
from foldops.nn.dropout import check_dropout_rate, dropout_residual
from foldops.nn.transition import Transition
from foldops.nn.triangle_attention import TriangleAttentionEndingNode, TriangleAttentionStartingNode
from foldops.nn.triangle_multiplication import TriangleMultiplicationIncoming, TriangleMultiplicationOutgoing

# Boltz-2 (boltz.data.const.chunk_size_threshold and PairformerModule.forward): at
# inference, triangle attention runs 128 rows at a time above 384 tokens, else 512.
CHUNK_SIZE_THRESHOLD = 384
CHUNK_SIZE_SMALL = 512
CHUNK_SIZE_LARGE = 128


def _warn_ignored(cls: str, kwargs: dict) -> None:
    if kwargs:
        warnings.warn(f"{cls}: ignoring arguments {sorted(kwargs)} (accepted for Boltz compatibility)", stacklevel=3)


class _PairStack(nn.Module):
    """The pair half of a Pairformer layer: triangle updates, triangle attention, transition."""

    def _build_pair_stack(self, token_z, pairwise_head_width, pairwise_num_heads, backend, factory, token_s=None):
        # Registration order = Boltz's state-dict order (transition_s, if any, before transition_z).
        self.tri_mul_out = TriangleMultiplicationOutgoing(token_z, backend=backend, **factory)
        self.tri_mul_in = TriangleMultiplicationIncoming(token_z, backend=backend, **factory)
        self.tri_att_start = TriangleAttentionStartingNode(
            token_z, pairwise_head_width, pairwise_num_heads, inf=1e9, backend=backend, **factory
        )
        self.tri_att_end = TriangleAttentionEndingNode(
            token_z, pairwise_head_width, pairwise_num_heads, inf=1e9, backend=backend, **factory
        )
        if token_s is not None:
            self.transition_s = Transition(token_s, token_s * 4, backend=backend, **factory)
        self.transition_z = Transition(token_z, token_z * 4, backend=backend, **factory)

    def _pair_stack(self, z: Tensor, pair_mask: Tensor, chunk_size_tri_attn: Optional[int]) -> Tensor:
        updates = (
            (lambda z: self.tri_mul_out(z, mask=pair_mask), False),
            (lambda z: self.tri_mul_in(z, mask=pair_mask), False),
            (lambda z: self.tri_att_start(z, mask=pair_mask, chunk_size=chunk_size_tri_attn), False),
            (lambda z: self.tri_att_end(z, mask=pair_mask, chunk_size=chunk_size_tri_attn), True),
            (lambda z: self.transition_z(z), None),
        )
        owned = False  # whether z is an intermediate of ours (never the caller's tensor)
        for update_fn, columnwise in updates:
            update = update_fn(z)
            if columnwise is None or not self.training or self.dropout == 0.0:
                if owned and not torch.is_grad_enabled() and torch.promote_types(z.dtype, update.dtype) == z.dtype:
                    z.add_(update)  # inference: one N^2 x C buffer fewer at every step
                else:
                    z = z + update
            else:
                z = dropout_residual(z, update, self.dropout, self.training, columnwise)
            del update
            owned = True
        return z


def _check_pair(z: Tensor, token_z: int, parameter: Tensor) -> None:
    check_tensor("z", z, (None, None, None, token_z))
    if z.shape[1] != z.shape[2]:
        raise ValueError(f"z: expected shape (B, N, N, {token_z}), got {tuple(z.shape)}")
    check_layer_input("z", z, parameter)


class PairformerLayer(_PairStack):
    """One Pairformer block (Boltz-2 ``PairformerLayer``, ``v2=True``).

    Args:
        token_s, token_z: single and pair channels.
        num_heads: heads of the single-track attention with pair bias.
        dropout: row/column-wise dropout rate of the pair updates (training only).
        pairwise_head_width, pairwise_num_heads: triangle attention D and H.
        post_layer_norm: LayerNorm on the single track after the block.
        v2: must be True: Boltz-2's layer (Boltz's own ``v2=False`` layer cannot run its forward).
        backend: backend for every op of the block that has it (``"auto"``, ``"triton"``,
            ``"torch"``, ...); the others take ``"auto"`` (``foldops.backends.for_op``).
        device, dtype: factory kwargs for the parameters.
    """

    def __init__(
        self,
        token_s: int,
        token_z: int,
        num_heads: int = 16,
        dropout: float = 0.25,
        pairwise_head_width: int = 32,
        pairwise_num_heads: int = 4,
        post_layer_norm: bool = False,
        v2: bool = True,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not v2:
            raise ValueError(
                "v2: only v2=True (Boltz-2's PairformerLayer) is supported; Boltz's v2=False layer "
                "passes k_in to the v1 attention, which does not take it"
            )
        check_positive_int("token_s", token_s, allow_none=False)
        check_positive_int("token_z", token_z, allow_none=False)
        factory = {"device": device, "dtype": dtype}
        self.token_s = token_s
        self.token_z = token_z
        self.dropout = check_dropout_rate("dropout", dropout)
        self.num_heads = num_heads
        self.post_layer_norm = post_layer_norm
        self.backend = backend

        self.pre_norm_s = nn.LayerNorm(token_s, **factory)
        self.attention = AttentionPairBias(token_s, token_z, num_heads, backend=backend, **factory)
        self._build_pair_stack(token_z, pairwise_head_width, pairwise_num_heads, backend, factory, token_s)
        self.s_post_norm = nn.LayerNorm(token_s, **factory) if post_layer_norm else nn.Identity()

    def forward(
        self,
        s: Tensor,
        z: Tensor,
        mask: Tensor,
        pair_mask: Tensor,
        chunk_size_tri_attn: Optional[int] = None,
        use_kernels: bool = False,
        use_cuequiv_mul: bool = False,
        use_cuequiv_attn: bool = False,
    ) -> Tuple[Tensor, Tensor]:
        """Returns ``(s, z)``: ``s`` ``[B, N, token_s]`` in fp32 (fp64 if given fp64), ``z``
        ``[B, N, N, token_z]``.

        ``chunk_size_tri_attn``: triangle-attention rows per step at inference (None: a
        memory-bounded default).
        """
        _check_pair(z, self.token_z, self.tri_mul_out.norm_in.weight)
        batch, n = z.shape[:2]
        check_tensor("s", s, (batch, n, self.token_s), device=z.device)
        if self.pre_norm_s.weight.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"PairformerLayer: parameters in {self.pre_norm_s.weight.dtype} are not supported: the single "
                "track runs in float32 (as Boltz's); keep the parameters float32 and use torch.autocast for "
                "half-precision compute"
            )
        check_layer_input("s", s, self.pre_norm_s.weight, promoted=True)
        mask = as_bool_mask("mask", mask, (batch, n), z.device)
        pair_mask = as_bool_mask("pair_mask", pair_mask, (batch, n, n), z.device)
        check_positive_int("chunk_size_tri_attn", chunk_size_tri_attn)
        z = self._pair_stack(z, pair_mask, chunk_size_tri_attn)

        # The sequence stack runs in fp32 (fp64 for fp64 inputs) on every device, autocast or not.
        with fp32_region(s):
            s = s.to(torch.promote_types(s.dtype, torch.float32))
            s_normed = self.pre_norm_s(s)
            z_seq = z.to(torch.promote_types(z.dtype, torch.float32))
            s = s + self.attention(s=s_normed, z=z_seq, mask=mask, k_in=s_normed)
            s = s + self.transition_s(s)
            s = self.s_post_norm(s)
        return s, z


class PairformerNoSeqLayer(_PairStack):
    """A Pairformer block without the single track (Boltz-2 ``PairformerNoSeqLayer``)."""

    def __init__(
        self,
        token_z: int,
        dropout: float = 0.25,
        pairwise_head_width: int = 32,
        pairwise_num_heads: int = 4,
        post_layer_norm: bool = False,
        *,
        backend: str = AUTO,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("token_z", token_z, allow_none=False)
        factory = {"device": device, "dtype": dtype}
        self.token_z = token_z
        self.dropout = check_dropout_rate("dropout", dropout)
        self.post_layer_norm = post_layer_norm  # Boltz stores it and never uses it
        self.backend = backend
        self._build_pair_stack(token_z, pairwise_head_width, pairwise_num_heads, backend, factory)

    def forward(
        self,
        z: Tensor,
        pair_mask: Tensor,
        chunk_size_tri_attn: Optional[int] = None,
        use_kernels: bool = False,
        use_cuequiv_mul: bool = False,
        use_cuequiv_attn: bool = False,
    ) -> Tensor:
        """``z`` ``[B, N, N, token_z]``, ``pair_mask`` ``[B, N, N]`` -> ``z``."""
        _check_pair(z, self.token_z, self.tri_mul_out.norm_in.weight)
        batch, n = z.shape[:2]
        pair_mask = as_bool_mask("pair_mask", pair_mask, (batch, n, n), z.device)
        check_positive_int("chunk_size_tri_attn", chunk_size_tri_attn)
        return self._pair_stack(z, pair_mask, chunk_size_tri_attn)


class _CallLayer(nn.Module):
    """A parameterless stand-in that calls ``layer`` (held unregistered), so that
    ``foldops.compat.checkpoint_wrapper`` can checkpoint one call without changing ``layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.__dict__["layer"] = layer

    def forward(self, *args):
        return self.layer(*args)


class _Stack(nn.Module):
    def _init_stack(
        self, activation_checkpointing, chunk_size_threshold, chunk_size_small, chunk_size_large, offload_to_cpu=False
    ):
        if not isinstance(offload_to_cpu, bool):
            raise TypeError(f"offload_to_cpu: expected a bool, got {type(offload_to_cpu).__name__}")
        self.activation_checkpointing = activation_checkpointing
        self.offload_to_cpu = offload_to_cpu
        self.chunk_size_threshold = chunk_size_threshold
        self.chunk_size_small = check_positive_int("chunk_size_small", chunk_size_small)
        self.chunk_size_large = check_positive_int("chunk_size_large", chunk_size_large)

    def inference_chunk_size(self, n: int) -> Optional[int]:
        """Triangle-attention rows per step for N tokens: Boltz's rule in eval, None in training."""
        if self.training:
            return None
        return self.chunk_size_large if n > self.chunk_size_threshold else self.chunk_size_small

    def _run(self, layer, *args):
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that need no grad, kwargs, and restores the
            # RNG state, so recomputed dropout masks equal the first ones.
            if self.offload_to_cpu:
                # The saved block inputs wait in host memory until backward.
                from foldops.compat.activation_checkpoint import checkpoint_wrapper

                return checkpoint_wrapper(_CallLayer(layer), offload_to_cpu=True)(*args)
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class PairformerStack(_Stack):
    """``num_blocks`` Pairformer layers: Boltz-2's ``PairformerModule`` (keys ``layers.<i>.*``).

    Args:
        token_s, token_z, num_blocks, num_heads, dropout, pairwise_head_width,
        pairwise_num_heads, post_layer_norm, v2: as ``PairformerLayer`` / Boltz.
        activation_checkpointing: recompute each block in backward (training only),
            with non-reentrant ``torch.utils.checkpoint``.
        offload_to_cpu: with ``activation_checkpointing``, keep each block's saved inputs
            in host memory until backward (``foldops.compat.checkpoint_wrapper``'s
            offload; Boltz's configs pass it).
        chunk_size_threshold, chunk_size_small, chunk_size_large: at inference, triangle
            attention runs ``chunk_size_large`` rows per step above ``chunk_size_threshold``
            tokens, else ``chunk_size_small`` (Boltz-2's 384 / 512 / 128); None lets the
            layer pick a memory-bounded size.
        backend, device, dtype: as ``PairformerLayer``.
        **kwargs: accepted and ignored (with a warning), as Boltz does.
    """

    def __init__(
        self,
        token_s: int,
        token_z: int,
        num_blocks: int,
        num_heads: int = 16,
        dropout: float = 0.25,
        pairwise_head_width: int = 32,
        pairwise_num_heads: int = 4,
        post_layer_norm: bool = False,
        activation_checkpointing: bool = False,
        v2: bool = True,
        *,
        chunk_size_threshold: int = CHUNK_SIZE_THRESHOLD,
        chunk_size_small: Optional[int] = CHUNK_SIZE_SMALL,
        chunk_size_large: Optional[int] = CHUNK_SIZE_LARGE,
        offload_to_cpu: bool = False,
        backend: str = AUTO,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        super().__init__()
        _warn_ignored(type(self).__name__, kwargs)
        check_positive_int("num_blocks", num_blocks, allow_none=False)
        self.token_z = token_z
        self.num_blocks = num_blocks
        self.dropout = dropout
        self.num_heads = num_heads
        self.post_layer_norm = post_layer_norm
        self._init_stack(
            activation_checkpointing, chunk_size_threshold, chunk_size_small, chunk_size_large, offload_to_cpu
        )
        self.layers = nn.ModuleList(
            PairformerLayer(
                token_s,
                token_z,
                num_heads,
                dropout,
                pairwise_head_width,
                pairwise_num_heads,
                post_layer_norm,
                v2,
                backend=backend,
                device=device,
                dtype=dtype,
            )
            for _ in range(num_blocks)
        )

    def forward(
        self, s: Tensor, z: Tensor, mask: Tensor, pair_mask: Tensor, use_kernels: bool = False
    ) -> Tuple[Tensor, Tensor]:
        """``s`` ``[B, N, token_s]``, ``z`` ``[B, N, N, token_z]``, ``mask`` ``[B, N]``,
        ``pair_mask`` ``[B, N, N]`` -> ``(s, z)``."""
        _check_pair(z, self.layers[0].token_z, self.layers[0].tri_mul_out.norm_in.weight)
        batch, n = z.shape[:2]
        # Masks become bool once here: the layers then check nothing (no host sync per layer).
        mask = as_bool_mask("mask", mask, (batch, n), z.device)
        pair_mask = as_bool_mask("pair_mask", pair_mask, (batch, n, n), z.device)
        chunk_size = self.inference_chunk_size(z.shape[1])
        for layer in self.layers:
            s, z = self._run(layer, s, z, mask, pair_mask, chunk_size, use_kernels)
        return s, z


PairformerModule = PairformerStack


class PairformerNoSeqModule(_Stack):
    """``num_blocks`` ``PairformerNoSeqLayer``: Boltz-2's ``PairformerNoSeqModule``
    (templates, affinity). Arguments as ``PairformerStack``."""

    def __init__(
        self,
        token_z: int,
        num_blocks: int,
        dropout: float = 0.25,
        pairwise_head_width: int = 32,
        pairwise_num_heads: int = 4,
        post_layer_norm: bool = False,
        activation_checkpointing: bool = False,
        *,
        chunk_size_threshold: int = CHUNK_SIZE_THRESHOLD,
        chunk_size_small: Optional[int] = CHUNK_SIZE_SMALL,
        chunk_size_large: Optional[int] = CHUNK_SIZE_LARGE,
        offload_to_cpu: bool = False,
        backend: str = AUTO,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        super().__init__()
        _warn_ignored(type(self).__name__, kwargs)
        check_positive_int("num_blocks", num_blocks, allow_none=False)
        self.token_z = token_z
        self.num_blocks = num_blocks
        self.dropout = dropout
        self.post_layer_norm = post_layer_norm
        self._init_stack(
            activation_checkpointing, chunk_size_threshold, chunk_size_small, chunk_size_large, offload_to_cpu
        )
        self.layers = nn.ModuleList(
            PairformerNoSeqLayer(
                token_z,
                dropout,
                pairwise_head_width,
                pairwise_num_heads,
                post_layer_norm,
                backend=backend,
                device=device,
                dtype=dtype,
            )
            for _ in range(num_blocks)
        )

    def forward(self, z: Tensor, pair_mask: Tensor, use_kernels: bool = False) -> Tensor:
        """``z`` ``[B, N, N, token_z]``, ``pair_mask`` ``[B, N, N]`` -> ``z``."""
        _check_pair(z, self.layers[0].token_z, self.layers[0].tri_mul_out.norm_in.weight)
        batch, n = z.shape[:2]
        pair_mask = as_bool_mask("pair_mask", pair_mask, (batch, n, n), z.device)  # once, not per layer
        chunk_size = self.inference_chunk_size(z.shape[1])
        for layer in self.layers:
            z = self._run(layer, z, pair_mask, chunk_size, use_kernels)
        return z
