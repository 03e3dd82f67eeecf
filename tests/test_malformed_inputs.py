"""Malformed and edge-case calls of every op and layer (issue: reliability).

``CASES`` is one row per malformed call: an id, the call, the exception type and a
fragment of its message (and, optionally, environment variables set for the call).
Every op and layer, the ones still to come included, adds its rows here. Below the
table, one fault test per behaviour the table cannot express (masked keys that hold
NaN/inf, rows of -inf logits, empty inputs).
"""

from __future__ import annotations

import math

import pytest
import torch

from foldops import nn as fnn
from foldops import ops
from foldops.backends import BackendUnavailableError

B, N, H, D = 2, 5, 2, 8
BACKENDS = ("torch", "reference")


def g(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def tri(backend="torch", mask=None, scale=None, **over):
    a = dict(q=g(B, 3, N, H, D), k=g(B, 3, N, H, D), v=g(B, 3, N, H, D), bias=g(B, H, N, N))
    a.update(over)
    return ops.triangle_attention(a["q"], a["k"], a["v"], a["bias"], mask, scale=scale, backend=backend)


def apb(backend="torch", mask=None, scale=None, keys=N):
    q, k, v = g(B, 2, N, H, D), g(B, 2, keys, H, D), g(B, 2, keys, H, D)
    return ops.attention_pair_bias(q, k, v, g(B, H, N, keys), mask, scale=scale, backend=backend)


def pwa(backend="torch", mask=None):
    return ops.pair_weighted_averaging(g(B, 3, N, H, D), g(B, H, N, N), mask, backend=backend)


def opm(backend="torch", mask=None):
    return ops.outer_product_mean(g(B, 3, N, 4), g(B, 3, N, 3), mask, g(6, 12), g(6), backend=backend)


def trimul_weights(c=4):
    w = {k: g(c) for k in ("norm_in_weight", "norm_in_bias", "norm_out_weight", "norm_out_bias")}
    w.update(p_in_weight=g(2 * c, c), g_in_weight=g(2 * c, c), p_out_weight=g(c, c), g_out_weight=g(c, c))
    return w


def trimul(backend="torch", mask=None, eps=1e-5):
    return ops.triangle_multiplication(g(B, N, N, 4), mask, direction="outgoing", eps=eps, backend=backend,
                                       **trimul_weights())


def transition(backend="torch", eps=1e-5):
    w = dict(norm_weight=g(4), norm_bias=g(4), fc1_weight=g(8, 4), fc2_weight=g(8, 4), fc3_weight=g(4, 8))
    return ops.swiglu_transition(g(B, N, 4), eps=eps, backend=backend, **w)


def half(*shape):
    return torch.full(shape, 0.5)


def with_value(shape, value):
    m = torch.ones(shape)
    m[0, 0] = value
    return m


PAIR = fnn.PairformerLayer(16, 8, num_heads=2, pairwise_head_width=4, pairwise_num_heads=2)
MSA = fnn.MSALayer(8, 8, 0.0, 0.0, pairwise_head_width=4, pairwise_num_heads=2)


def pairformer(s=None, mask=None, pair_mask=None, **kw):
    s = g(B, N, 16) if s is None else s
    mask = torch.ones(B, N) if mask is None else mask
    pair_mask = torch.ones(B, N, N) if pair_mask is None else pair_mask
    return PAIR(s, g(B, N, N, 8), mask, pair_mask, **kw)


def msa(m=None, token_mask=None, msa_mask=None):
    m = g(B, 3, N, 8) if m is None else m
    token_mask = torch.ones(B, N, N) if token_mask is None else token_mask
    msa_mask = torch.ones(B, 3, N) if msa_mask is None else msa_mask
    return MSA(g(B, N, N, 8), m, token_mask, msa_mask)


MASK_MSG = "expected a bool mask or one holding only 0 and 1"
FINITE = "scale: expected a finite float"

CASES = [
    # Item 1: masks holding values other than 0/1, every op and layer.
    *[(f"tri-mask-{v}-{b}", lambda v=v, b=b: tri(b, mask=with_value((B, 3, N), v)), ValueError, f"mask: {MASK_MSG}")
      for v in (0.5, 2.0, -1.0, math.nan) for b in BACKENDS],
    ("tri-mask-int-2", lambda: tri(mask=torch.full((B, 3, N), 2, dtype=torch.int64)), ValueError, "mask: " + MASK_MSG),
    ("apb-mask-half", lambda: apb(mask=half(B, N)), ValueError, "mask: " + MASK_MSG),
    ("apb-windowed-mask-half", lambda: apb(mask=half(B, 3), keys=3), ValueError, "mask: " + MASK_MSG),
    ("pwa-mask-half", lambda: pwa(mask=half(B, N, N)), ValueError, "mask: " + MASK_MSG),
    ("opm-mask-half", lambda: opm(mask=half(B, 3, N)), ValueError, "mask: " + MASK_MSG),
    ("trimul-mask-nan", lambda: trimul(mask=with_value((B, N, N), math.nan)), ValueError, "mask: " + MASK_MSG),
    ("layer-tri-att-mask-half", lambda: fnn.TriangleAttention(8, 4, 2)(g(B, N, N, 8), half(B, N, N)),
     ValueError, "mask: " + MASK_MSG),
    ("layer-trimul-mask-half", lambda: fnn.TriangleMultiplicationOutgoing(8)(g(B, N, N, 8), half(B, N, N)),
     ValueError, "mask: " + MASK_MSG),
    ("layer-pwa-mask-half", lambda: fnn.PairWeightedAveraging(8, 8, 4, 2)(g(B, 3, N, 8), g(B, N, N, 8), half(B, N, N)),
     ValueError, "mask: " + MASK_MSG),
    ("layer-opm-mask-half", lambda: fnn.OuterProductMean(8, 4, 8)(g(B, 3, N, 8), half(B, 3, N)),
     ValueError, "mask: " + MASK_MSG),
    ("layer-apb-mask-half", lambda: fnn.AttentionPairBias(16, 8, 2)(g(B, N, 16), g(B, N, N, 8), half(B, N), g(B, N, 16)),
     ValueError, "mask: " + MASK_MSG),
    ("pairformer-pair-mask-half", lambda: pairformer(pair_mask=0.5 * torch.ones(B, N, N)), ValueError,
     "pair_mask: " + MASK_MSG),
    ("pairformer-mask-half", lambda: pairformer(mask=0.5 * torch.ones(B, N)), ValueError, "mask: " + MASK_MSG),
    ("msa-token-mask-2", lambda: msa(token_mask=2 * torch.ones(B, N, N)), ValueError, "token_mask: " + MASK_MSG),
    ("msa-msa-mask-half", lambda: msa(msa_mask=half(B, 3, N)), ValueError, "msa_mask: " + MASK_MSG),
    # Item 2: non-finite scales on every backend that takes a scale.
    *[(f"tri-scale-{s}-{b}", lambda s=s, b=b: tri(b, scale=s), ValueError, FINITE)
      for s in (math.nan, math.inf, -math.inf) for b in BACKENDS],
    *[(f"apb-scale-{s}-{b}-{keys}", lambda s=s, b=b, keys=keys: apb(b, scale=s, keys=keys), ValueError, FINITE)
      for s in (math.nan, math.inf) for b in BACKENDS for keys in (N, 3)],
    ("tri-scale-str", lambda: tri(scale="1"), ValueError, FINITE),
    ("trimul-eps-nan", lambda: trimul(eps=math.nan), ValueError, "eps: expected a positive float"),
    ("transition-eps-inf", lambda: transition(eps=math.inf), ValueError, "eps: expected a positive float"),
    # Item 5: FOLDOPS_BACKEND names no backend of any op: an error naming the valid ones.
    *[(f"env-global-{name}-{op.__name__}", lambda op=op: op("auto"), BackendUnavailableError,
       f"FOLDOPS_BACKEND: unknown backend {name!r}; valid: ", {"FOLDOPS_BACKEND": name})
      for name in ("bogus", "trition", "TORCH") for op in (tri, apb, pwa, opm, trimul, transition)],
    ("env-per-op-bogus", lambda: tri("auto"), BackendUnavailableError, "FOLDOPS_BACKEND_TRIANGLE_ATTENTION: op 'triangle_attention' "
     "has no backend 'bogus'", {"FOLDOPS_BACKEND_TRIANGLE_ATTENTION": "bogus"}),
    *[(f"env-apb-bogus-{keys}", lambda keys=keys: apb("auto", keys=keys), BackendUnavailableError,
       "FOLDOPS_BACKEND_ATTENTION_PAIR_BIAS: op 'attention_pair_bias' has no backend 'bogus'",
       {"FOLDOPS_BACKEND_ATTENTION_PAIR_BIAS": "bogus"}) for keys in (N, 3)],
    # Item 9: dtypes and channels checked at the layer's door.
    ("layer-tri-att-fp64-x", lambda: fnn.TriangleAttention(8, 4, 2)(g(B, N, N, 8, dtype=torch.float64)),
     TypeError, "x: expected dtype torch.float32"),
    ("layer-trimul-fp64-x", lambda: fnn.TriangleMultiplicationOutgoing(8)(g(B, N, N, 8, dtype=torch.float64)),
     TypeError, "x: expected dtype torch.float32"),
    ("layer-transition-fp64-x", lambda: fnn.Transition(8, 16)(g(B, N, 8, dtype=torch.float64)),
     TypeError, "x: expected dtype torch.float32"),
    ("layer-apb-fp64-s", lambda: fnn.AttentionPairBias(16, 8, 2)(g(B, N, 16, dtype=torch.float64), g(B, N, N, 8),
                                                                  None, g(B, N, 16, dtype=torch.float64)),
     TypeError, "s: expected dtype torch.float32"),
    ("pairformer-fp64-s", lambda: pairformer(s=g(B, N, 16, dtype=torch.float64)), TypeError,
     "s: expected dtype torch.float32"),
    ("pairformer-s-channels", lambda: pairformer(s=g(B, N, 12)), ValueError, r"s: expected shape (2, 5, 16)"),
    ("msa-fp64-m", lambda: msa(m=g(B, 3, N, 8, dtype=torch.float64)), TypeError, "m: expected dtype torch.float32"),
    # Half-precision inputs to a float32 layer outside autocast (under autocast they run).
    ("layer-tri-att-half-x", lambda: fnn.TriangleAttention(8, 4, 2)(g(B, N, N, 8, dtype=torch.float16)),
     TypeError, "x: expected dtype torch.float32 (the layer's parameters) outside autocast"),
    ("layer-opm-bf16-m", lambda: fnn.OuterProductMean(8, 4, 8)(g(B, 3, N, 8, dtype=torch.bfloat16), torch.ones(B, 3, N)),
     TypeError, "m: expected dtype torch.float32 (the layer's parameters) outside autocast"),
    ("layer-pwa-bf16-z", lambda: fnn.PairWeightedAveraging(8, 8, 4, 2)(g(B, 3, N, 8), g(B, N, N, 8, dtype=torch.bfloat16),
                                                                        torch.ones(B, N, N)),
     TypeError, "z: expected dtype torch.float32 (the layer's parameters) outside autocast"),
    ("layer-apb-half-s", lambda: fnn.AttentionPairBias(16, 8, 2)(g(B, N, 16, dtype=torch.float16), g(B, N, N, 8),
                                                                  None, g(B, N, 16)),
     TypeError, "s: expected dtype torch.float32 (the layer's parameters) outside autocast"),
    ("pairformer-bf16-z", lambda: PAIR(g(B, N, 16), g(B, N, N, 8, dtype=torch.bfloat16), torch.ones(B, N),
                                       torch.ones(B, N, N)), TypeError,
     "z: expected dtype torch.float32 (the layer's parameters) outside autocast"),
    ("pairformer-bf16-parameters", lambda: fnn.PairformerLayer(16, 8, 2, 0.0, 4, 2).bfloat16()(
        g(B, N, 16, dtype=torch.bfloat16), g(B, N, N, 8, dtype=torch.bfloat16), torch.ones(B, N), torch.ones(B, N, N)),
     TypeError, "PairformerLayer: parameters in torch.bfloat16 are not supported"),
    # Item 10: errors name the argument the caller passed.
    ("pairformer-pair-mask-shape", lambda: pairformer(pair_mask=torch.ones(B, N)), ValueError,
     "pair_mask: expected shape (2, 5, 5)"),
    ("pairformer-mask-shape", lambda: pairformer(mask=torch.ones(B, N, N)), ValueError, "mask: expected shape (2, 5)"),
    ("pairformer-chunk-0", lambda: pairformer(chunk_size_tri_attn=0), ValueError,
     "chunk_size_tri_attn: expected a positive int"),
    ("msa-token-mask-shape", lambda: msa(token_mask=torch.ones(B, N)), ValueError, "token_mask: expected shape"),
    ("msa-msa-mask-shape", lambda: msa(msa_mask=torch.ones(B, N)), ValueError, "msa_mask: expected shape"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_call_is_refused_by_name(case, monkeypatch):
    _, call, error, fragment, *env = case
    monkeypatch.delenv("FOLDOPS_BACKEND", raising=False)
    for name, value in (env[0] if env else {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(error) as info:
        with torch.no_grad():
            call()
    assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_a_valid_backend_name_that_an_op_lacks_is_skipped(monkeypatch):
    """Item 5: FOLDOPS_BACKEND=cuequivariance (a backend of triangle multiplication only)
    leaves the other ops on auto."""
    monkeypatch.setenv("FOLDOPS_BACKEND", "cuequivariance")
    torch.manual_seed(0)
    auto = tri("auto")
    torch.manual_seed(0)
    assert torch.equal(auto, tri("torch"))


def test_bool_and_zero_one_masks_agree_and_layers_accept_them():
    """Item 1: 0/1 float and int masks are the bool mask; the layer gives the same."""
    mask = torch.rand(B, 3, N) > 0.3
    q, k, v, bias = g(B, 3, N, H, D), g(B, 3, N, H, D), g(B, 3, N, H, D), g(B, H, N, N)
    for backend in BACKENDS:
        ref = ops.triangle_attention(q, k, v, bias, mask, backend=backend)
        for m in (mask.float(), mask.to(torch.int32), mask.double()):
            assert torch.equal(ops.triangle_attention(q, k, v, bias, m, backend=backend), ref)
    pair_mask = torch.rand(B, N, N) > 0.3
    layer, x = fnn.TriangleAttention(8, 4, 2), g(B, N, N, 8)
    with torch.no_grad():
        assert torch.equal(layer(x, pair_mask), layer(x, pair_mask.float()))


# Item 3: a masked key contributes nothing, whatever k, v and the bias hold there.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ("triangle_attention", "attention_pair_bias"))
def test_non_finite_values_at_masked_keys_do_not_leak(op, backend):
    rows = 3
    q, k, v = g(B, rows, N, H, D), g(B, rows, N, H, D), g(B, rows, N, H, D)
    bias = g(B, H, N, N)
    mask = torch.ones(B, rows, N, dtype=torch.bool)
    mask[:, :, 1] = False  # key 1 masked in every row
    mask[0, 0, 3] = False  # key 3 masked in one row
    fn = ops.triangle_attention if op == "triangle_attention" else ops.attention_pair_bias
    clean = fn(q, k, v, bias, mask, backend=backend)
    # NaN/inf in k, v and the bias of a key masked in every row: nothing changes.
    dirty_k, dirty_v, dirty_bias = k.clone(), v.clone(), bias.clone()
    dirty_k[:, :, 1] = math.nan
    dirty_v[:, :, 1] = math.inf
    dirty_bias[:, :, :, 1] = math.nan
    dirty = fn(q, dirty_k, dirty_v, dirty_bias, mask, backend=backend)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean)
    # +inf bias and NaN v at key 3, masked in row (0, 0) only: that row is unchanged
    # (the other rows keep key 3 and rightly see the +inf).
    dirty_v[0, 0, 3] = math.nan
    dirty_bias[0, :, :, 3] = math.inf
    dirty = fn(q, dirty_k, dirty_v, dirty_bias, mask, backend=backend)
    assert torch.isfinite(dirty[0, 0]).all()
    torch.testing.assert_close(dirty[0, 0], clean[0, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ("triangle_attention", "attention_pair_bias"))
def test_non_finite_values_at_masked_keys_give_the_same_gradients(op, backend):
    """Item 3 for the backward: NaN/inf in k, v and the bias at masked keys changes no
    gradient (dq = dS.k multiplies a zero dS by the masked key's k)."""
    rows = 3
    q, k, v = g(B, rows, N, H, D), g(B, rows, N, H, D), g(B, rows, N, H, D)
    bias, grad_out = g(B, H, N, N), g(B, rows, N, H, D)
    mask = torch.ones(B, rows, N, dtype=torch.bool)
    mask[:, :, 1] = False  # key 1 masked in every row
    mask[0, 0, 3] = False  # key 3 masked in one row
    fn = ops.triangle_attention if op == "triangle_attention" else ops.attention_pair_bias

    def grads(k, v, bias):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
        return torch.autograd.grad(fn(*leaves, mask, backend=backend), leaves, grad_out)

    clean = grads(k, v, bias)
    k, v, bias = k.clone(), v.clone(), bias.clone()
    k[:, :, 1], v[:, :, 1], bias[:, :, :, 1] = math.nan, math.inf, math.nan
    k[0, 0, 3], v[0, 0, 3] = math.inf, math.nan
    dirty = grads(k, v, bias)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), dirty, clean):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opm_non_finite_values_at_masked_positions_do_not_leak(backend):
    a, b, w, bias = g(B, 3, N, 4), g(B, 3, N, 3), g(6, 12), g(6)
    mask = torch.ones(B, 3, N, dtype=torch.bool)
    mask[:, 1, 2] = False  # MSA row 1 at residue 2
    mask[0, :, 4] = False  # residue 4 in every row of batch 0
    clean = ops.outer_product_mean(a, b, mask, w, bias, backend=backend)
    dirty_a, dirty_b = a.clone(), b.clone()
    dirty_a[:, 1, 2], dirty_b[:, 1, 2] = math.nan, math.inf
    dirty_a[0, :, 4], dirty_b[0, :, 4] = math.inf, math.nan
    dirty = ops.outer_product_mean(dirty_a, dirty_b, mask, w, bias, backend=backend)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pwa_non_finite_values_at_masked_keys_do_not_leak(backend):
    v, logits = g(B, 3, N, H, D), g(B, H, N, N)
    mask = torch.ones(B, N, N, dtype=torch.bool)
    mask[:, :, 2] = False  # key 2 masked for every row
    mask[0, 1, 4] = False  # key 4 masked for row 1 only
    dirty_v, dirty_logits = v.clone(), logits.clone()
    dirty_v[:, :, 2] = math.nan
    dirty_logits[:, :, :, 2] = math.inf
    dirty_logits[0, :, 1, 4] = math.nan
    clean = ops.pair_weighted_averaging(v, logits, mask, backend=backend)
    dirty = ops.pair_weighted_averaging(dirty_v, dirty_logits, mask, backend=backend)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean)


@pytest.mark.parametrize("backend", BACKENDS + ("triton",))
@pytest.mark.parametrize("direction", ("outgoing", "incoming"))
def test_trimul_non_finite_values_at_masked_pairs_do_not_leak(backend, direction):
    """A masked pair's a and b are zero whatever x holds there (a where, not a product:
    0 * nan = nan). Its own output is still computed from its own x (no output mask),
    so only the kept pairs are compared."""
    if backend == "triton" and _kernel_device() is None:
        pytest.skip("Triton kernels cannot run here")
    device = _kernel_device() if backend == "triton" else "cpu"
    x = g(B, N, N, 4).to(device)
    weights = {name: w.to(device) for name, w in trimul_weights().items()}
    mask = torch.ones(B, N, N, dtype=torch.bool, device=device)
    mask[:, 2, :] = False  # every pair of row 2
    mask[0, 1, 3] = False  # one pair
    dirty = x.clone()
    dirty[:, 2] = math.nan
    dirty[0, 1, 3] = math.inf
    with torch.no_grad():
        clean_out, dirty_out = (ops.triangle_multiplication(t, mask, direction=direction, backend=backend, **weights)
                                for t in (x, dirty))
    assert torch.isfinite(dirty_out[mask]).all()
    torch.testing.assert_close(dirty_out[mask], clean_out[mask])


# Item 4: a row whose logits are -inf for every key gives zeros on every backend.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keys", (N, 3), ids=("square", "windowed"))
def test_all_minus_inf_row_gives_zeros(backend, keys):
    q, k, v = (t.requires_grad_() for t in (g(B, 2, N, H, D), g(B, 2, keys, H, D), g(B, 2, keys, H, D)))
    bias = g(B, H, N, keys)
    bias[0, 1, 2] = -math.inf  # query 2 of head 1: no key it can attend to
    bias.requires_grad_()
    fn = ops.triangle_attention if keys == N else ops.attention_pair_bias
    out = fn(q, k, v, bias, backend=backend)
    assert (out[0, :, 2, 1] == 0).all() and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v, bias))
    assert all(torch.isfinite(t).all() for t in grads)
    assert (grads[0][0, :, 2, 1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pwa_all_minus_inf_row_gives_zeros(backend):
    v, logits = g(B, 3, N, H, D).requires_grad_(), g(B, H, N, N)
    logits[1, 0, 3] = -math.inf
    logits.requires_grad_()
    out = ops.pair_weighted_averaging(v, logits, None, backend=backend)
    assert (out[1, :, 3, 0] == 0).all() and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), (v, logits))
    assert all(torch.isfinite(t).all() for t in grads)
    with torch.no_grad():  # the inference path (chunked on the torch backend)
        torch.testing.assert_close(ops.pair_weighted_averaging(v, logits, None, backend=backend, chunk_size=1), out)


