"""foldops.nn.Trunk: every block-type configuration runs forward and backward."""

import itertools

import pytest
import torch

from foldops.nn import BlockType, Rigid, Trunk
from foldops.nn.trunk import DEFAULT_CONFIGS

C_S, C_Z, N = 16, 8, 6
SMALL = {
    "ipa": {"c_hidden": 4, "no_heads": 2, "no_qk_points": 2, "no_v_points": 3, "transition_factor": 2},
    "pairformer": {"num_heads": 2, "pairwise_head_width": 4, "pairwise_num_heads": 2, "dropout": 0.0},
    "pair_attention": {"num_heads": 2, "transition_factor": 2},
}
TYPES = [t.value for t in BlockType]
CONFIGS = [[t] for t in TYPES] + [list(p) for p in itertools.permutations(TYPES)][:2] + [["ipa", "ipa"]]


def _inputs():
    s = torch.randn(2, N, C_S)
    z = torch.randn(2, N, N, C_Z)
    mask = torch.ones(2, N)
    mask[1, -2:] = 0
    return s, z, mask


def _randomise(trunk):
    with torch.no_grad():  # zero-initialised output layers would hide missing gradients
        for p in trunk.parameters():
            if p.dim() > 1 and (p == 0).all():
                p.normal_(0, 0.05)


@pytest.mark.parametrize("blocks", CONFIGS, ids=lambda b: "+".join(b))
def test_every_configuration_runs_forward_and_backward(blocks):
    trunk = Trunk(C_S, C_Z, blocks, SMALL, backend="torch")
    _randomise(trunk)
    s, z, mask = _inputs()
    s.requires_grad_()
    z.requires_grad_()
    s_out, z_out, frames = trunk(s, z, None, mask)
    assert s_out.shape == s.shape and z_out.shape == z.shape
    loss = s_out.square().mean() + z_out.square().mean()
    if frames is not None:
        loss = loss + frames.trans.square().mean()
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    for name, p in trunk.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    moved = "ipa" in blocks
    assert (frames is not None) == moved
    if moved:  # frames change only through IPA blocks, and never at padded residues
        assert frames.trans[0].abs().sum() > 0
        torch.testing.assert_close(frames.trans[1, -2:], torch.zeros(2, 3))


def test_frames_move_only_after_ipa_blocks():
    trunk = Trunk(C_S, C_Z, ["pairformer", "pair_attention"], SMALL, backend="torch")
    s, z, mask = _inputs()
    frames = Rigid.identity((2, N))
    _, _, out = trunk(s, z, frames, mask)
    torch.testing.assert_close(out.trans, frames.trans)
    torch.testing.assert_close(out.rots, frames.rots)


def test_shared_default_configs_and_overrides():
    trunk = Trunk(32, C_Z, ["ipa", "pair_attention", "ipa"], {"ipa": {"no_heads": 4, "c_hidden": 8}})
    ipa0, ipa1 = trunk.blocks[0].ipa, trunk.blocks[2].ipa
    assert ipa0.no_heads == ipa1.no_heads == 4 and ipa0.c_hidden == 8
    assert ipa0.no_qk_points == DEFAULT_CONFIGS[BlockType.IPA]["no_qk_points"]
    assert trunk.blocks[1].attention.num_heads == DEFAULT_CONFIGS[BlockType.PAIR_ATTENTION]["num_heads"]
    assert DEFAULT_CONFIGS[BlockType.IPA]["no_heads"] == 12  # the override did not leak into the defaults


def test_backend_reaches_every_op():
    trunk = Trunk(C_S, C_Z, ["ipa", "pairformer", "pair_attention"], SMALL, backend="reference")
    backends = {m.backend for m in trunk.modules() if hasattr(m, "backend")}
    assert backends == {"reference"}


def test_bad_block_types():
    with pytest.raises(ValueError, match=r"blocks\[1\]: expected one of"):
        Trunk(C_S, C_Z, ["ipa", "evoformer"])
    with pytest.raises(ValueError, match="non-empty"):
        Trunk(C_S, C_Z, [])
    with pytest.raises(ValueError, match="configs"):
        Trunk(C_S, C_Z, ["ipa"], {"bogus": {}})


