"""foldops.models.sedd: the original's keys, varlen batches, a float64 DDiT block, precision, errors."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from foldops.device import triton_interpret
from foldops.models.sedd import SEDD, DDiTBlock, Rotary

DATA = json.loads((Path(__file__).parent / "data" / "sedd_original_keys.json").read_text())
CONFIG = DATA["config"]


def _randomise(module, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # the original zero-initialises adaLN and the output layer
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def test_state_dict_keys_and_shapes_equal_the_original():
    model = SEDD(CONFIG)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == DATA["state_dict"]
    g = torch.Generator().manual_seed(1)
    original = {k: torch.randn(shape, generator=g) for k, shape in DATA["state_dict"]}
    model.load_state_dict(original, strict=True)  # an original checkpoint loads unchanged
    assert torch.equal(model.blocks[1].adaLN_modulation.weight, original["blocks.1.adaLN_modulation.weight"])


def test_config_as_attribute_object_and_vocab():
    class Node:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    cfg = Node(tokens=20, graph=Node(type="uniform"),
               model=Node(hidden_size=16, n_heads=2, n_blocks=1, cond_dim=8, dropout=0.0, scale_by_sigma=False))
    model = SEDD(cfg)
    assert model.config is cfg and not model.absorb
    assert model.vocab_embed.embedding.shape == (20, 16)  # no mask token without the absorbing graph
    assert SEDD(CONFIG).config.model.hidden_size == 32  # a dict is readable by attribute, as OmegaConf


def test_padded_batch_equals_each_sequence_alone():
    model = _randomise(SEDD(CONFIG)).eval()
    lengths = [9, 1, 5, 9]
    L = 11  # padded beyond the longest row
    idx = torch.randint(0, 21, (len(lengths), L))
    sigma = torch.rand(len(lengths)) * 3
    with torch.no_grad():
        out = model(idx, sigma, seqlens=torch.tensor(lengths))
        for b, n in enumerate(lengths):
            alone = model(idx[b:b + 1, :n], sigma[b:b + 1])
            torch.testing.assert_close(out[b, :n], alone[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))
        # the log-score of the input token itself is zero, as the original's scatter
        picked = out.gather(-1, idx[..., None])[..., 0]
        assert torch.equal(picked, torch.zeros_like(picked))
        # full-length seqlens is the uniform path
        torch.testing.assert_close(model(idx, sigma, seqlens=[L] * 4), model(idx, sigma))


def _ln(x, w):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _ddit_block64(p, x, cos, sin, c, n_heads):
    """The original DDiTBlock.forward (eval, seqlens=None) in float64, from its source."""
    B, L, dim = x.shape
    mod = c @ p["adaLN_modulation.weight"].T + p["adaLN_modulation.bias"]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:, None].chunk(6, dim=2)
    h = _ln(x, p["norm1.weight"]) * (1 + scale_msa) + shift_msa
    qkv = (h @ p["attn_qkv.weight"].T).reshape(B, L, 3, n_heads, dim // n_heads)
    qkv = qkv * cos + _rotate_half(qkv) * sin  # cos/sin [1, L, 3, 1, D], identity on v
    q, k, v = qkv.unbind(2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(dim // n_heads)
    a = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(B, L, dim)
    x = x + gate_msa * (a @ p["attn_out.weight"].T)
    h = _ln(x, p["norm2.weight"]) * (1 + scale_mlp) + shift_mlp
    h = F.gelu(h @ p["mlp.0.weight"].T + p["mlp.0.bias"], approximate="tanh") @ p["mlp.2.weight"].T + p["mlp.2.bias"]
    return x + gate_mlp * h


def test_ddit_block_against_float64_reference():
    dim, heads, cond = 32, 4, 16
    block = _randomise(DDiTBlock(dim, heads, cond, dropout=0.1)).double().eval()
    p = {k: v for k, v in block.state_dict().items()}
    B, L = 3, 7
    x = torch.randn(B, L, dim, dtype=torch.float64)
    c = torch.randn(B, cond, dtype=torch.float64)
    cos, sin = Rotary(dim // heads)(x)
    assert cos.shape == (1, L, 3, 1, dim // heads) and torch.equal(cos[:, :, 2], torch.ones_like(cos[:, :, 2]))
    cos, sin = cos.double(), sin.double()
    exact = _ddit_block64(p, x, cos, sin, c, heads)
    torch.testing.assert_close(block(x, (cos, sin), c), exact, rtol=1e-10, atol=1e-10)
    # with seqlens: each row equals the reference run on that row alone; padding gives zeros
    lengths = [7, 2, 4]
    out = block(x, (cos, sin), c, seqlens=torch.tensor(lengths))
    for b, n in enumerate(lengths):
        alone = _ddit_block64(p, x[b:b + 1, :n], cos[:, :n], sin[:, :n], c[b:b + 1], heads)
        torch.testing.assert_close(out[b:b + 1, :n], alone, rtol=1e-10, atol=1e-10)
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


def test_precision_options_on_cpu():
    model = _randomise(SEDD(CONFIG)).eval()
    idx = torch.randint(0, 21, (2, 6))
    sigma = torch.rand(2)
    with torch.no_grad():
        full = model(idx, sigma)
        assert full.dtype == torch.float32  # "auto": full precision off CUDA, as the original
        model.amp_dtype = torch.bfloat16
        low = model(idx, sigma, seqlens=[6, 4])
        assert low.dtype == torch.bfloat16
        err = (low[0].float() - full[0]).abs().max() / full[0].abs().max()
        assert err < 0.05  # bf16 matmuls, fp32 residual stream
        model.amp_dtype = torch.float32  # autocast off inside the model, even under an outer one
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(idx, sigma).dtype == torch.float32


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _randomise(SEDD(CONFIG))
    ckpt = copy.deepcopy(model)
    ckpt.activation_checkpointing = True
    idx = torch.randint(0, 21, (3, 8))
    sigma = torch.rand(3)
    grads = []
    for m in (model, ckpt):
        m.train()
        torch.manual_seed(1)  # the same dropout masks
        m(idx, sigma, seqlens=[8, 3, 5]).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_input_is_named():
    model = SEDD(CONFIG)
    idx = torch.randint(0, 21, (2, 5))
    sigma = torch.rand(2)
    with pytest.raises(ValueError, match="seqlens"):
        model(idx, sigma, seqlens=[5, 6])
    with pytest.raises(ValueError, match="seqlens"):
        model(idx, sigma, seqlens=[5, 0])
    with pytest.raises(ValueError, match="seqlens"):
        model(idx, sigma, seqlens=[5])
    with pytest.raises(TypeError, match="seqlens"):
        model(idx, sigma, seqlens=torch.tensor([5.0, 4.0]))
    with pytest.raises(ValueError, match="indices"):
        model(idx[0], sigma)
    with pytest.raises(ValueError, match="sigma"):
        model(idx, sigma[:1])
    with pytest.raises(ValueError, match="model.n_blocks"):
        SEDD({**CONFIG, "model": {k: v for k, v in CONFIG["model"].items() if k != "n_blocks"}})
    with pytest.raises(ValueError, match="graph.type"):
        SEDD({**CONFIG, "graph": {"type": "masked"}})
    with pytest.raises(ValueError, match="amp_dtype"):
        SEDD(CONFIG, amp_dtype="bf16")
    with pytest.raises(ValueError, match="attention_backend: unknown backend 'trition'"):
        SEDD(CONFIG, attention_backend="trition")


@pytest.mark.skipif(not triton_interpret(), reason="CPU tensors reach the Triton kernels only under the interpreter; "
                    "tests/models/test_sedd_gpu.py covers the GPU")
def test_triton_attention_backend_matches_reference():
    """The model on the Triton kernels (under the interpreter on CPU) against the reference backend."""
    pytest.importorskip("triton")
    cfg = {**CONFIG, "model": {**CONFIG["model"], "dropout": 0.0, "n_blocks": 1}}
    model = _randomise(SEDD(cfg, attention_backend="reference"))
    idx = torch.randint(0, 21, (3, 9))
    sigma = torch.rand(3)
    results = []
    for backend in ("reference", "triton"):
        model.attention_backend = backend
        assert all(b.attention_backend == backend for b in model.blocks)
        model.zero_grad()
        out = model(idx, sigma, seqlens=[9, 2, 5])
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pointwise_steps_trace_without_graph_breaks():
    import torch._dynamo as dynamo

    from foldops.models.sedd import bias_dropout_add_scale, modulate_fused

    x, shift, scale = torch.randn(3, 5, 8), torch.randn(3, 1, 8), torch.randn(3, 1, 8)
    assert dynamo.explain(modulate_fused)(x, shift, scale).graph_break_count == 0
    assert dynamo.explain(bias_dropout_add_scale)(x, None, scale, x, 0.1, True).graph_break_count == 0


@pytest.mark.skipif(not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")),
                    reason="Inductor's CPU code needs a C++ compiler")
def test_pointwise_steps_compile_to_one_kernel_each():
    """The docs' claim: torch.compile (Inductor, here its CPU code) fuses each step into
    one pointwise kernel, with and without dropout; the results are eager's."""
    from torch._inductor import metrics

    from foldops.models.sedd import bias_dropout_add_scale, modulate_fused

    x, bias, scale, residual = torch.randn(3, 5, 8), torch.randn(8), torch.randn(3, 1, 8), torch.randn(3, 5, 8)
    cases = [(modulate_fused, (x, bias, scale)),
             (lambda *a: bias_dropout_add_scale(*a, 0.1, False), (x, bias, scale, residual)),
             (lambda *a: bias_dropout_add_scale(*a, 0.1, True), (x, bias, scale, residual))]
    for i, (fn, args) in enumerate(cases):
        torch._dynamo.reset()
        metrics.reset()
        out = torch.compile(fn, fullgraph=True)(*args)
        assert metrics.generated_kernel_count == 1, i
        if i < 2:  # (dropout draws differ)
            torch.testing.assert_close(out, fn(*args))


