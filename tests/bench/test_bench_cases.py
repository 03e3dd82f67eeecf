"""The bench cases: shapes, masks with fully masked rows, dims, loading."""

import pytest
import torch

from foldops.bench.cases import CASES, CaseUnavailable, get_cases, pair_mask, reference_bytes, token_mask

EXPECTED_OPS = [
    "triangle_attention", "attention_pair_bias", "triangle_multiplication",
    "outer_product_mean", "pair_weighted_averaging", "varlen_attention", "swiglu_transition",
    "invariant_point_attention",
]


def test_every_issue_op_has_a_case():
    assert list(CASES) == EXPECTED_OPS
    assert [c.op for c in get_cases()] == EXPECTED_OPS
    assert [c.op for c in get_cases(["outer_product_mean"])] == ["outer_product_mean"]
    with pytest.raises(ValueError, match=r"ops: unknown op\(s\) \['nope'\]"):
        get_cases(["nope"])


def test_varlen_case_packs_sequences_up_to_n():
    case = CASES["varlen_attention"]
    inputs = case.make(case.dims_for("cpu", 20), torch.float32, torch.device("cpu"))
    cu = inputs.tensors["cu_seqlens_q"]
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert cu.dtype == torch.int32 and cu[0] == 0 and max(lengths) == 20 and min(lengths) >= 5
    assert inputs.tensors["q"].shape == (int(cu[-1]), 4, 32)
    assert inputs.extras == {"max_seqlen_q": 20, "max_seqlen_k": 20}
    out = case.call(case.load(), inputs, "torch")
    assert out.shape == inputs.tensors["q"].shape


def test_masks_have_fully_masked_rows():
    keep = token_mask(2, 9)
    assert keep[0].tolist() == [True] * 8 + [False]
    assert not keep[1].any()  # B >= 2: the last batch element is fully masked
    pair = pair_mask(1, 16)
    assert pair.shape == (1, 16, 16)
    assert (~pair[0, 14:]).all() and pair[0, :14, :14].all()
    assert token_mask(1, 3).all()  # too small to pad


@pytest.mark.parametrize("op", EXPECTED_OPS)
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_inputs_match_the_op_signature(op, profile):
    case = CASES[op]
    dims = case.dims_for(profile, 8 if profile == "gpu" else 16)
    assert list(dims)[:2] == ["B", "N"] or "N" in dims
    assert case.shape_string(dims).split(",") == [f"{k}={v}" for k, v in dims.items()]
    if profile == "gpu" and op in ("outer_product_mean", "pair_weighted_averaging"):
        dims["S"] = 4  # keep the test small
    inputs = case.make(dims, torch.bfloat16, torch.device("cpu"), seed=3)
    tensors = inputs.tensors
    assert set(case.positional) <= set(tensors) | set(inputs.extras) and set(case.grad_names) <= set(tensors)
    for name, t in tensors.items():
        if name == "mask":
            assert t.dtype == torch.bool
            flat = t.reshape(-1, t.shape[-1])
            assert flat.any(-1).any() and not flat.all()
            if t.dim() > 2 or dims["B"] >= 2:
                # A [B, N] key mask (attention_pair_bias, B=1 on GPUs) can only pad.
                assert (~flat).all(-1).any(), f"{op}: the mask should have a fully masked row"
        elif name.startswith("cu_seqlens"):
            assert t.dtype == torch.int32  # index tensors keep their dtype
        elif name in case.fp32_inputs:
            assert t.dtype == torch.float32  # as the layers hand them over (IPA's points)
        else:
            assert t.dtype == torch.bfloat16
    again = case.make(dims, torch.bfloat16, torch.device("cpu"), seed=3)
    assert all(torch.equal(tensors[k], again.tensors[k]) for k in tensors)  # fixed seed
    assert reference_bytes(case, dims, with_grad=True) > reference_bytes(case, dims, with_grad=False) > 0


def test_invariant_point_attention_case():
    """IPA's inputs as the layers give them (fp32 points and point weights beside bf16 q,
    k, v, bias and z), its three outputs as one tensor the harness can time,
    differentiate and compare, padded rows zero, on the shapes the profiles name."""
    case = CASES["invariant_point_attention"]
    dims = case.dims_for("cpu", 9)
    assert case.shape_string(dims) == "B=2,N=9,H=4,C=16,Pq=4,Pv=8,Cz=16"
    inputs = case.make(dims, torch.bfloat16, torch.device("cpu"))
    t = inputs.tensors
    assert t["q"].shape == (2, 9, 4, 16) and t["q"].dtype == torch.bfloat16
    assert t["k_pts"].shape == (2, 9, 4, 4, 3) and t["v_pts"].shape == (2, 9, 4, 8, 3)
    assert t["q_pts"].dtype == t["point_weights"].dtype == torch.float32
    assert t["bias"].shape == (2, 4, 9, 9) and t["z"].shape == (2, 9, 9, 16) and t["mask"].shape == (2, 9)
    fn = case.load()
    out = case.call(fn, inputs.requires_grad_(True), "torch")
    assert out.shape == (2, 9, 4, 16 + 3 * 8 + 16) and out.dtype == torch.float32
    assert (out[~t["mask"]] == 0).all()
    parts = fn(*(t[name] for name in case.positional), backend="torch")
    torch.testing.assert_close(out, torch.cat([parts[0].float(), parts[1].flatten(-2), parts[2].float()], -1))
    grads = torch.autograd.grad(out, inputs.grad_inputs(), torch.randn_like(out))
    assert all(g is not None and g.shape == x.shape for g, x in zip(grads, inputs.grad_inputs()))
    assert case.dims_for("gpu", 256) == {"B": 1, "N": 256, "H": 12, "C": 16, "Pq": 4, "Pv": 8, "Cz": 128}


def test_triangle_attention_shapes():
    case = CASES["triangle_attention"]
    dims = case.dims_for("cpu", 5)
    assert case.shape_string(dims) == "B=1,N=5,H=4,D=32"
    t = case.make(dims, torch.float32, torch.device("cpu")).tensors
    assert t["q"].shape == (1, 5, 5, 4, 32) and t["bias"].shape == (1, 4, 5, 5) and t["mask"].shape == (1, 5, 5)


def test_dim_overrides_apply_to_known_keys_only():
    case = CASES["outer_product_mean"]
    dims = case.dims_for("cpu", 12, {"S": 5, "H": 3, "N": 99})
    assert dims["S"] == 5 and "H" not in dims and dims["N"] == 12
    assert set(case.dim_names()) == {"B", "S", "N", "C", "O"}
    with pytest.raises(ValueError, match="profile: expected one of"):
        case.dims_for("tpu", 4)


def test_cases_load_or_say_why():
    for case in CASES.values():
        try:
            fn = case.load()
        except CaseUnavailable as exc:
            assert str(exc).startswith(case.op + ":")
        else:
            assert callable(fn) and fn.__name__ == case.op
