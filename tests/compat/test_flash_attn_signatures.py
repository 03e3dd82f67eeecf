"""Every drop-in of foldops.compat.flash_attn has flash_attn 2.8's parameters: the same names,
defaults and order, so positional and keyword calls written for flash_attn bind the same way.

The expected signatures were recorded from flash_attn v2.8.3's source
(flash_attn/flash_attn_interface.py, ops/fused_dense.py, layers/rotary.py, bert_padding.py;
unchanged in the 2.8.4 development version). Methods are listed without ``self``;
``index_first_axis`` / ``index_put_first_axis`` are ``autograd.Function.apply`` in
flash_attn, recorded from their ``forward`` without ``ctx``.
"""

import inspect

import pytest
import torch

import foldops.compat.flash_attn as fa
from foldops.compat.flash_attn import bert_padding, fused_dense, interface, rotary
from foldops.testing import assert_within_baseline

REQUIRED = inspect.Parameter.empty

_ATTN_OPTIONS = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
                 ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]


def _req(*names):
    return [(n, REQUIRED) for n in names]


FLASH_ATTN_2_8 = {
    # flash_attn.flash_attn_interface
    (interface, "flash_attn_func"): _req("q", "k", "v") + _ATTN_OPTIONS,
    (interface, "flash_attn_qkvpacked_func"): _req("qkv") + _ATTN_OPTIONS,
    (interface, "flash_attn_kvpacked_func"): _req("q", "kv") + _ATTN_OPTIONS,
    (interface, "flash_attn_varlen_func"):
        _req("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k") + _ATTN_OPTIONS
        + [("block_table", None)],
    (interface, "flash_attn_varlen_qkvpacked_func"): _req("qkv", "cu_seqlens", "max_seqlen") + _ATTN_OPTIONS,
    (interface, "flash_attn_varlen_kvpacked_func"):
        _req("q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k") + _ATTN_OPTIONS,
    # flash_attn.ops.fused_dense
    (fused_dense, "fused_dense_func"): _req("x", "weight") + [
        ("bias", None), ("return_residual", False), ("process_group", None), ("sequence_parallel", True)],
    (fused_dense, "fused_mlp_func"): _req("x", "weight1", "weight2") + [
        ("bias1", None), ("bias2", None), ("activation", "gelu_approx"), ("save_pre_act", True),
        ("return_residual", False), ("checkpoint_lvl", 0), ("heuristic", 0), ("process_group", None),
        ("sequence_parallel", True)],
    (fused_dense, "FusedDense.__init__"): _req("in_features", "out_features") + [
        ("bias", True), ("return_residual", False), ("device", None), ("dtype", None)],
    (fused_dense, "FusedDense.forward"): _req("x") + [("process_group", None)],
    (fused_dense, "FusedMLP.__init__"): _req("in_features") + [
        ("hidden_features", None), ("out_features", None), ("bias1", True), ("bias2", True),
        ("activation", "gelu_approx"), ("return_residual", False), ("checkpoint_lvl", 0), ("heuristic", "auto"),
        ("device", None), ("dtype", None)],
    (fused_dense, "FusedMLP.forward"): _req("x") + [("process_group", None)],
    # flash_attn.layers.rotary
    (rotary, "rotate_half"): _req("x") + [("interleaved", False)],
    (rotary, "apply_rotary_emb_torch"): _req("x", "cos", "sin") + [("interleaved", False)],
    (rotary, "apply_rotary_emb"): _req("x", "cos", "sin") + [
        ("interleaved", False), ("inplace", False), ("seqlen_offsets", 0), ("cu_seqlens", None),
        ("max_seqlen", None)],
    (rotary, "apply_rotary_emb_func"): _req("x", "cos", "sin") + [
        ("interleaved", False), ("inplace", False), ("seqlen_offsets", 0), ("cu_seqlens", None),
        ("max_seqlen", None)],
    (rotary, "apply_rotary_emb_qkv_"): _req("qkv", "cos", "sin") + [
        ("cos_k", None), ("sin_k", None), ("interleaved", False), ("seqlen_offsets", 0), ("num_heads_q", None)],
    (rotary, "apply_rotary_emb_kv_"): _req("kv", "cos", "sin") + [("interleaved", False), ("seqlen_offsets", 0)],
    (rotary, "RotaryEmbedding.__init__"): _req("dim") + [
        ("base", 10000.0), ("interleaved", False), ("scale_base", None), ("device", None)],
    (rotary, "RotaryEmbedding.forward"): _req("qkv") + [
        ("kv", None), ("seqlen_offset", 0), ("max_seqlen", None), ("num_heads_q", None)],
    # flash_attn.bert_padding
    (bert_padding, "unpad_input"): _req("hidden_states", "attention_mask") + [("unused_mask", None)],
    (bert_padding, "pad_input"): _req("hidden_states", "indices", "batch", "seqlen"),
    (bert_padding, "index_first_axis"): _req("input", "indices"),
    (bert_padding, "index_put_first_axis"): _req("values", "indices", "first_axis_dim"),
}