# Item 8: empty in, empty out, on every backend and layer.
EMPTY_OPS = {
    "tri-I0": lambda b: tri(b, q=g(B, 0, N, H, D), k=g(B, 0, N, H, D), v=g(B, 0, N, H, D)),
    "tri-N0": lambda b: tri(b, q=g(B, 3, 0, H, D), k=g(B, 3, 0, H, D), v=g(B, 3, 0, H, D), bias=g(B, H, 0, 0)),
    "tri-B0-masked": lambda b: tri(b, q=g(0, 3, N, H, D), k=g(0, 3, N, H, D), v=g(0, 3, N, H, D),
                                   bias=g(0, H, N, N), mask=torch.ones(0, 3, N)),
    "apb-keys0": lambda b: apb(b, keys=0),
    "pwa-N0": lambda b: ops.pair_weighted_averaging(g(B, 3, 0, H, D), g(B, H, 0, 0), torch.ones(B, 0, 0), backend=b),
    "pwa-S0": lambda b: ops.pair_weighted_averaging(g(B, 0, N, H, D), g(B, H, N, N), None, backend=b),
    "opm-N0": lambda b: ops.outer_product_mean(g(B, 3, 0, 4), g(B, 3, 0, 3), None, g(6, 12), g(6), backend=b),
    "opm-S0": lambda b: ops.outer_product_mean(g(B, 0, N, 4), g(B, 0, N, 3), torch.ones(B, 0, N), g(6, 12), g(6),
                                               backend=b),
    "trimul-N0": lambda b: ops.triangle_multiplication(g(B, 0, 0, 4), torch.ones(B, 0, 0), direction="incoming",
                                                       backend=b, **trimul_weights()),
    "transition-M0": lambda b: ops.swiglu_transition(
        g(0, 4), backend=b, norm_weight=g(4), norm_bias=g(4), fc1_weight=g(8, 4), fc2_weight=g(8, 4),
        fc3_weight=g(4, 8)),
}
EMPTY_SHAPES = {"tri-I0": (B, 0, N, H, D), "tri-N0": (B, 3, 0, H, D), "tri-B0-masked": (0, 3, N, H, D),
                "apb-keys0": (B, 2, N, H, D), "pwa-N0": (B, 3, 0, H, D), "pwa-S0": (B, 0, N, H, D),
                "opm-N0": (B, 0, 0, 6), "opm-S0": (B, N, N, 6), "trimul-N0": (B, 0, 0, 4), "transition-M0": (0, 4)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(EMPTY_OPS))
