"""ESM-2 encoder on packed (unpadded) attention, with fair-esm's interface.

    model = ESM2.from_pretrained("path/to/save_pretrained_dir")   # or a fair-esm .pt
    _, _, tokens = model.alphabet.get_batch_converter()([("p1", "MKTAYIAK"), ("p2", "GSH")])
    out = model(tokens, repr_layers=[33], return_contacts=True)

``tokens`` int64 [B, T] as fair-esm's batch converter makes them (``<cls>`` ... ``<eos>``
then ``<pad>``). Outputs (fair-esm's keys and shapes):

    logits            [B, T, V]          (models with the LM head; zeros at padding)
    representations   {layer: [B, T, E]} layer 0 = embeddings, layer L = after the final
                                         LayerNorm (as fair-esm); zeros at padding
    attentions        [B, n, H, T, T]    (compute dtype) need_head_weights (n = L) or attn_layers (n =
                                         len(attn_layers)); zero rows/columns at padding
    contacts          [B, T-2, T-2]      return_contacts (BOS/EOS removed)

How it runs: the non-padding tokens are gathered once into a packed [N, E] tensor
(N = real tokens; one host read of the lengths per call), every dense layer works on
N rows, and attention runs through ``foldops.ops.varlen_attention`` on the packed
tensors, so nothing is computed for padding. Layers whose attention probabilities are
asked for run an explicit-softmax path on the padded batch (one dense [B, H, T, T]
buffer, fp32 softmax in place) that returns them; the other layers stay on the fast op. Autocast (bf16/fp16)
is taken on any device type; softmax, LayerNorm statistics and rotary tables stay fp32 (an fp64 model
computes them in fp64). Run so far on
CPU and an NVIDIA H200; MPS, XPU and V100 go through the op's ``torch`` backend, implemented but
untested on that hardware.

Architecture facts (fair-esm esm/model/esm2.py, esm/modules.py; HF modeling_esm.py):
token-dropout rescaling of the embeddings by (1 - 0.15*0.8) / (1 - observed mask ratio);
rotary embeddings (rotate-half, base 10000, positions = column index in the padded row)
on the scaled queries and the keys; pre-LayerNorm blocks (eps 1e-5) with an erf-GELU
MLP; final LayerNorm; RoBERTa LM head tied to the token embedding; contact head =
sigmoid(logistic regression over the L*H symmetrised, APC-corrected attention maps).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from foldops.backends import check_module_backend
from foldops.models.esm_alphabet import Alphabet, BatchConverter  # noqa: F401  (re-exported)
from foldops.models._esm_layers import _ContactHead, _Layer, _LMHead, _Pack

__all__ = ["ESM2", "ESM2Config", "Alphabet", "BatchConverter", "ESM2_CONFIGS"]

TOKEN_DROPOUT_TRAIN_RATIO = 0.15 * 0.8  # fair-esm / HF: mask probability x share replaced by <mask>


@dataclass
class ESM2Config:
    """Architecture of one ESM-2 model; ``ESM2_CONFIGS`` holds the published sizes."""

    num_layers: int = 33
    embed_dim: int = 1280
    attention_heads: int = 20
    ffn_dim: Optional[int] = None  # 4 * embed_dim when None (every ESM-2)
    vocab_size: int = 33
    token_dropout: bool = True
    layer_norm_eps: float = 1e-5
    max_positions: int = 1026  # tokens per sequence incl. BOS/EOS (HF's max_position_embeddings)
    lm_head: bool = True
    padding_idx: int = 1
    mask_idx: int = 32
    cls_idx: int = 0
    eos_idx: int = 2
    rotary_base: float = 10000.0

    def __post_init__(self):
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.embed_dim
        for name in ("num_layers", "embed_dim", "attention_heads", "ffn_dim", "vocab_size", "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.embed_dim % self.attention_heads or (self.embed_dim // self.attention_heads) % 2:
            raise ValueError(f"attention_heads: expected a divisor of embed_dim={self.embed_dim} with an even "
                             f"head dim, got {self.attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads


ESM2_CONFIGS = {
    "esm2_t6_8M_UR50D": ESM2Config(6, 320, 20),
    "esm2_t12_35M_UR50D": ESM2Config(12, 480, 20),
    "esm2_t30_150M_UR50D": ESM2Config(30, 640, 20),
    "esm2_t33_650M_UR50D": ESM2Config(33, 1280, 20),
    "esm2_t36_3B_UR50D": ESM2Config(36, 2560, 40),
    "esm2_t48_15B_UR50D": ESM2Config(48, 5120, 40),
}


# The model ---------------------------------------------------------------------------------

class ESM2(nn.Module):
    """ESM-2 (fair-esm's ``ESM2``; its state-dict keys, with the rotary buffers left out).

    Args:
        config: an ``ESM2Config`` (or the name of a published size in ``ESM2_CONFIGS``).
        backend: attention backend for ``foldops.ops.varlen_attention`` (``"auto"``,
            ``"triton"``, ``"torch"``, ``"reference"``); ``forward(backend=...)`` overrides.
    """

    def __init__(self, config: Union[ESM2Config, str] = "esm2_t33_650M_UR50D", backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if isinstance(config, str):
            if config not in ESM2_CONFIGS:
                raise ValueError(f"config: expected an ESM2Config or one of {sorted(ESM2_CONFIGS)}, got {config!r}")
            config = ESM2Config(**asdict(ESM2_CONFIGS[config]))
        self.config = config
        self.backend = check_module_backend(backend)
        self.alphabet = Alphabet()
        cfg = config
        self.num_layers, self.embed_dim, self.attention_heads = cfg.num_layers, cfg.embed_dim, cfg.attention_heads
        self.padding_idx, self.mask_idx, self.cls_idx, self.eos_idx = (cfg.padding_idx, cfg.mask_idx, cfg.cls_idx,
                                                                       cfg.eos_idx)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.padding_idx)
        self.layers = nn.ModuleList([_Layer(cfg) for _ in range(cfg.num_layers)])
        self.contact_head = _ContactHead(cfg)
        self.emb_layer_norm_after = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.lm_head = _LMHead(cfg, self.embed_tokens.weight) if cfg.lm_head else None
        inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _apply(self, fn, recurse=True):
        # The rotary frequencies stay fp32 whatever dtype the weights move to (bf16 angles
        # at position 1000 would be off by several radians).
        freq = self.inv_freq
        out = super()._apply(fn, recurse)
        self.inv_freq = freq.to(device=self.inv_freq.device)
        return out

    # Forward ----------------------------------------------------------------------------

    def _check_tokens(self, tokens):
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens: expected an int64 tensor [B, T], got {type(tokens).__name__}")
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected an integer tensor [B, T], got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.device != self.embed_tokens.weight.device:
            raise ValueError(f"tokens: expected device {self.embed_tokens.weight.device} (the model's), "
                             f"got {tokens.device}")
        if tokens.numel() and not torch.compiler.is_compiling():  # no host read while compiling
            lo, hi = torch.stack([tokens.min(), tokens.max()]).tolist()  # one host read
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"tokens: expected ids in [0, {self.config.vocab_size}), got [{lo}, {hi}]")

    def _layer_set(self, name, layers, allow_zero) -> List[int]:
        lo = 0 if allow_zero else 1
        out = []
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"{name}: expected ints, got {i!r}")
            j = i if i >= 0 else self.num_layers + 1 + i  # -1 = last layer, as fair-esm's scripts
            if not lo <= j <= self.num_layers:
                raise ValueError(f"{name}: layer {i} outside [{lo}, {self.num_layers}]")
            out.append(j)
        return sorted(set(out))

    def _embed(self, tokens, pack):
        tok = tokens.reshape(-1)[pack.flat_index]
        x = self.embed_tokens(tok)
        if self.config.token_dropout:
            is_mask = tok.eq(self.mask_idx)
            x = x.masked_fill(is_mask[:, None], 0.0)
            compute = torch.promote_types(x.dtype, torch.float32)  # fp32, fp64 for an fp64 model
            # clamp: a row of padding only (refused eagerly, unchecked under compile) gives 0, not 0/0
            observed = tokens.eq(self.mask_idx).sum(-1).to(compute) / pack.lengths.clamp_min(1).to(compute)  # [B]
            scale = (1.0 - TOKEN_DROPOUT_TRAIN_RATIO) / (1.0 - observed)
            x = (x.to(compute) * scale[pack.row][:, None]).to(x.dtype)
        return x

    def forward(self, tokens: torch.Tensor, repr_layers: Sequence[int] = (), need_head_weights: bool = False,
                return_contacts: bool = False, attn_layers: Optional[Sequence[int]] = None,
                return_logits: bool = True, backend: Optional[str] = None) -> Dict[str, object]:
        """fair-esm's forward; see the module doc for the outputs.

        Args:
            tokens: int64 ``[B, T]`` (fair-esm's batch converter layout).
            repr_layers: layer indices (0 = embeddings, L = final, negatives count back
                from L+1) whose hidden states go into ``representations``.
            need_head_weights: return the attention maps of every layer.
            return_contacts: return contacts (implies ``need_head_weights``, as fair-esm).
            attn_layers: return the maps of these layers only (1..L); the other layers
                stay on the fast attention op.
            return_logits: compute the LM head (skip it for features only).
            backend: attention backend for this call (default: the model's).
        """
        self._check_tokens(tokens)
        backend = self.backend if backend is None else backend
        if return_contacts:
            need_head_weights = True
        if need_head_weights:
            want = list(range(1, self.num_layers + 1))
        else:
            want = self._layer_set("attn_layers", attn_layers or (), allow_zero=False)
        reps_wanted = set(self._layer_set("repr_layers", repr_layers, allow_zero=True))
        pack = _Pack(tokens, self.config, self.inv_freq)
        x = self._embed(tokens, pack)
        reps: Dict[int, torch.Tensor] = {}
        if 0 in reps_wanted:
            reps[0] = pack.pad(x)
        maps = []
        want_set = set(want)
        for i, layer in enumerate(self.layers, start=1):
            x, probs = layer(x, pack, backend, i in want_set)
            if probs is not None:
                maps.append(probs)
            if i in reps_wanted and i != self.num_layers:
                reps[i] = pack.pad(x)
        x = self.emb_layer_norm_after(x)
        if self.num_layers in reps_wanted:
            reps[self.num_layers] = pack.pad(x)
        result: Dict[str, object] = {}
        if return_logits and self.lm_head is not None:
            result["logits"] = pack.pad(self.lm_head(x))
        result["representations"] = reps
        if maps:
            attentions = maps[0].unsqueeze(1) if len(maps) == 1 else torch.stack(maps, 1)  # [B, n, H, T, T]
            result["attentions"] = attentions
            if return_contacts:
                result["contacts"] = self.contact_head(tokens, attentions, self.eos_idx)
        return result

    def predict_contacts(self, tokens: torch.Tensor) -> torch.Tensor:
        return self(tokens, return_contacts=True, return_logits=False)["contacts"]

    @torch.inference_mode()
    def features(self, tokens: torch.Tensor, layers: Optional[Sequence[int]] = None, pair: bool = False,
                 pair_layers: Optional[Sequence[int]] = None, strip_special: bool = True,
                 backend: Optional[str] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Frozen features for a downstream model (inference mode, no LM head).

        Args:
            tokens: int64 ``[B, T]`` as the batch converter makes them.
            layers: layers whose hidden states to return (default every layer 0..L).
            pair: also return pair features from the attention maps (those layers run the
                explicit-softmax path; with ``pair=False`` every layer stays on the fast op).
            pair_layers: layers whose maps form the pair features (default every layer).
            strip_special: drop the BOS column and the EOS token of each row, so that
                position i is residue i (then R = T - 2); padding stays zero.

        Returns:
            ``node`` ``[B, R, n_layers, E]`` and ``pair`` ``[B, R, R, n_pair_layers * H]``
            (probabilities in the compute dtype, layer-major then head) or ``None``.
        """
        layers = list(range(self.num_layers + 1)) if layers is None else self._layer_set("layers", layers, True)
        attn = None
        if pair:
            attn = list(range(1, self.num_layers + 1)) if pair_layers is None else pair_layers
        out = self(tokens, repr_layers=layers, attn_layers=attn, return_logits=False, backend=backend)
        node = torch.stack([out["representations"][i] for i in layers], dim=2)  # [B, T, n, E]
        pair_feats = None
        if pair:
            a = out["attentions"]  # [B, n, H, T, T]
            b, n, h, t, _ = a.shape
            pair_feats = a.permute(0, 3, 4, 1, 2).reshape(b, t, t, n * h)
        if strip_special:
            residue = tokens.ne(self.cls_idx) & tokens.ne(self.eos_idx) & tokens.ne(self.padding_idx)
            residue = residue[:, 1:-1]
            node = node[:, 1:-1] * residue[:, :, None, None].to(node.dtype)
            if pair_feats is not None:
                pm = (residue[:, :, None] & residue[:, None, :]).to(pair_feats.dtype)
                pair_feats = pair_feats[:, 1:-1, 1:-1] * pm[..., None]
        return node, pair_feats

    # Weights -----------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, state_dict: Dict[str, torch.Tensor], config: Optional[ESM2Config] = None,
                        backend: str = "auto", **overrides) -> "ESM2":
        """Build and load a model from a HF ``EsmModel``/``EsmForMaskedLM`` or fair-esm ``ESM2`` state dict.

        The format is recognised from the key names, the architecture read from the
        tensors' shapes (layers, width, FFN width, vocabulary, heads from the contact
        head's L*H inputs, LM head present or not); ``overrides`` set the fields the
        shapes do not hold (``token_dropout``, ``layer_norm_eps``, ``max_positions``, ...).
        Loading is strict: a missing or unexpected key raises ``ValueError`` listing them.
        HF's pooler (``pooler.dense``, untrained in ESM-2) and the rotary ``inv_freq``
        buffers are read and dropped.
        """
        from foldops.models import _esm_convert as conv

        native = conv.to_native(state_dict)
        if config is None:
            config = conv.infer_config(native, **overrides)
        elif overrides:
            config = ESM2Config(**{**asdict(config), **overrides})
        model = cls(config, backend=backend)
        conv.load_strict(model, native)
        return model

    @classmethod
    def from_pretrained(cls, path_or_name: Union[str, os.PathLike], backend: str = "auto",
                        trust_pickle: bool = False, **overrides) -> "ESM2":
        """Load a local ``save_pretrained`` directory (config.json + model.safetensors or
        pytorch_model.bin), a fair-esm ``.pt`` file, or (with ``huggingface_hub`` installed
        and online) a Hub name such as ``facebook/esm2_t33_650M_UR50D``. ``.pt`` files are read
        with ``torch.load(weights_only=True)``; fair-esm's released files hold pickled
        configs and need ``trust_pickle=True``."""
        from foldops.models import _esm_convert as conv

        sd, hints = conv.read_checkpoint(path_or_name, trust_pickle)
        hints.update(overrides)
        return cls.from_state_dict(sd, backend=backend, **hints)
