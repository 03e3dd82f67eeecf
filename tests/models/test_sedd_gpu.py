"""SEDD and the flash_attn drop-ins on a CUDA GPU (bf16 autocast by default, Triton/varlen backends)."""

import math

import pytest
import torch

import foldops.compat.flash_attn as fa
from foldops.models import SEDD
from foldops.testing import assert_within_baseline

pytestmark = pytest.mark.gpu

CONFIG = {"tokens": 25, "graph": {"type": "absorb"},
          "model": {"hidden_size": 128, "n_heads": 4, "n_blocks": 2, "cond_dim": 64, "dropout": 0.1,
                    "scale_by_sigma": True}}


def _model():
    torch.manual_seed(0)
    model = SEDD(CONFIG).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_sedd_bf16_padded_batch_matches_rows_alone_on_cuda():
    model = _model().eval()
    lengths = [300, 1, 77, 129, 64]
    idx = torch.randint(0, 26, (len(lengths), 320), device="cuda")
    sigma = torch.rand(len(lengths), device="cuda")
    with torch.no_grad():
        out = model(idx, sigma, seqlens=torch.tensor(lengths, device="cuda"))
        assert out.dtype == torch.bfloat16  # "auto" is the original's bf16 autocast on CUDA
        for b, n in enumerate(lengths):
            alone = model(idx[b:b + 1, :n], sigma[b:b + 1])[0].float()
            scale = alone.abs().max().item()
            assert (out[b, :n].float() - alone).abs().max().item() <= 0.02 * scale + 1e-3
            assert torch.count_nonzero(out[b, n:]) == 0


def test_sedd_train_step_on_cuda_with_checkpointing():
    model = _model().train()
    model.activation_checkpointing = True
    idx = torch.randint(0, 26, (4, 200), device="cuda")
    lengths = torch.tensor([200, 17, 150, 99], device="cuda")
    model(idx, torch.rand(4, device="cuda"), seqlens=lengths).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_varlen_func_on_cuda(dtype, causal):
    lengths = [1, 63, 64, 65, 200, 511]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    H, Hk, D = 8, 2, 64
    q = torch.randn(sum(lengths), H, D, device="cuda", dtype=dtype)
    k = torch.randn(sum(lengths), Hk, D, device="cuda", dtype=dtype)
    v = torch.randn(sum(lengths), Hk, D, device="cuda", dtype=dtype)
    out = fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)

    def exact(qq, kk, vv, tp):
        res = []
        for b in range(len(lengths)):
            s = slice(int(cu[b]), int(cu[b + 1]))
            qb, kb, vb = (t[s].to(tp) for t in (qq, kk, vv))
            kb, vb = kb.repeat_interleave(H // Hk, 1), vb.repeat_interleave(H // Hk, 1)
            sc = torch.einsum("ihd,jhd->hij", qb, kb) / math.sqrt(D)
            if causal:
                n = qb.shape[0]
                sc = sc.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
            res.append(torch.einsum("hij,jhd->ihd", sc.softmax(-1), vb))
        return torch.cat(res)

    assert_within_baseline("out", out, exact(q, k, v, torch.float64), exact(q, k, v, dtype))
