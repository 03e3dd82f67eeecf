"""SEDD's DDiT transformer (Score-Entropy Discrete Diffusion, Lou et al. 2024) on foldops.

Same classes, constructor config and state-dict keys as the original ``model/transformer.py``
and ``model/rotary.py`` (``SEDD``, ``DDiTBlock``, ``DDitFinalLayer``, ``TimestepEmbedder``,
``EmbeddingLayer``, ``Rotary``, ``LayerNorm``), so an original checkpoint loads with
``strict=True``. The config is a dict or an OmegaConf-like object with ``tokens``,
``graph.type`` ("absorb" adds the mask token to the vocabulary) and ``model.hidden_size``,
``n_heads``, ``n_blocks``, ``cond_dim``, ``dropout``, ``scale_by_sigma``.

What differs from the original (numerics otherwise follow it: fp32 residual stream and
LayerNorm, matmuls and attention in the autocast dtype):

- no flash_attn: attention is ``foldops.ops.varlen_attention`` (Triton on CUDA cc >= 8.0,
  PyTorch on any other device). Run so far on CPU and an NVIDIA H200; MPS, XPU and V100
  go through the op's ``torch`` backend, implemented but untested on that hardware;
- mixed precision on every device: ``amp_dtype="auto"`` (default) autocasts to bf16 on
  CUDA and leaves every other device in full precision, as the original behaves (its
  CUDA-only autocast does nothing elsewhere); ``amp_dtype=torch.bfloat16`` or
  ``torch.float16`` autocasts on any device, ``torch.float32`` turns autocast off inside
  the model, ``None`` leaves the caller's autocast state alone;
- variable-length batches: ``forward(indices, sigma, seqlens=None)`` with ``seqlens [B]``
  the number of real tokens at the start of each row. The model unpads once (``[total,
  hidden]`` for every layer), attends with ``cu_seqlens`` = [0, cumsum(seqlens)] (the
  original's ``seqlens.cumsum(-1)`` lacked the leading zero) and repads the logits once:
  padded positions cost no attention or matmul work, their logits are zeros, and every
  row's output equals that of the row run alone;
- the bias-dropout-add-scale and modulate steps are plain PyTorch functions
  (``bias_dropout_add_scale``, ``modulate_fused``) that ``torch.compile`` fuses into one
  pointwise kernel each (the original used TorchScript with CUDA fusion flags); on packed
  tokens the per-row adaLN factors are applied by ``models/_rows.py``, which keeps them at
  ``[B, C]`` for the backward pass instead of four gathered ``[total, C]`` copies per block;
- ``activation_checkpointing=True`` recomputes each block in the backward pass;
- ``torch.compile`` (``fullgraph=True`` too): while compiling ``seqlens`` is not read on
  the host, the batch keeps its padded layout with a key mask (see ``_Packing``).

Memory: O(total tokens x hidden) activations per block plus the attention op's own
(no ``[B, L, L]`` tensor on the Triton path).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from foldops import backends
from foldops import device as fdevice
from foldops.models._rows import gated_add_rows, modulate_rows

__all__ = [
    "DDiTBlock",
    "DDitFinalLayer",
    "EmbeddingLayer",
    "LayerNorm",
    "Rotary",
    "SEDD",
    "TimestepEmbedder",
    "bias_dropout_add_scale",
    "modulate_fused",
]

AmpDtype = Union[str, torch.dtype, None]


# Fused pointwise steps (compile-friendly: no data-dependent Python control flow) -----------

def modulate_fused(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` (adaLN modulation), in the promoted dtype of the inputs."""
    return torch.addcmul(shift, x, scale + 1)


def bias_dropout_add_scale(x: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                           residual: Optional[torch.Tensor], prob: float, training: bool) -> torch.Tensor:
    """``residual + scale * dropout(x + bias)`` (gated residual update of a DiT block)."""
    if bias is not None:
        x = x + bias
    out = scale * F.dropout(x, p=prob, training=training)
    return out if residual is None else residual + out


