"""ESM-2 checkpoints: key maps (HF transformers, fair-esm), architecture from shapes, strict loads, files.

Native keys are fair-esm ``ESM2``'s: ``embed_tokens``, ``layers.{i}.self_attn.{q,k,v,out}_proj``,
``layers.{i}.self_attn_layer_norm``, ``layers.{i}.fc1/fc2``, ``layers.{i}.final_layer_norm``,
``emb_layer_norm_after``, ``contact_head.regression``, ``lm_head.{dense,layer_norm,weight,bias}``
(``lm_head.weight`` is the tied embedding). HF names map onto them as below; HF's
``EsmForMaskedLM`` prefixes the encoder with ``esm.``; fair-esm's released ``.pt`` files
prefix it with ``encoder.sentence_encoder.`` / ``encoder.``. HF LayerNorm parameters may be
named ``gamma``/``beta`` (the legacy names transformers' save_pretrained writes).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

import torch

_HF_LAYER = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_HF_TOP = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "encoder.emb_layer_norm_after.weight": "emb_layer_norm_after.weight",
    "encoder.emb_layer_norm_after.bias": "emb_layer_norm_after.bias",
    "contact_head.regression.weight": "contact_head.regression.weight",
    "contact_head.regression.bias": "contact_head.regression.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
    "lm_head.layer_norm.bias": "lm_head.layer_norm.bias",
    "lm_head.decoder.weight": "lm_head.weight",
    "lm_head.bias": "lm_head.bias",
}
_HF_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_INV_FREQ = "__inv_freq__"  # carried to the loader, checked against the model's head dim


def detect_format(sd: Dict[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any("embeddings.word_embeddings.weight" in k for k in keys):
        return "hf"
    if any(k.endswith("embed_tokens.weight") for k in keys):
        return "fair-esm"
    raise ValueError("state_dict: not an ESM-2 state dict (expected HF EsmModel/EsmForMaskedLM keys such as "
                     "'embeddings.word_embeddings.weight' or fair-esm ESM2 keys such as 'embed_tokens.weight'); "
                     f"first keys: {keys[:5]}")


def to_native(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename to native keys; keys that map nowhere stay under their own names (reported as unexpected)."""
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict: expected a dict of tensors, got {type(sd).__name__}")
    fmt = detect_format(sd)
    out: Dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if fmt == "fair-esm":
            k = re.sub(r"^(encoder\.sentence_encoder\.|encoder\.)", "", key)
            if re.fullmatch(r"layers\.\d+\.self_attn\.rot_emb\.inv_freq", k):
                out.setdefault(_INV_FREQ, value)
                continue
            out[k] = value
            continue
        k = key[4:] if key.startswith("esm.") else key
        # Legacy TF-style LayerNorm names, which transformers still writes and reads.
        k = re.sub(r"((?:LayerNorm|layer_norm|emb_layer_norm_after))\.gamma$", r"\1.weight", k)
        k = re.sub(r"((?:LayerNorm|layer_norm|emb_layer_norm_after))\.beta$", r"\1.bias", k)
        if k in _HF_TOP:
            out[_HF_TOP[k]] = value
        elif k == "rotary_embeddings.inv_freq" or k.endswith("attention.self.rotary_embeddings.inv_freq"):
            out.setdefault(_INV_FREQ, value)
        elif k.startswith("pooler.dense."):
            continue  # EsmModel's pooler: not part of ESM-2's pretrained network
        elif k.startswith("embeddings.position_embeddings") or k.startswith("embeddings.layer_norm"):
            raise ValueError(f"state_dict: key {key!r} belongs to an ESM-1-style model (absolute positions or an "
                             f"embedding LayerNorm); foldops.models.esm implements ESM-2 (rotary)")
        else:
            m = _HF_LAYER_RE.match(k)
            if m and m.group(2) in _HF_LAYER:
                out[f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}.{m.group(3)}"] = value
            else:
                out[key] = value
    return out


def infer_config(native: Dict[str, torch.Tensor], **overrides):
    from foldops.models.esm import ESM2Config

    emb = native.get("embed_tokens.weight")
    if emb is None or emb.dim() != 2:
        raise ValueError("state_dict: no 2-D token embedding ('embed_tokens.weight' / "
                         "'embeddings.word_embeddings.weight')")
    vocab, dim = emb.shape
    idx = sorted({int(m.group(1)) for k in native for m in [re.match(r"layers\.(\d+)\.", k)] if m})
    if not idx or idx != list(range(len(idx))):
        raise ValueError(f"state_dict: expected layers numbered 0..L-1, found {idx[:10]}")
    num_layers = len(idx)
    fc1 = native.get("layers.0.fc1.weight")
    if fc1 is None:
        raise ValueError("state_dict: missing layer 0's MLP weight (fc1 / intermediate.dense)")
    heads = overrides.pop("attention_heads", None)
    reg = native.get("contact_head.regression.weight")
    if reg is not None:
        if reg.shape[-1] % num_layers:
            raise ValueError(f"state_dict: contact head has {reg.shape[-1]} inputs, not a multiple of the "
                             f"{num_layers} layers")
        from_reg = reg.shape[-1] // num_layers
        if heads is not None and heads != from_reg:
            raise ValueError(f"attention_heads: {heads} given, but the contact head implies {from_reg}")
        heads = from_reg
    elif _INV_FREQ in native:
        heads = dim // (2 * native[_INV_FREQ].shape[0])
    if heads is None:
        raise ValueError("state_dict: the number of attention heads cannot be read from the tensors (no contact "
                         "head, no rotary inv_freq); pass attention_heads=...")
    fields = dict(num_layers=num_layers, embed_dim=dim, attention_heads=heads, ffn_dim=fc1.shape[0],
                  vocab_size=vocab, lm_head="lm_head.dense.weight" in native)
    fields.update(overrides)
    return ESM2Config(**fields)


