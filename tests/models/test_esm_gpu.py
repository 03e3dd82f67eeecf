"""ESM-2 on a CUDA GPU (cc >= 8.0): the Triton attention path against the reference backend in
fp32, and bf16 autocast against fp32 within the error of fair-esm's own bf16 run."""

import pytest
import torch

from foldops.models import ESM2, ESM2Config
from foldops.models.esm_alphabet import Alphabet

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    return ESM2(ESM2Config(num_layers=4, embed_dim=128, attention_heads=8)).cuda().eval()


def _tokens():
    g = torch.Generator().manual_seed(0)
    seqs = ["".join("ACDEFGHIKLMNPQRSTVWY"[i] for i in torch.randint(0, 20, (n,), generator=g).tolist())
            for n in (1, 17, 130, 257, 64)]
    return Alphabet().get_batch_converter()(seqs)[2].cuda()


def test_triton_matches_reference_fp32():
    model, tokens = _model(), _tokens()
    keep = tokens.ne(1)
    with torch.no_grad():
        want = model(tokens, repr_layers=[2, 4], backend="reference")
        for backend in ("triton", "torch"):
            got = model(tokens, repr_layers=[2, 4], backend=backend)
            torch.testing.assert_close(got["logits"][keep], want["logits"][keep], atol=1e-4, rtol=1e-4)


def test_bf16_within_fair_esm_bf16_error():
    esm = pytest.importorskip("esm")
    from esm.model.esm2 import ESM2 as FairESM2

    model, tokens = _model(), _tokens()
    def fair():  # a fresh one per precision: fair-esm caches its rotary tables in the first dtype seen
        ref = FairESM2(num_layers=4, embed_dim=128, attention_heads=8,
                       alphabet=esm.data.Alphabet.from_architecture("ESM-1b")).cuda().eval()
        ref.load_state_dict(model.state_dict(), strict=False)
        return ref

    keep = tokens.ne(1)
    with torch.no_grad():
        exact = fair().double()(tokens)["logits"][keep]
        ref = fair()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            base = ref(tokens)["logits"][keep].double()
            got = model(tokens, attn_layers=[4])["logits"][keep].double()
    base_err = (base - exact).abs().max().item()
    err = (got - exact).abs().max().item()
    assert err <= 2 * base_err + 1e-3, (err, base_err)