# Keyword-only extras foldops accepts beyond 2.8, each with the version and default it comes from.
# RotaryEmbedding's pos_idx_in_fp32 sat before ``device`` in flash_attn 2.0-2.7.4 (default True)
# and was removed in 2.8; keyword-only here, so 2.8's positional order stays intact.
EXTRAS = {
    (rotary, "RotaryEmbedding.__init__"): [("pos_idx_in_fp32", True)],
}


def _resolve(module, dotted):
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("key", list(FLASH_ATTN_2_8), ids=lambda k: f"{k[0].__name__.rsplit('.', 1)[-1]}.{k[1]}")
def test_signature_matches_flash_attn_2_8(key):
    module, dotted = key
    params = list(inspect.signature(_resolve(module, dotted)).parameters.values())
    if "." in dotted:
        assert params[0].name == "self"
        params = params[1:]
    positional = [(p.name, p.default) for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == FLASH_ATTN_2_8[key]
    assert all(p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) for p in params)
    keyword_only = [(p.name, p.default) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keyword_only == EXTRAS.get(key, [])
    # default types too (0 vs 0.0, tuple vs list): flash_attn code may compare them
    for (_, got), (_, want) in zip(positional, FLASH_ATTN_2_8[key]):
        assert type(got) is type(want)


def test_every_exported_drop_in_is_checked():
    checked = {dotted.split(".")[0] for _, dotted in FLASH_ATTN_2_8}
    helpers = {"install", "uninstall", "is_installed", "real_flash_attn_available"}
    assert set(fa.__all__) - helpers <= checked
    assert set(rotary.__all__) <= checked and set(interface.__all__) <= checked
    assert set(fused_dense.__all__) <= checked and set(bert_padding.__all__) <= checked


def _table(module, seqlen):
    module._update_cos_sin_cache(seqlen, device=torch.device("cpu"), dtype=torch.float32)
    return module._cos_cached, module._sin_cached


def test_rotary_embedding_pos_idx_in_fp32():
    """True (the default; flash_attn 2.8's only behaviour): tables from fp32 positions and
    frequencies, also in a module cast to bf16. False: positions in the inv_freq buffer's dtype,
    as flash_attn < 2.8 built them for models trained in pure bf16."""
    dim, seqlen = 8, 2048
    positions = torch.arange(seqlen, dtype=torch.float64)
    inv64 = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.outer(positions, inv64)
    fp32_angles = torch.outer(positions.float(), inv64.float())  # plain fp32: the baseline
    for module in (fa.RotaryEmbedding(dim), fa.RotaryEmbedding(dim).to(torch.bfloat16),
                   fa.RotaryEmbedding(dim, pos_idx_in_fp32=False)):  # fp32 buffer: fp32 either way
        cos, sin = _table(module, seqlen)
        assert_within_baseline("cos", cos, angles.cos(), fp32_angles.cos())
        assert_within_baseline("sin", sin, angles.sin(), fp32_angles.sin())
    fp32 = fa.RotaryEmbedding(dim).to(torch.bfloat16)
    assert fp32.pos_idx_in_fp32 is True and fp32.inv_freq.dtype == torch.bfloat16
    old = fa.RotaryEmbedding(dim, pos_idx_in_fp32=False).to(torch.bfloat16)
    assert old.pos_idx_in_fp32 is False
    cos, sin = _table(old, seqlen)
    bf16_angles = torch.outer(positions.to(torch.bfloat16), old.inv_freq)  # 1995 rounds to 1992
    torch.testing.assert_close(cos, bf16_angles.cos().float(), rtol=0, atol=0)
    torch.testing.assert_close(sin, bf16_angles.sin().float(), rtol=0, atol=0)
    assert torch.equal(cos[1993], cos[1994])  # positions that coincide in bf16
    assert (cos.double() - angles.cos()).abs().max() > 0.1  # far from the fp32 tables
    # XPos decay: fp32 in a cast module with the flag on
    xpos = fa.RotaryEmbedding(dim, scale_base=512)
    cast = fa.RotaryEmbedding(dim, scale_base=512).to(torch.bfloat16)
    assert cast.scale.dtype == torch.bfloat16
    torch.testing.assert_close(_table(cast, 64), _table(xpos, 64), rtol=0, atol=0)


def test_rotary_embedding_bad_arguments():
    with pytest.raises(TypeError, match="device"):
        fa.RotaryEmbedding(8, 10000.0, False, None, True)  # flash_attn < 2.8's positional pos_idx_in_fp32
    with pytest.raises(TypeError, match="pos_idx_in_fp32"):
        fa.RotaryEmbedding(8, pos_idx_in_fp32="yes")