def _rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (non-interleaved halves) on q and k of ``qkv [..., 3, H, D]``.

    cos, sin: fp32, broadcastable to ``[..., 1, 1, D/2]``. Computed in fp32 (fp64 for fp64
    inputs), returned in qkv's dtype; v passes unchanged.
    """
    compute = torch.promote_types(qkv.dtype, torch.float32)
    qk = qkv[..., :2, :, :].to(compute)
    x1, x2 = qk.chunk(2, dim=-1)
    cos, sin = cos.to(compute), sin.to(compute)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(qkv.dtype)
    return torch.cat((rotated, qkv[..., 2:, :, :]), dim=-3)


# The batch layout -------------------------------------------------------------------------

class _Packing:
    """How a padded ``[B, L]`` batch is laid out inside the model.

    uniform (no ``seqlens``, or every row full): activations ``[B, L, C]``, per-row tensors
    broadcast as ``[B, 1, C]``. Otherwise packed: activations ``[total, C]`` holding only the
    real tokens (row-major), per-row tensors gathered per token through ``seq``.

    While torch.compile traces, ``seqlens`` are not read on the host (no graph break, one
    graph for every mix of lengths; their values are not checked): the layout stays
    uniform, attention masks the padded keys (``keep [B, L]``) and ``repad`` zeroes the
    padded positions. Padded tokens then cost work in the dense layers, as in the
    original model; the real tokens' outputs are the packed layout's.
    """

    def __init__(self, batch: int, length: int, seqlens: Optional[torch.Tensor], device: torch.device) -> None:
        self.batch, self.length = batch, length
        steps = torch.arange(batch + 1, device=device, dtype=torch.int32)
        positions = torch.arange(length, device=device)
        self.uniform = True
        self.cu_seqlens = steps * length
        self.max_seqlen = length
        self.index = self.seq = self.keep = None
        self.positions = positions  # [L] or [total]
        if seqlens is None:
            return
        lengths = seqlens.to(device=device, dtype=torch.long)
        if batch == 0:  # nothing to pack: the uniform layout's empty batch
            return
        if torch.compiler.is_compiling():
            self.keep = positions[None, :] < lengths[:, None]  # [B, L]
            return
        # the one host read per forward: the range check, max_seqlen and the token count
        lo, hi, total = torch.stack([lengths.min(), lengths.max(), lengths.sum()]).tolist()
        if lo < 1 or hi > length:
            raise ValueError(f"seqlens: expected values in [1, {length}] (the padded length), got min {lo}, max {hi}")
        if lo == length:
            return
        self.uniform = False
        keep = positions[None, :] < lengths[:, None]  # [B, L]
        self.index = _nonzero(keep.reshape(-1), total)  # [total] flat index into B*L
        self.seq = torch.div(self.index, length, rounding_mode="floor")
        self.positions = self.index - self.seq * length
        self.cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        self.max_seqlen = hi

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``x * (1 + scale) + shift`` with per-row ``shift, scale [B, C]``."""
        if self.uniform:
            return modulate_fused(x, shift[:, None, :], scale[:, None, :])
        return modulate_rows(x, shift, scale, self.seq)

    def gated_add(self, h: torch.Tensor, gate: torch.Tensor, residual: torch.Tensor, prob: float,
                  training: bool) -> torch.Tensor:
        """``residual + gate * dropout(h)`` with a per-row ``gate [B, C]``."""
        if self.uniform:
            return bias_dropout_add_scale(h, None, gate[:, None, :], residual, prob, training)
        return gated_add_rows(F.dropout(h, p=prob, training=training), gate, residual, self.seq)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        """Attention within each row's real tokens: q, k, v ``[B*L or total, H, D]``."""
        from foldops.ops import padded_attention, varlen_attention

        if self.keep is not None:
            shape = (self.batch, self.length) + tuple(q.shape[1:])
            out = padded_attention(q.view(shape), k.view(shape), v.view(shape), self.keep, backend=backend)
            return out.reshape(q.shape)
        return varlen_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                causal=False, backend=backend)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """A per-row tensor ``[B, C]`` laid out to broadcast against the activations."""
        return t[:, None, :] if self.uniform else t.index_select(0, self.seq)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> the working layout."""
        return x if self.uniform else x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.index)

    def repad(self, x: torch.Tensor) -> torch.Tensor:
        """The working layout -> ``[B, L, ...]`` with zeros at padded positions."""
        if self.uniform:
            return x if self.keep is None else x.masked_fill(~self.keep.view(self.keep.shape + (1,) * (x.dim() - 2)), 0)
        out = x.new_zeros(self.batch * self.length, *x.shape[1:]).index_copy(0, self.index, x)
        return out.reshape(self.batch, self.length, *x.shape[1:])

    def rotary_shape(self, t: torch.Tensor) -> torch.Tensor:
        """cos/sin ``[L or total, D/2]`` -> broadcastable over ``[..., 2, H, D/2]``."""
        return t[:, None, None, :]


def _nonzero(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` True entries: without a device sync where ``nonzero_static`` exists."""
    try:
        return torch.nonzero_static(flags, size=count).squeeze(1)
    except (AttributeError, NotImplementedError, RuntimeError):  # older torch or a device without it
        return flags.nonzero().squeeze(1)


