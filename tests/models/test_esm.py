"""ESM-2 (foldops.models.esm): parity with fair-esm's ESM2 (random weights, small config, fp32),
batch/padding independence, backends, weights I/O, frozen features, tokenizer, errors.
Parity with Hugging Face transformers is in test_esm_hf.py."""

import copy

import pytest
import torch

from foldops.models import ESM2, ESM2Config
from foldops.models.esm_alphabet import Alphabet

SEQS = [("a", "MKTAYIAK<mask>QRQISFVKSHFSRQLEERLGLIEVQ"), ("b", "GS<mask>H"), ("c", "ACDEFGHIKLMNPQRSTVWYXBUZO"),
        ("d", "M")]


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.1))
    return module


def _small(layers=3, dim=64, heads=4, **kw):
    return _randomise(ESM2(ESM2Config(num_layers=layers, embed_dim=dim, attention_heads=heads, **kw))).eval()


def _tokens(seqs=SEQS):
    return Alphabet().get_batch_converter()(seqs)[2]


# fair-esm parity -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fair():
    esm = pytest.importorskip("esm")
    from esm.model.esm2 import ESM2 as FairESM2

    torch.manual_seed(0)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    ref = _randomise(FairESM2(num_layers=3, embed_dim=64, attention_heads=4, alphabet=alphabet,
                              token_dropout=True)).eval()
    return esm, alphabet, ref


def test_fp64_parity_with_fair_esm(fair, monkeypatch):
    """An fp64 model computes in fp64 throughout (rotary angles, token-dropout scaling, the
    maps' softmax, the contact head): fair-esm in fp64 to 1e-12, with fair-esm's attention
    softmax (fp32 whatever its input) lifted to fp64."""
    import esm.multihead_attention as mha

    monkeypatch.setattr(mha, "utils_softmax", lambda x, dim, onnx_trace=False: torch.softmax(x, dim))
    _, alphabet, ref = fair
    ref64 = copy.deepcopy(ref).double()
    tokens = alphabet.get_batch_converter()(SEQS)[2]
    model = ESM2.from_state_dict(ref.state_dict()).double().eval()
    with torch.no_grad():
        want = ref64(tokens, repr_layers=[0, 3], return_contacts=True)
        got = model(tokens, repr_layers=[0, 3], return_contacts=True)
    keep = tokens.ne(alphabet.padding_idx)
    for i in (0, 3):
        torch.testing.assert_close(got["representations"][i][keep], want["representations"][i][keep],
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["logits"][keep], want["logits"][keep], rtol=1e-12, atol=1e-12)
    for key in ("attentions", "contacts"):
        assert got[key].dtype == torch.float64
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)


def test_alphabet_and_batch_converter_match_fair_esm(fair):
    esm, alphabet, _ = fair
    mine = Alphabet()
    assert mine.all_toks == alphabet.all_toks and len(mine) == 33
    for name in ("padding_idx", "cls_idx", "eos_idx", "unk_idx", "mask_idx"):
        assert getattr(mine, name) == getattr(alphabet, name)
    for trunc in (None, 5):
        ref = alphabet.get_batch_converter(trunc)(SEQS)
        got = mine.get_batch_converter(trunc)(SEQS)
        assert ref[0] == tuple(got[0]) or list(ref[0]) == got[0]
        assert torch.equal(ref[2], got[2])