def test_empty_inputs_give_empty_outputs(case, backend):
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = EMPTY_OPS[case](backend)
        assert tuple(out.shape) == EMPTY_SHAPES[case]
        assert torch.isfinite(out).all()
        if case == "apb-keys0":
            assert (out == 0).all()


EMPTY_LAYERS = {
    "triangle_attention": lambda: fnn.TriangleAttention(8, 4, 2)(g(B, 0, 0, 8), torch.ones(B, 0, 0)),
    "triangle_multiplication": lambda: fnn.TriangleMultiplicationIncoming(8)(g(B, 0, 0, 8), torch.ones(B, 0, 0)),
    "transition": lambda: fnn.Transition(8, 16)(g(B, 0, 8)),
    "outer_product_mean": lambda: fnn.OuterProductMean(8, 4, 8)(g(B, 3, 0, 8), torch.ones(B, 3, 0)),
    "pair_weighted_averaging": lambda: fnn.PairWeightedAveraging(8, 8, 4, 2)(g(B, 3, 0, 8), g(B, 0, 0, 8),
                                                                             torch.ones(B, 0, 0)),
    "attention_pair_bias": lambda: fnn.AttentionPairBias(16, 8, 2)(g(B, 0, 16), g(B, 0, 0, 8), torch.ones(B, 0),
                                                                  g(B, 0, 16)),
    "pairformer": lambda: PAIR(g(B, 0, 16), g(B, 0, 0, 8), torch.ones(B, 0), torch.ones(B, 0, 0)),
    "msa": lambda: MSA(g(B, 0, 0, 8), g(B, 3, 0, 8), torch.ones(B, 0, 0), torch.ones(B, 3, 0)),
}


