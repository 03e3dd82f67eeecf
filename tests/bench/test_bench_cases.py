"""The bench cases: shapes, masks with fully masked rows, dims, loading."""

import pytest
import torch

from foldops.bench.cases import CASES, CaseUnavailable, get_cases, pair_mask, reference_bytes, token_mask

EXPECTED_OPS = [
    "triangle_attention", "attention_pair_bias", "triangle_multiplication",
    "outer_product_mean", "pair_weighted_averaging", "varlen_attention", "swiglu_transition",
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
        else:
            assert t.dtype == torch.bfloat16
    again = case.make(dims, torch.bfloat16, torch.device("cpu"), seed=3)
    assert all(torch.equal(tensors[k], again.tensors[k]) for k in tensors)  # fixed seed
    assert reference_bytes(case, dims, with_grad=True) > reference_bytes(case, dims, with_grad=False) > 0


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