def test_parity_with_fair_esm(fair):
    _, alphabet, ref = fair
    tokens = alphabet.get_batch_converter()(SEQS)[2]
    model = ESM2.from_state_dict(ref.state_dict()).eval()
    with torch.no_grad():
        want = ref(tokens, repr_layers=[0, 1, 2, 3], return_contacts=True)
        got = model(tokens, repr_layers=[0, 1, 2, 3], return_contacts=True)
    keep = tokens.ne(alphabet.padding_idx)
    for i in range(4):
        torch.testing.assert_close(got["representations"][i][keep], want["representations"][i][keep],
                                   atol=1e-5, rtol=1e-5)
        assert (got["representations"][i][~keep] == 0).all()
    torch.testing.assert_close(got["logits"][keep], want["logits"][keep], atol=1e-5, rtol=1e-5)
    assert got["attentions"].shape == want["attentions"].shape == (4, 3, 4, tokens.shape[1], tokens.shape[1])
    torch.testing.assert_close(got["attentions"], want["attentions"], atol=1e-6, rtol=1e-5)
    assert got["contacts"].shape == want["contacts"].shape
    torch.testing.assert_close(got["contacts"], want["contacts"], atol=1e-6, rtol=1e-5)
    # A subset of layers gives the same maps; without maps no 'attentions' key.
    with torch.no_grad():
        sub = model(tokens, attn_layers=[3, 1])
        plain = model(tokens)
    torch.testing.assert_close(sub["attentions"], want["attentions"][:, [0, 2]], atol=1e-6, rtol=1e-5)
    assert "attentions" not in plain and "contacts" not in plain
    torch.testing.assert_close(plain["logits"][keep], want["logits"][keep], atol=1e-5, rtol=1e-5)


def test_fair_esm_checkpoint_file(fair, tmp_path):
    _, alphabet, ref = fair
    sd = {("encoder." if "lm_head" in k else "encoder.sentence_encoder.") + k: v
          for k, v in ref.state_dict().items() if not k.startswith("contact_head")}
    path = tmp_path / "esm2_small.pt"
    torch.save({"model": sd, "cfg": {"model": {"encoder_attention_heads": 4, "token_dropout": True}}}, path)
    with pytest.raises(ValueError, match="contact-regression"):
        ESM2.from_pretrained(path)
    torch.save({"model": {"contact_head." + k: v for k, v in ref.contact_head.state_dict().items()}},
               tmp_path / "esm2_small-contact-regression.pt")
    model = ESM2.from_pretrained(path).eval()
    tokens = alphabet.get_batch_converter()(SEQS)[2]
    with torch.no_grad():
        torch.testing.assert_close(model.predict_contacts(tokens), ref.predict_contacts(tokens), atol=1e-6, rtol=1e-5)


# Behaviour ------------------------------------------------------------------------------