@pytest.mark.parametrize("layer", sorted(EMPTY_LAYERS))
def test_layers_with_no_tokens_give_empty_outputs(layer):
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = EMPTY_LAYERS[layer]()
        for t in out if isinstance(out, tuple) else (out,):
            assert t.numel() == 0 and t.shape[0] == B


def _kernel_device():
    from foldops.device import kernel_support

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return device if kernel_support(device) is None else None


def _tri_fwd_bwd(q, k, v, bias, mask, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, bias)]
    out = ops.triangle_attention(*leaves, mask, backend="triton")
    return (out, *torch.autograd.grad(out, leaves, grad_out))


@pytest.mark.skipif(_kernel_device() is None, reason="Triton kernels cannot run here")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("n", (5, 19), ids=("n5", "n19"))
@pytest.mark.parametrize("what", ("nan-k", "inf-v", "nan-bias", "inf-bias-one-row"))
def test_triton_non_finite_values_at_masked_keys_do_not_leak(what, n, dtype):
    """Item 3 on the triton backend (interpreter on CPU, compiled on a GPU), forward and
    backward: NaN/inf in k, v or the bias at masked keys changes no output or gradient
    (the kernels' fast loops meet NaN there and rerun exactly). N = 19 spans two 16-key
    blocks of the interpreter's tiles and a partial one; the head dim is 16."""
    device = _kernel_device()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n, 2, 16, generator=gen).to(device, dtype) for _ in range(3))
    bias = torch.randn(1, 2, n, n, generator=gen).to(device, dtype)
    grad_out = torch.randn(1, 3, n, 2, 16, generator=gen).to(device, dtype)
    mask = torch.ones(1, 3, n, dtype=torch.bool, device=device)
    mask[:, :, 1] = False  # key 1 masked in every row
    mask[0, 0, 3] = False  # key 3 masked in row (0, 0) only
    mask[0, 2, n - 1] = False  # the last key (in the partial block at N = 19) in row (0, 2)
    clean = _tri_fwd_bwd(q, k, v, bias, mask, grad_out)
    k, v, bias = k.clone(), v.clone(), bias.clone()
    if what == "nan-k":
        k[:, :, 1] = math.nan
        k[0, 2, n - 1] = math.nan
    elif what == "inf-v":
        v[:, :, 1] = math.inf
        v[0, 2, n - 1] = -math.inf
    elif what == "nan-bias":
        bias[:, :, :, 1] = math.nan
    else:  # +inf at key 3, masked in row (0, 0) only: the other rows keep it and rightly see NaN
        bias[:, :, :, 3] = math.inf
    dirty = _tri_fwd_bwd(q, k, v, bias, mask, grad_out)
    names = ("out", "dq", "dk", "dv")
    rows = (0, 0) if what == "inf-bias-one-row" else (slice(None),)
    for name, a, b in zip(names, dirty, clean):
        assert torch.isfinite(a[rows]).all(), name
        torch.testing.assert_close(a[rows], b[rows], rtol=0, atol=0, msg=name)
    # Masked keys get no key or value gradient, NaN/inf there or not.
    keep = mask[..., None, None].expand_as(k)
    for name, g in (("dk", dirty[2]), ("dv", dirty[3])):
        assert (g[rows][~keep[rows]] == 0).all(), name
    if what != "inf-bias-one-row":  # the bias gradient sums every row (NaN rows above)
        assert torch.isfinite(dirty[4]).all()
        torch.testing.assert_close(dirty[4], clean[4], rtol=0, atol=0)
