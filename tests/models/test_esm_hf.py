"""ESM-2 parity with Hugging Face transformers' EsmForMaskedLM / EsmModel (random weights, small
config, fp32, no download), and loading a local save_pretrained directory. Skipped without
transformers (not in the test extra: its install is slow)."""

import pytest
import torch

from foldops.models import ESM2
from foldops.models.esm_alphabet import Alphabet

transformers = pytest.importorskip("transformers")

SEQS = [("a", "MKTAYIAK<mask>QRQISFVKSHFSRQLEERLGLIEVQ"), ("b", "GS<mask>H"), ("c", "ACDEFGHIKLMNPQRSTVWYXBUZO")]


def _config():
    return transformers.EsmConfig(
        vocab_size=33, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=256,
        position_embedding_type="rotary", token_dropout=True, mask_token_id=32, pad_token_id=1,
        layer_norm_eps=1e-5, emb_layer_norm_before=False, max_position_embeddings=1026,
        attn_implementation="eager")


def _randomise(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@pytest.fixture(scope="module")
def hf_mlm():
    torch.manual_seed(0)
    return _randomise(transformers.EsmForMaskedLM(_config())).eval()


def _compare(hf_out, got, tokens, n_layers, logits=True):
    keep = tokens.ne(1)
    # hidden_states: embeddings, then each layer; the last one after the final LayerNorm.
    assert len(hf_out.hidden_states) == n_layers + 1
    for i, h in enumerate(hf_out.hidden_states):
        torch.testing.assert_close(got["representations"][i][keep], h[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["representations"][n_layers][keep], hf_out.last_hidden_state[keep]
                               if hasattr(hf_out, "last_hidden_state") else hf_out.hidden_states[-1][keep],
                               atol=1e-5, rtol=1e-5)
    maps = torch.stack(hf_out.attentions, 1) * (keep[:, None, None, :, None] & keep[:, None, None, None, :])
    torch.testing.assert_close(got["attentions"], maps, atol=1e-6, rtol=1e-5)
    if logits:
        torch.testing.assert_close(got["logits"][keep], hf_out.logits[keep], atol=1e-5, rtol=1e-5)


def test_parity_masked_lm(hf_mlm):
    tokens = Alphabet().get_batch_converter()(SEQS)[2]
    model = ESM2.from_state_dict(hf_mlm.state_dict()).eval()
    assert model.config.attention_heads == 4 and model.config.ffn_dim == 256
    with torch.no_grad():
        want = hf_mlm(tokens, attention_mask=tokens.ne(1).long(), output_hidden_states=True, output_attentions=True)
        got = model(tokens, repr_layers=range(4), return_contacts=True)
        contacts = hf_mlm.esm.predict_contacts(tokens, tokens.ne(1).long())
    _compare(want, got, tokens, 3)
    torch.testing.assert_close(got["contacts"], contacts, atol=1e-6, rtol=1e-5)


def test_parity_esm_model_and_save_pretrained(hf_mlm, tmp_path):
    hf = transformers.EsmModel(_config())
    hf.load_state_dict({k[4:]: v for k, v in hf_mlm.state_dict().items() if k.startswith("esm.")}, strict=False)
    hf.eval()
    tokens = Alphabet().get_batch_converter()(SEQS)[2]
    model = ESM2.from_state_dict(hf.state_dict()).eval()
    assert model.lm_head is None
    with torch.no_grad():
        want = hf(tokens, attention_mask=tokens.ne(1).long(), output_hidden_states=True, output_attentions=True)
        got = model(tokens, repr_layers=range(4), need_head_weights=True)
    assert "logits" not in got
    _compare(want, got, tokens, 3, logits=False)
    hf_mlm.save_pretrained(tmp_path)
    loaded = ESM2.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ref = hf_mlm(tokens, attention_mask=tokens.ne(1).long())
        torch.testing.assert_close(loaded(tokens)["logits"][tokens.ne(1)], ref.logits[tokens.ne(1)],
                                   atol=1e-5, rtol=1e-5)