def test_outputs_independent_of_batch_and_padding():
    model = _small()
    tokens = _tokens()
    with torch.no_grad():
        full = model(tokens, repr_layers=[1, 3], need_head_weights=True)
        for i, (label, seq) in enumerate(SEQS):
            alone = _tokens([(label, seq)])
            wide = torch.cat([alone, torch.ones(1, 7, dtype=alone.dtype)], 1)  # extra padding
            for tok in (alone, wide):
                one = model(tok, repr_layers=[1, 3], need_head_weights=True)
                n = int(tok.ne(1).sum())
                for key in ("logits",):
                    torch.testing.assert_close(one[key][0, :n], full[key][i, :n], atol=1e-5, rtol=1e-5)
                for layer in (1, 3):
                    torch.testing.assert_close(one["representations"][layer][0, :n],
                                               full["representations"][layer][i, :n], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(one["attentions"][0, ..., :n, :n], full["attentions"][i, ..., :n, :n],
                                           atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backends_agree_with_reference(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model = _small(layers=2, dim=32, heads=2)
    tokens = _tokens(SEQS[1:])
    with torch.no_grad():
        want = model(tokens, repr_layers=[1, 2], backend="reference")
        got = model(tokens, repr_layers=[1, 2], backend=backend)
    keep = tokens.ne(1)
    for layer in (1, 2):
        torch.testing.assert_close(got["representations"][layer][keep], want["representations"][layer][keep],
                                   atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["logits"][keep], want["logits"][keep], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_close_to_fp32(dtype):
    model = _small()
    tokens = _tokens()
    keep = tokens.ne(1)
    with torch.no_grad():
        want = model(tokens, attn_layers=[3])
        with torch.autocast("cpu", dtype=dtype):
            got = model(tokens, attn_layers=[3])
    assert torch.isfinite(got["logits"]).all() and torch.isfinite(got["attentions"]).all()
    scale = want["logits"][keep].abs().max()
    assert (got["logits"].float() - want["logits"])[keep].abs().max() < 0.1 * scale


def test_features_node_and_pair():
    model = _small()
    tokens = _tokens()
    node, pair = model.features(tokens, layers=[0, 3])
    assert pair is None and node.shape == (4, tokens.shape[1] - 2, 2, 64)
    with torch.no_grad():
        out = model(tokens, repr_layers=[0, 3], need_head_weights=True)
    residue = tokens.ne(0) & tokens.ne(1) & tokens.ne(2)
    res = residue[:, 1:-1]
    torch.testing.assert_close(node[:, :, 1][res], out["representations"][3][:, 1:-1][res])
    assert (node[~res] == 0).all()
    node2, pair = model.features(tokens, layers=[3], pair=True, pair_layers=[2, 3])
    assert pair.shape == (4, tokens.shape[1] - 2, tokens.shape[1] - 2, 2 * 4)
    want = out["attentions"][:, 1:3].permute(0, 3, 4, 1, 2).flatten(3)[:, 1:-1, 1:-1]
    pm = res[:, :, None] & res[:, None, :]
    torch.testing.assert_close(pair[pm], want[pm])
    torch.testing.assert_close(node2[:, :, 0], node[:, :, 1])


def test_state_dict_round_trip_and_errors():
    model = _small()
    again = ESM2.from_state_dict(model.state_dict())
    assert again.config == model.config
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens)["logits"], model(tokens)["logits"])
    sd = model.state_dict()
    bad = {k: v for k, v in sd.items() if k != "layers.1.fc2.bias"}
    bad["layers.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.fc2.bias'\]; unexpected keys "
                                         r"\['layers.1.extra.weight'\]"):
        ESM2.from_state_dict(bad)
    small = ESM2(ESM2Config(num_layers=3, embed_dim=32, attention_heads=4))
    with pytest.raises(ValueError, match="shape mismatches"):
        ESM2.from_state_dict(sd, config=small.config)
    with pytest.raises(ValueError, match="not an ESM-2 state dict"):
        ESM2.from_state_dict({"foo.weight": torch.zeros(2)})


def test_input_errors():
    model = _small(max_positions=12)
    with pytest.raises(ValueError, match="max_positions=12"):
        model(_tokens([("long", "A" * 11)]))
    model(_tokens([("ok", "A" * 10)]))
    with pytest.raises(ValueError, match="only padding"):
        model(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"ids in \[0, 33\)"):
        model(torch.full((1, 3), 40))
    with pytest.raises(ValueError, match="repr_layers: layer 4"):
        model(_tokens(), repr_layers=[4])
    with pytest.raises(ValueError, match="backend: unknown backend 'trition'"):
        ESM2(ESM2Config(num_layers=1, embed_dim=32, attention_heads=4), backend="trition")


def test_tokenizer_round_trip_and_errors():
    alphabet = Alphabet()
    bc = alphabet.get_batch_converter()
    labels, strs, tokens = bc(["MKV<mask>X", "GS"])
    assert labels == [None, None] and tokens[0, 0] == alphabet.cls_idx and tokens[1, 3] == alphabet.eos_idx
    assert tokens[1, 4] == alphabet.padding_idx
    assert alphabet.decode(tokens[0]) == "MKV<mask>X" and alphabet.decode(tokens[1]) == "GS"
    assert alphabet.encode("M K\nV") == alphabet.encode("MKV")
    with pytest.raises(ValueError, match=r"character 'J' at position 2"):
        bc([("p", "MKJ")])
    assert alphabet.get_batch_converter(unknown="unk")(["MKJ"])[2][0, 3] == alphabet.unk_idx
    with pytest.raises(ValueError, match="empty sequence"):
        bc([("p", "MK"), ("q", "")])
    with pytest.raises(ValueError, match="empty batch"):
        bc([])


def test_gradients_flow_with_and_without_maps():
    model = _small(layers=2, dim=32, heads=2)
    tokens = _tokens(SEQS[1:])
    for kwargs in ({}, {"attn_layers": [2]}):
        model.zero_grad()
        out = model(tokens, backend="torch", **kwargs)
        loss = out["logits"][tokens.ne(1)].square().mean() + sum(a.sum() for k, a in out.items() if k == "attentions")
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("contact_head")}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
            [n for n, g in grads.items() if g is None]
    # Same gradient through the fast op and the map path.
    model.zero_grad()
    model(tokens, backend="torch")["logits"].sum().backward()
    trained = [p for n, p in model.named_parameters() if not n.startswith("contact_head")]
    fast = [p.grad.clone() for p in trained]
    model.zero_grad()
    model(tokens, backend="torch", need_head_weights=True)["logits"].sum().backward()
    for a, b in zip(fast, (p.grad for p in trained)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph_equals_eager():
    """torch.compile(model, fullgraph=True) in fp64: the logits, representations, maps and
    parameter gradients of eager, zeros at padding, one graph for every mix of lengths
    (while compiling nothing is read on the host: the padded batch with a key mask)."""
    model = _small(layers=2, dim=32, heads=4).double()
    model.backend = "torch"
    batches = [_tokens([("a", "MKTAYIAK"), ("b", "GS<mask>H"), ("c", "ACDEFGHI")]),
               _tokens([("a", "MK"), ("b", "GSHKLMNP"), ("c", "ACD")])]
    assert batches[0].shape == batches[1].shape
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    params = list(model.parameters())
    for i, tokens in enumerate(batches):
        want = model(tokens, repr_layers=[1], attn_layers=[2])
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(tokens, repr_layers=[1], attn_layers=[2])
        pad = tokens.eq(1)
        for key in ("logits", "attentions"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["representations"][1], want["representations"][1], rtol=1e-12, atol=1e-12)
        assert (got["logits"][pad] == 0).all() and (got["representations"][1][pad] == 0).all()
        weight = torch.randn(want["logits"].shape, dtype=torch.float64)
        for g, w in zip(torch.autograd.grad((got["logits"] * weight).sum(), params, allow_unused=True),
                        torch.autograd.grad((want["logits"] * weight).sum(), params, allow_unused=True)):
            assert (g is None) == (w is None)  # the contact head is not used
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_compiled_batch_padded_with_a_dummy_row_trains_finite():
    """Under compile the rows are not checked: a row of padding only (a batch padded to a
    fixed size, to avoid recompiles) must leave the real rows as eager computes them and
    every gradient finite (token dropout's masked share was 0/0 there)."""
    model = _small(layers=2, dim=32, heads=4).double()
    model.backend = "torch"
    real = _tokens([("a", "MKTAYIAK"), ("b", "GS<mask>H")])
    tokens = torch.cat([real, torch.full((1, real.shape[1]), 1)])  # 1: the padding id
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(tokens)["logits"]
    want = model(real)["logits"]
    torch.testing.assert_close(got[:2], want, rtol=1e-12, atol=1e-12)
    assert (got[2] == 0).all()
    got[:2].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_batch_gives_empty_outputs():
    model = _small(layers=2, dim=32, heads=4)
    tokens = torch.zeros(0, 5, dtype=torch.long)
    out = model(tokens, repr_layers=[0, 2], return_contacts=True)
    assert out["logits"].shape == (0, 5, 33)
    assert {i: r.shape for i, r in out["representations"].items()} == {0: (0, 5, 32), 2: (0, 5, 32)}
    assert out["attentions"].shape == (0, 2, 4, 5, 5) and out["contacts"].shape == (0, 3, 3)
    out["logits"].sum().backward()  # an empty batch trains as a no-op
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    node, pair = model.features(tokens, pair=True)
    assert node.shape == (0, 3, 3, 32) and pair.shape == (0, 3, 3, 8)
