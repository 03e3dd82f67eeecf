"""ESM-2's pieces on the packed batch: the packed layout (_Pack), rotary embeddings, the
self-attention (fast varlen op or the explicit-softmax path that returns the maps), the
pre-LayerNorm block, the RoBERTa LM head and the contact head. ``foldops.models.esm``
assembles them; fair-esm's names (q_proj, self_attn_layer_norm, fc1, ...) are kept so
that the model's state dict is fair-esm's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from foldops.ops.varlen_attention import padded_attention, varlen_attention

if TYPE_CHECKING:
    from foldops.models.esm import ESM2Config

def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # erf form, as fair-esm's gelu


def _rotary(x: torch.Tensor, pack: "_Pack") -> torch.Tensor:
    """x [N, ..., D]: the non-interleaved (rotate-half) rotation by the pack's angles.

    out = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); cos and sin repeat
    over the two halves, so each half needs the half-width tables only. Angles and their
    cos/sin are fp32 (fp64 for fp64 x); the product runs in x's dtype (as fair-esm and HF).
    """
    cos, sin = pack.trig(x.dtype)  # [N, D/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _SelfAttention(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        e = cfg.embed_dim
        self.heads = cfg.attention_heads
        self.head_dim = cfg.head_dim
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(e, e)
        self.k_proj = nn.Linear(e, e)
        self.v_proj = nn.Linear(e, e)
        self.out_proj = nn.Linear(e, e)

    def forward(self, x, pack, backend: str, want_probs: bool):
        n = x.shape[0]
        # One GEMM for q, k and v (the weights stay three fair-esm-named Linears).
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        bias = torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))
        qkv = F.linear(x, weight, bias).view(n, 3, self.heads, self.head_dim)
        qk = _rotary(qkv[:, :2], pack)  # [N, 2, H, D]
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
        probs = None
        if want_probs:
            out, probs = self._explicit(q, k, v, pack)
        else:
            out = pack.attention(q, k, v, self.scaling, backend)
        return self.out_proj(out.reshape(n, self.heads * self.head_dim)), probs

    def _explicit(self, q, k, v, pack):
        """Padded softmax(q k^T) per sequence: out [N, H, D] and probs [B, H, T, T] in the
        compute dtype (the softmax in fp32, fp64 for fp64 inputs)."""
        b, t = pack.batch, pack.width
        dense = []
        for x in (q, k, v):
            buf = x.new_zeros(b * t, self.heads, self.head_dim)
            buf[pack.flat_index] = x
            dense.append(buf.view(b, t, self.heads, self.head_dim).transpose(1, 2))
        qd, kd, vd = dense
        # fp32 softmax done in place on the one [B, H, T, T] buffer (peak: one map, plus
        # its copy in the compute dtype when that is not fp32). Every row has a real key
        # (BOS), so no row is fully masked; padding query rows are zeroed as fair-esm does.
        softmax_dtype = torch.promote_types(qd.dtype, torch.float32)
        probs = torch.matmul(qd.to(softmax_dtype) * self.scaling, kd.to(softmax_dtype).transpose(-1, -2))
        probs.masked_fill_(~pack.keep[:, None, None, :], float("-inf"))
        if torch.is_grad_enabled() and probs.requires_grad:  # training: autograd needs the softmax's output
            probs = torch.softmax(probs, dim=-1) * pack.keep[:, None, :, None]
        elif probs.numel():  # (an empty batch has no row to normalise; amax needs one)
            probs.sub_(probs.amax(-1, keepdim=True)).exp_()
            probs.div_(probs.sum(-1, keepdim=True))
            probs.mul_(pack.keep[:, None, :, None])
        probs = probs.to(vd.dtype)  # maps in the compute dtype, as fair-esm and HF return them
        out = torch.matmul(probs, vd)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(b * t, self.heads, self.head_dim)[pack.flat_index]
        return out, probs


class _Layer(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.self_attn = _SelfAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    def forward(self, x, pack, backend: str, want_probs: bool):
        h, probs = self.self_attn(self.self_attn_layer_norm(x), pack, backend, want_probs)
        x = x + h
        x = x + self.fc2(_gelu(self.fc1(self.final_layer_norm(x))))
        return x, probs


class _LMHead(nn.Module):
    """RoBERTa LM head: dense, GELU, LayerNorm, then the tied embedding matrix plus a bias."""

    def __init__(self, cfg: ESM2Config, weight: nn.Parameter):
        super().__init__()
        self.dense = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.weight = weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        return F.linear(self.layer_norm(_gelu(self.dense(x))), self.weight) + self.bias


class _ContactHead(nn.Module):
    def __init__(self, cfg: ESM2Config):
        super().__init__()
        self.regression = nn.Linear(cfg.num_layers * cfg.attention_heads, 1)

    def forward(self, tokens, attentions, eos_idx: int):
        """tokens [B, T]; attentions [B, L, H, T, T] (zero at padding) -> contacts [B, T-2, T-2]."""
        keep = tokens.ne(eos_idx).to(attentions.dtype)
        attentions = attentions * (keep[:, None, None, :, None] * keep[:, None, None, None, :])
        attentions = attentions[..., 1:-1, 1:-1]
        b, layers, heads, t, _ = attentions.shape
        a = attentions.reshape(b, layers * heads, t, t)
        a = a.to(torch.promote_types(a.dtype, torch.float32))
        a = a + a.transpose(-1, -2)
        a1, a2 = a.sum(-1, keepdim=True), a.sum(-2, keepdim=True)
        a = a - a1 * a2 / a.sum((-1, -2), keepdim=True)  # average product correction
        w = self.regression.weight.to(a.dtype)
        logits = torch.einsum("bctu,c->btu", a, w[0]) + self.regression.bias.to(a.dtype)
        return torch.sigmoid(logits)


class _Pack:
    """The packed layout of one batch: indices, cu_seqlens, rotary tables.

    While torch.compile traces nothing is read on the host (no graph break, one graph for
    every mix of lengths; the row checks are skipped): the layout is the padded batch
    itself (N = B*T rows, ``padded``), attention masks the padding keys and ``pad``
    zeroes the padded positions. Padding then costs work, the real tokens' outputs are
    the packed layout's."""

    def __init__(self, tokens: torch.Tensor, cfg: ESM2Config, inv_freq: torch.Tensor):
        b, t = tokens.shape
        self.batch, self.width = b, t
        self.keep = tokens.ne(cfg.padding_idx)  # [B, T]
        lengths = self.keep.sum(1)
        self.lengths = lengths
        self.padded = torch.compiler.is_compiling()
        if self.padded:
            self.max_len, self.cu_seqlens = t, None
            self.flat_index = torch.arange(b * t, device=tokens.device)
        else:
            self._check_and_pack(lengths, cfg)
        self.row = self.flat_index // t
        self._positions = self.flat_index % t  # [N]
        self._inv_freq = inv_freq
        self._trig = {}

    def _check_and_pack(self, lengths: torch.Tensor, cfg: ESM2Config) -> None:
        host = lengths.cpu()  # the one host read of a forward
        if bool((host == 0).any()):
            row = int(torch.nonzero(host == 0)[0])
            raise ValueError(f"tokens: row {row} holds only padding (an empty sequence has at least <cls> "
                             f"and <eos>)")
        self.max_len = int(host.max()) if host.numel() else 0  # B = 0: an empty batch
        if self.max_len > cfg.max_positions:
            row = int(torch.argmax(host))
            raise ValueError(f"tokens: row {row} has {self.max_len} tokens, more than the model's "
                             f"max_positions={cfg.max_positions} (ESM-2 was trained on at most 1022 residues "
                             f"plus BOS/EOS); truncate it (BatchConverter(truncation_seq_length=...)) or "
                             f"raise ESM2Config.max_positions")
        # A normal (not inference-mode) tensor: on accelerators varlen_attention remembers
        # a validated cu_seqlens by version counter (inference tensors have none), so every
        # layer after the first skips the host check.
        with torch.inference_mode(False):
            self.cu_seqlens = F.pad(torch.cumsum(lengths.clone(), 0, dtype=torch.int32), (1, 0))
        self.flat_index = torch.nonzero(self.keep.reshape(-1), as_tuple=True)[0]  # [N] into B*T

    def trig(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, D/2] in ``dtype``: computed once per call in fp32 (fp64 for fp64,
        from the fp32 frequencies as fair-esm's model.double() holds them), then cast."""
        if dtype not in self._trig:
            compute = torch.promote_types(dtype, torch.float32)
            if compute not in self._trig:
                freqs = self._positions.to(compute)[:, None] * self._inv_freq.to(compute)[None, :]  # [N, D/2]
                self._trig[compute] = (freqs.cos(), freqs.sin())
            cos, sin = self._trig[compute]
            self._trig[dtype] = (cos.to(dtype), sin.to(dtype))
        return self._trig[dtype]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str):
        """Attention within each sequence: q, k, v [N, H, D] -> [N, H, D]."""
        if self.padded:
            shape = (self.batch, self.width) + tuple(q.shape[1:])
            out = padded_attention(q.unflatten(0, shape[:2]), k.unflatten(0, shape[:2]), v.unflatten(0, shape[:2]),
                                   self.keep, softmax_scale=scale, backend=backend)
            return out.reshape(q.shape)
        return varlen_attention(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_len, self.max_len,
                                softmax_scale=scale, backend=backend)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Packed [N, ...] -> padded [B, T, ...] with zeros at padding."""
        if self.padded:
            out = x.view((self.batch, self.width) + tuple(x.shape[1:]))
            return out.masked_fill(~self.keep.view(self.keep.shape + (1,) * (x.dim() - 1)), 0)
        out = x.new_zeros((self.batch * self.width,) + tuple(x.shape[1:]))
        out[self.flat_index] = x
        return out.view((self.batch, self.width) + tuple(x.shape[1:]))
