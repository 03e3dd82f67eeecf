"""foldops.nn.VarlenSelfAttention: flash_attn MHA parameter names, packed == padded ==
each sequence alone, dropout only in training."""

import pytest
import torch

from foldops.nn import VarlenSelfAttention


def test_state_dict_keys_and_shapes():
    layer = VarlenSelfAttention(64, 8, num_heads_kv=2)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {"Wqkv.weight": (96, 64), "Wqkv.bias": (96,), "out_proj.weight": (64, 64),
                      "out_proj.bias": (64,)}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_equals_each_sequence_alone_and_padded(causal):
    layer = VarlenSelfAttention(32, 4, num_heads_kv=2, causal=causal, dtype=torch.float64, backend="torch")
    lens = [5, 1, 9]
    x = torch.randn(sum(lens), 32, dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    packed = layer(x, cu, 9)
    alone = torch.cat([layer(x[a:b], torch.tensor([0, b - a], dtype=torch.int32), b - a)
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert (packed - alone).abs().max() < 1e-12
    if not causal:  # the padded form keeps each row's real keys (a key-padding mask)
        xp = torch.zeros(3, 9, 32, dtype=torch.float64)
        keep = torch.zeros(3, 9, dtype=torch.bool)
        for b, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            xp[b, : e - a], keep[b, : e - a] = x[a:e], True
        padded = layer(xp, key_padding_mask=keep)
        assert (padded[keep] - packed).abs().max() < 1e-12


def test_dropout_only_in_training():
    layer = VarlenSelfAttention(16, 2, dropout=0.5)
    x = torch.randn(12, 16)
    cu = torch.tensor([0, 12], dtype=torch.int32)
    layer.eval()
    assert torch.equal(layer(x, cu, 12), layer(x, cu, 12))
    layer.train()
    assert not torch.equal(layer(x, cu, 12), layer(x, cu, 12))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads_kv"):
        VarlenSelfAttention(32, 4, num_heads_kv=3)
    layer = VarlenSelfAttention(32, 4)
    with pytest.raises(ValueError, match="x: packed"):
        layer(torch.randn(2, 5, 32), torch.tensor([0, 5], dtype=torch.int32), None)