def load_strict(model, native: Dict[str, torch.Tensor]) -> None:
    native = dict(native)
    inv_freq = native.pop(_INV_FREQ, None)
    if inv_freq is not None:
        if inv_freq.shape != model.inv_freq.shape:
            raise ValueError(f"state_dict: rotary inv_freq has shape {tuple(inv_freq.shape)}, expected "
                             f"{tuple(model.inv_freq.shape)} (head dim {model.config.head_dim})")
        model.inv_freq.copy_(inv_freq.float())
    expected = model.state_dict()
    if model.lm_head is not None and "lm_head.weight" not in native and "embed_tokens.weight" in native:
        native["lm_head.weight"] = native["embed_tokens.weight"]  # tied
    missing = sorted(set(expected) - set(native))
    unexpected = sorted(set(native) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(native[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in native and native[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        hint = ""
        if missing and all(k.startswith("contact_head.") for k in missing):
            hint = (" (fair-esm ships the contact regression in a separate '<name>-contact-regression.pt' "
                    "file; put it beside the .pt file)")
        raise ValueError("state_dict does not fit ESM2(" + ", ".join(
            f"{k}={v}" for k, v in [("num_layers", model.config.num_layers), ("embed_dim", model.config.embed_dim),
                                    ("attention_heads", model.config.attention_heads)]) + "): "
            f"missing keys {missing}; unexpected keys {unexpected}; shape mismatches {wrong}{hint}")
    if model.lm_head is not None and not torch.equal(native["lm_head.weight"], native["embed_tokens.weight"]):
        raise ValueError("state_dict: the LM head's output matrix differs from the token embedding; ESM-2 ties them")
    model.load_state_dict(native, strict=True)


# Files -------------------------------------------------------------------------------------

def _torch_load(path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not trust_pickle:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({exc}); if you trust "
                             f"the file pass trust_pickle=True") from exc
        return torch.load(path, map_location="cpu", weights_only=False)


def _hf_dir(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("position_embedding_type", "rotary") != "rotary" or cfg.get("emb_layer_norm_before"):
        raise ValueError(f"{path}/config.json: not an ESM-2 architecture (position_embedding_type="
                         f"{cfg.get('position_embedding_type')!r}, emb_layer_norm_before={cfg.get('emb_layer_norm_before')})")
    hints = {}
    for src, dst in (("token_dropout", "token_dropout"), ("layer_norm_eps", "layer_norm_eps"),
                     ("max_position_embeddings", "max_positions"), ("pad_token_id", "padding_idx"),
                     ("mask_token_id", "mask_idx"), ("num_attention_heads", "attention_heads")):
        if cfg.get(src) is not None:
            hints[dst] = cfg[src]
    files = os.listdir(path)
    sd: Dict[str, torch.Tensor] = {}
    if "model.safetensors" in files or "model.safetensors.index.json" in files:
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ImportError(f"{path}: holds safetensors weights; pip install safetensors") from exc
        if "model.safetensors" in files:
            shards = ["model.safetensors"]
        else:
            with open(os.path.join(path, "model.safetensors.index.json")) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        for shard in shards:
            sd.update(load_file(os.path.join(path, shard)))
    elif "pytorch_model.bin" in files:
        sd = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    return sd, hints


def _fair_esm_file(path: str, trust_pickle: bool) -> Tuple[Dict[str, torch.Tensor], dict]:
    obj = _torch_load(path, trust_pickle)
    hints = {}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        sd = dict(obj["model"])
        cfg = obj.get("cfg")
        model_cfg = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
        for src, dst in (("token_dropout", "token_dropout"), ("encoder_attention_heads", "attention_heads")):
            value = model_cfg.get(src) if isinstance(model_cfg, dict) else getattr(model_cfg, src, None)
            if value is not None:
                hints[dst] = value
        stem = os.path.splitext(path)[0]
        regression = stem + "-contact-regression.pt"
        if not any("contact_head" in k for k in sd) and os.path.exists(regression):
            sd.update(_torch_load(regression, trust_pickle)["model"])
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise ValueError(f"{path}: expected a state dict or a fair-esm checkpoint dict, got {type(obj).__name__}")
    return sd, hints


def read_checkpoint(path_or_name, trust_pickle: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    path = os.fspath(path_or_name)
    if os.path.isdir(path):
        return _hf_dir(path)
    if os.path.isfile(path):
        return _fair_esm_file(path, trust_pickle)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"path_or_name: {path!r} is not a local directory or file, and huggingface_hub is "
                                f"not installed to download it") from None
    local = snapshot_download(path, allow_patterns=["config.json", "*.safetensors", "*.json", "pytorch_model.bin"])
    return _hf_dir(local)