def _seqlens_tensor(seqlens, batch: int, device: torch.device) -> Optional[torch.Tensor]:
    if seqlens is None:
        return None
    if not isinstance(seqlens, torch.Tensor):
        seqlens = torch.as_tensor(seqlens, device=device)
        if seqlens.numel() == 0:  # an empty list reads as float32
            seqlens = seqlens.long()
    if seqlens.dtype.is_floating_point or seqlens.dtype == torch.bool or seqlens.is_complex():
        raise TypeError(f"seqlens: expected an integer tensor of shape [{batch}], got dtype {seqlens.dtype}")
    if seqlens.shape != (batch,):
        raise ValueError(f"seqlens: expected shape ({batch},) (one length per row), got {tuple(seqlens.shape)}")
    return seqlens


# Layers -----------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in fp32 whatever the autocast state (as the original)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fdevice.fp32_region(x):
            x = F.layer_norm(x.to(torch.promote_types(x.dtype, torch.float32)), [self.dim])
        return x * self.weight


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the noise level, then Linear-SiLU-Linear (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, silu: bool = True) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """``[N]`` (possibly fractional) -> ``[N, dim]``: cos then sin of t / max_period^(i/half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class EmbeddingLayer(nn.Module):
    """Token embedding as one parameter ``embedding [vocab, dim]`` (the original's key)."""

    def __init__(self, dim: int, vocab_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_dim, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


class Rotary(nn.Module):
    """Rotary tables with the original's persistent ``inv_freq`` buffer.

    ``forward(x, seq_dim=1)`` returns the original's ``(cos, sin)``, each
    ``[1, L, 3, 1, D]`` with the v slot the identity; ``cos_sin(positions)`` returns the
    fp32 ``[N, D/2]`` tables at arbitrary integer positions (what the model uses).
    """

    def __init__(self, dim: int, base: float = 10_000) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.seq_len_cached = None
        self.cos_cached = None
        self.sin_cached = None

    def cos_sin(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(device=positions.device,
                                                                         dtype=torch.float32)[None, :]
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, seq_dim: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        seq_len = x.shape[seq_dim]
        if seq_len != self.seq_len_cached or self.cos_cached.device != x.device:
            self.seq_len_cached = seq_len
            cos, sin = self.cos_sin(torch.arange(seq_len, device=x.device))
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
            self.cos_cached = cos[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
            self.sin_cached = sin[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
            self.cos_cached[:, :, 2].fill_(1.0)  # identity on v
            self.sin_cached[:, :, 2].fill_(0.0)
        return self.cos_cached, self.sin_cached


def _half_table(t: torch.Tensor) -> torch.Tensor:
    """The original's ``[1, L, 3, 1, D]`` table -> ``[L, D/2]``."""
    if t.dim() == 5:
        return t[0, :, 0, 0, : t.shape[-1] // 2]
    return t


class DDiTBlock(nn.Module):
    """adaLN-modulated transformer block (attention + GELU MLP), keys as the original."""

    def __init__(self, dim: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.attention_backend = "auto"  # foldops.ops.varlen_attention's backend= (set by SEDD)
        if dim % n_heads:
            raise ValueError(f"n_heads: hidden size {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * dim, dim, bias=True),
        )
        self.dropout2 = nn.Dropout(dropout)
        self.dropout = dropout
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim, bias=True)
        self.adaLN_modulation.weight.data.zero_()
        self.adaLN_modulation.bias.data.zero_()

    def _attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pack: _Packing) -> torch.Tensor:
        head_dim = x.shape[-1] // self.n_heads
        qkv = self.attn_qkv(x).unflatten(-1, (3, self.n_heads, head_dim))  # [..., 3, H, D]
        qkv = _rotate_qk(qkv, pack.rotary_shape(cos), pack.rotary_shape(sin))
        q, k, v = qkv.reshape(-1, 3, self.n_heads, head_dim).unbind(1)  # [total, H, D] each
        out = pack.attention(q, k, v, self.attention_backend)
        return out.reshape(x.shape[:-1] + (x.shape[-1],))

    def _forward_packed(self, x: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        pack: _Packing) -> torch.Tensor:
        mods = self.adaLN_modulation(c).chunk(6, dim=-1)  # per row [B, dim] each
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        h = pack.modulate(self.norm1(x), shift_msa, scale_msa)
        h = self._attention(h, cos, sin, pack)
        x = pack.gated_add(self.attn_out(h), gate_msa, x, self.dropout, self.training)
        h = self.mlp(pack.modulate(self.norm2(x), shift_mlp, scale_mlp))
        return pack.gated_add(h, gate_mlp, x, self.dropout, self.training)

    def forward(self, x: torch.Tensor, rotary_cos_sin: Tuple[torch.Tensor, torch.Tensor], c: torch.Tensor,
                seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[B, L, dim]``, rotary_cos_sin from :class:`Rotary` (``[1, L, 3, 1, D]`` each, or
        ``[L, D/2]``), c ``[B, cond_dim]``, seqlens ``[B]`` or None -> ``[B, L, dim]``
        (zeros at padded positions)."""
        batch, length = x.shape[0], x.shape[1]
        pack = _Packing(batch, length, _seqlens_tensor(seqlens, batch, x.device), x.device)
        cos, sin = (_half_table(t).to(torch.float32) for t in rotary_cos_sin)
        cos, sin = cos[pack.positions], sin[pack.positions]
        return pack.repad(self._forward_packed(pack.unpad(x), c, cos, sin, pack))


class DDitFinalLayer(nn.Module):
    """Final adaLN-modulated LayerNorm and linear map to the vocabulary (zero-initialised)."""

    def __init__(self, hidden_size: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.linear.weight.data.zero_()
        self.linear.bias.data.zero_()
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden_size, bias=True)
        self.adaLN_modulation.weight.data.zero_()
        self.adaLN_modulation.bias.data.zero_()

    def _forward_packed(self, x: torch.Tensor, c: torch.Tensor, pack: _Packing) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(pack.modulate(self.norm_final(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, hidden]``, c ``[B, cond_dim]`` -> ``[B, L, out_channels]``."""
        return self._forward_packed(x, c, _Packing(x.shape[0], x.shape[1], None, x.device))


# The model --------------------------------------------------------------------------------

class _AttrDict(dict):
    """A nested dict read by attribute, the part of OmegaConf's interface SEDD code uses."""

    def __init__(self, values: Mapping) -> None:
        super().__init__({k: _AttrDict(v) if isinstance(v, Mapping) else v for k, v in values.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _as_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        try:
            from omegaconf import OmegaConf
        except ImportError:
            return _AttrDict(config)
        return OmegaConf.create(dict(config))
    return config


def _get(config: Any, path: str) -> Any:
    node = config
    for part in path.split("."):
        try:
            node = node[part] if isinstance(node, Mapping) else getattr(node, part)
        except (KeyError, AttributeError):
            raise ValueError(f"config: missing {path!r} (SEDD needs tokens, graph.type and model.hidden_size, "
                             "n_heads, n_blocks, cond_dim, dropout, scale_by_sigma)") from None
    return node


def _positive(path: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config: {path} must be a positive int, got {value!r}")
    return value


class SEDD(nn.Module):
    """SEDD's score network: ``forward(indices [B, L], sigma [B], seqlens=None)`` -> log-scores
    ``[B, L, vocab]`` (vocab = tokens + 1 for the absorbing graph), zero at the input token of
    each position and at padded positions.

    Args:
        config: dict or OmegaConf-like (see the module docstring); kept as ``self.config``.
        amp_dtype: ``"auto"`` (bf16 autocast on CUDA, nothing elsewhere), a dtype for autocast
            on any device (``torch.float32``: autocast off inside the model), or ``None``
            (leave the caller's autocast as it is).
        activation_checkpointing: recompute each block in backward (training only).
        attention_backend: ``backend=`` of ``foldops.ops.varlen_attention`` in every block
            (``"auto"``, ``"triton"``, ``"torch"``, ``"reference"``).
    """

    def __init__(self, config: Any, amp_dtype: AmpDtype = "auto", activation_checkpointing: bool = False,
                 attention_backend: str = "auto") -> None:
        super().__init__()
        config = _as_config(config)
        self.config = config
        graph = _get(config, "graph.type")
        if graph not in ("absorb", "uniform"):
            raise ValueError(f"config: graph.type must be 'absorb' or 'uniform', got {graph!r}")
        self.absorb = graph == "absorb"
        tokens = _positive("tokens", _get(config, "tokens"))
        hidden = _positive("model.hidden_size", _get(config, "model.hidden_size"))
        n_heads = _positive("model.n_heads", _get(config, "model.n_heads"))
        n_blocks = _positive("model.n_blocks", _get(config, "model.n_blocks"))
        cond_dim = _positive("model.cond_dim", _get(config, "model.cond_dim"))
        dropout = float(_get(config, "model.dropout"))
        if hidden % n_heads or (hidden // n_heads) % 2:
            raise ValueError(f"config: model.hidden_size {hidden} must split into n_heads {n_heads} heads of an even dim")
        vocab_size = tokens + (1 if self.absorb else 0)
        self.vocab_embed = EmbeddingLayer(hidden, vocab_size)
        self.sigma_map = TimestepEmbedder(cond_dim)
        self.rotary_emb = Rotary(hidden // n_heads)
        self.blocks = nn.ModuleList([DDiTBlock(hidden, n_heads, cond_dim, dropout=dropout) for _ in range(n_blocks)])
        self.output_layer = DDitFinalLayer(hidden, vocab_size, cond_dim)
        self.scale_by_sigma = bool(_get(config, "model.scale_by_sigma"))
        if not (amp_dtype in ("auto", None) or amp_dtype in (torch.bfloat16, torch.float16, torch.float32)):
            raise ValueError(f"amp_dtype: expected 'auto', None, torch.bfloat16, torch.float16 or torch.float32, "
                             f"got {amp_dtype!r}")
        self.amp_dtype = amp_dtype
        self.activation_checkpointing = bool(activation_checkpointing)
        self.attention_backend = attention_backend

    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"attention_backend: expected a backend name, got {type(name).__name__}")
        if name != "auto" and name not in backends.known_backends():
            raise ValueError(f"attention_backend: unknown backend {name!r}; valid: {backends.known_backends()} "
                             "or 'auto'")
        self._attention_backend = name
        for block in self.blocks:
            block.attention_backend = name

    def _autocast(self, x: torch.Tensor) -> contextlib.AbstractContextManager:
        dtype = self.amp_dtype
        if dtype == "auto":
            return fdevice.autocast(x, torch.bfloat16) if x.is_cuda else contextlib.nullcontext()
        if dtype is None or dtype == torch.float32:  # float32: the caller's forward holds fp32
            return contextlib.nullcontext()
        return fdevice.autocast(x, dtype)

    def forward(self, indices: torch.Tensor, sigma: torch.Tensor,
                seqlens: Optional[Union[torch.Tensor, Sequence[int]]] = None) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor) or indices.dim() != 2 or indices.dtype not in (torch.int64, torch.int32):
            got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise ValueError(f"indices: expected an int64 token tensor of shape [batch, length], got {got}")
        batch, length = indices.shape
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (batch,):
            got = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
            raise ValueError(f"sigma: expected a tensor of shape ({batch},) (one noise level per row), got {got}")
        if self.scale_by_sigma and not self.absorb:
            raise ValueError("config: model.scale_by_sigma is only defined for graph.type 'absorb'")
        indices = indices.long()
        pack = _Packing(batch, length, _seqlens_tensor(seqlens, batch, indices.device), indices.device)
        tokens = pack.unpad(indices)  # [B, L] or [total]
        # amp_dtype=float32 holds the whole forward in fp32, the embeddings included
        outer = fdevice.fp32_region(indices) if self.amp_dtype == torch.float32 else contextlib.nullcontext()
        with outer:
            return self._forward(tokens, sigma, pack)

    def _forward(self, tokens: torch.Tensor, sigma: torch.Tensor, pack: _Packing) -> torch.Tensor:
        x = self.vocab_embed(tokens)
        c = F.silu(self.sigma_map(sigma))
        cos, sin = self.rotary_emb.cos_sin(pack.positions)

        with self._autocast(x):
            for block in self.blocks:
                if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block._forward_packed, x, c, cos, sin, pack, use_reentrant=False)
                else:
                    x = block._forward_packed(x, c, cos, sin, pack)
            x = self.output_layer._forward_packed(x, c, pack)

        if self.scale_by_sigma:
            esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(x.dtype)
            x = x - pack.rows(esigm1_log[:, None]) - math.log(x.shape[-1] - 1)
        x = torch.scatter(x, -1, tokens[..., None], torch.zeros_like(x[..., :1]))
        return pack.repad(x)
