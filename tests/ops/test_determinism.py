"""Every op's torch and reference backends: two runs give bitwise equal outputs and
gradients of every input (the Triton kernel's own run is in tests/kernels)."""

import pytest
import torch

from foldops import ops
from foldops.testing import assert_deterministic, leaves


def _g(*shape):
    return torch.randn(*shape, generator=_g.gen)


def _cases():
    _g.gen = torch.Generator().manual_seed(0)
    b, n, h, d, s, c = 2, 7, 2, 8, 3, 6
    mask3 = torch.rand(b, n, n, generator=_g.gen) > 0.3
    tri_ln = {k: _g(c) for k in ("norm_in_weight", "norm_in_bias", "norm_out_weight", "norm_out_bias")}
    tri_w = dict(tri_ln, p_in_weight=_g(2 * c, c), g_in_weight=_g(2 * c, c), p_out_weight=_g(c, c), g_out_weight=_g(c, c))
    tr_w = dict(norm_weight=_g(c), norm_bias=_g(c), fc1_weight=_g(9, c), fc2_weight=_g(9, c), fc3_weight=_g(c, 9))
    msa_mask = torch.rand(b, s, n, generator=_g.gen) > 0.3
    return {
        "triangle_attention": (
            lambda q, k, v, bias, backend: ops.triangle_attention(q, k, v, bias, mask3, backend=backend),
            [_g(b, n, n, h, d), _g(b, n, n, h, d), _g(b, n, n, h, d), _g(b, h, n, n)],
        ),
        "attention_pair_bias": (
            lambda q, k, v, bias, backend: ops.attention_pair_bias(q, k, v, bias, mask3[:, 0, :5], backend=backend),
            [_g(b, 3, n, h, d), _g(b, 3, 5, h, d), _g(b, 3, 5, h, d), _g(b, h, n, 5)],
        ),
        "pair_weighted_averaging": (
            lambda v, logits, backend: ops.pair_weighted_averaging(v, logits, mask3, backend=backend),
            [_g(b, s, n, h, d), _g(b, h, n, n)],
        ),
        "outer_product_mean": (
            lambda a, bb, w, bias, backend: ops.outer_product_mean(a, bb, msa_mask, w, bias, backend=backend),
            [_g(b, s, n, 4), _g(b, s, n, 3), _g(5, 12), _g(5)],
        ),
        "triangle_multiplication": (
            lambda x, *w, backend: ops.triangle_multiplication(
                x, mask3, direction="incoming", backend=backend, **dict(zip(tri_w, w))
            ),
            [_g(b, n, n, c)] + list(tri_w.values()),
        ),
        "swiglu_transition": (
            lambda x, *w, backend: ops.swiglu_transition(x, backend=backend, **dict(zip(tr_w, w))),
            [_g(b, n, c)] + list(tr_w.values()),
        ),
    }


@pytest.mark.parametrize("backend", ("torch", "reference"))
@pytest.mark.parametrize("op", sorted(_cases()))
def test_outputs_and_every_gradient_repeat_bitwise(op, backend):
    fn, inputs = _cases()[op]
    assert_deterministic(lambda *t: fn(*t, backend=backend), leaves(inputs, torch.float32))