def test_trunk_cast_to_bf16_runs_with_fp32_frames():
    """``Trunk(...).to(torch.bfloat16)`` on bf16 s and z (no autocast): the identity frames
    are fp32, the outputs bf16. Against the fp64 trunk of the same (bf16) parameter
    values: s, frames and the gradients of s and z within 2x the error of the same trunk
    on the plain PyTorch ``reference`` backends in bf16."""
    import copy

    from foldops.testing import assert_within_baseline

    trunk = Trunk(16, 8, ["ipa"], configs={"ipa": {"no_heads": 2}})
    _randomise(trunk)
    with torch.no_grad():
        for p in trunk.parameters():
            p.copy_(p.to(torch.bfloat16))
    s_bf16, z_bf16 = torch.randn(2, N, 16, dtype=torch.bfloat16), torch.randn(2, N, N, 8, dtype=torch.bfloat16)
    mask = torch.ones(2, N)
    mask[1, -2:] = 0
    keep = mask.bool()

    def run(module, dtype):
        s, z = s_bf16.to(dtype).clone().requires_grad_(), z_bf16.to(dtype).clone().requires_grad_()
        s_out, z_out, frames = module(s, z, None, mask.to(dtype))
        assert s_out.dtype == dtype and z_out.dtype == dtype
        assert frames.trans.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        weights = torch.linspace(-1, 1, 16, dtype=torch.float64)
        ((s_out.double() * weights)[keep].sum() + frames.trans.double()[keep].sum()).backward()
        return [s_out.detach()[keep], frames.trans.detach()[keep], s.grad[keep], z.grad]

    exact = run(copy.deepcopy(trunk).double(), torch.float64)
    plain = copy.deepcopy(trunk).to(torch.bfloat16)
    for m in plain.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"
    base = run(plain, torch.bfloat16)
    got = run(trunk.to(torch.bfloat16), torch.bfloat16)
    for name, g, e, b in zip(("s", "frames", "ds", "dz"), got, exact, base):
        assert torch.isfinite(g).all(), name
        assert_within_baseline(name, g, e, b, dtype=torch.bfloat16)


def test_padded_residues_may_hold_placeholder_frames():
    """Frames zero-padded (or NaN) at padded residues: the trunk runs, with the outputs and
    gradients it gives with identity frames there, no NaN, identity frames returned there."""
    trunk = Trunk(C_S, C_Z, ["ipa", "ipa"], SMALL, backend="torch").double()
    _randomise(trunk)
    s, z, mask = (t.double() for t in _inputs())
    pad = ~mask.bool()
    rots = torch.linalg.qr(torch.randn(2, N, 3, 3, dtype=torch.float64))[0]
    rots = rots * torch.linalg.det(rots).sign()[..., None, None]
    trans = 10 * torch.randn(2, N, 3, dtype=torch.float64)
    identity_rots, identity_trans = rots.clone(), trans.clone()
    identity_rots[pad], identity_trans[pad] = torch.eye(3, dtype=torch.float64), 0.0

    def run(r, t):
        s_in = s.clone().requires_grad_()
        s_out, _, frames = trunk(s_in, z, (r, t), mask)
        (s_out[~pad].sum() + frames.trans[~pad].sum()).backward()
        return s_out.detach(), frames.rots, frames.trans.detach(), s_in.grad

    want = run(identity_rots, identity_trans)
    for fill in (0.0, float("nan")):
        r, t = rots.clone(), trans.clone()
        r[pad], t[pad] = fill, fill
        got = run(r, t)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(want[1][pad], torch.eye(3, dtype=torch.float64).expand(int(pad.sum()), 3, 3))


def test_blocks_get_bool_masks_and_read_nothing_on_the_host():
    """The trunk checks a float mask once and hands its blocks bool masks, so no block
    checks 0/1 values again (a host read per block on a GPU); the results are those of
    the float mask."""
    from foldops.testing import forbid_host_sync

    trunk = Trunk(C_S, C_Z, ["pair_attention", "pair_attention"], SMALL, backend="torch")
    _randomise(trunk)
    s, z, mask = _inputs()
    want = trunk(s, z, None, mask)
    with forbid_host_sync():
        got = trunk(s, z, None, mask.bool())
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