def test_row_conditioning_functions_gradcheck():
    """The packed per-row modulate / gated add against their gather-then-multiply definitions."""
    from foldops.models._rows import gated_add_rows, modulate_rows

    seq = torch.tensor([0, 0, 0, 1, 2, 2])
    x, h, res = (torch.randn(6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    shift, scale, gate = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda *a: modulate_rows(*a, seq), (x, shift, scale))
    torch.autograd.gradcheck(lambda *a: gated_add_rows(*a, seq), (h, gate, res))
    torch.testing.assert_close(modulate_rows(x, shift, scale, seq), x * (1 + scale[seq]) + shift[seq])
    torch.testing.assert_close(gated_add_rows(h, gate, res, seq), res + gate[seq] * h)
    # mixed dtypes as under autocast: fp32 tokens, bf16 row factors; gradients in each input's dtype
    xf = torch.randn(6, 4, requires_grad=True)
    sb = torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)
    out = modulate_rows(xf, sb, sb, seq)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert xf.grad.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16


def _grads(model, out, weight):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad((out * weight).sum(), params, allow_unused=True)


def test_torch_compile_fullgraph_equals_eager():
    """torch.compile(model, fullgraph=True) in fp64 (dropout off): the logits and parameter
    gradients of eager, zeros at padding, and one graph for every mix of lengths (while
    compiling seqlens are not read on the host: the padded layout with a key mask)."""
    model = _randomise(SEDD(CONFIG, attention_backend="torch")).double().eval()
    idx = torch.randint(0, 21, (3, 8))
    sigma = torch.rand(3, dtype=torch.float64)
    weight = torch.randn(3, 8, 21, dtype=torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for i, lengths in enumerate(([8, 3, 5], [2, 8, 7])):
        seqlens = torch.tensor(lengths)
        want = model(idx, sigma, seqlens=seqlens)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = compiled(idx, sigma, seqlens=seqlens)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for b, n in enumerate(lengths):
            assert torch.equal(got[b, n:], torch.zeros_like(got[b, n:]))
        for g, w in zip(_grads(model, got, weight), _grads(model, want, weight)):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled(idx, sigma), model(idx, sigma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seqlens", [None, torch.zeros(0, dtype=torch.long), []], ids=["none", "tensor", "list"])
def test_empty_batch_gives_empty_outputs(seqlens):
    model = _randomise(SEDD(CONFIG))
    out = model(torch.zeros(0, 5, dtype=torch.long), torch.rand(0), seqlens=seqlens)
    assert out.shape == (0, 5, 21) and out.dtype == torch.float32
    out.sum().backward()
