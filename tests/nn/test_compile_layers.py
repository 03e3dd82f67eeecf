"""The Pairformer and MSA layers compile whole and run under CUDA graphs, equal to eager.

CPU tests: ``torch.compile(fullgraph=True)`` with the ``aot_eager`` compile backend
(Dynamo and AOTAutograd trace the whole forward and backward; inductor's code
generation is left out, it is not what breaks graphs and costs minutes on a small
CPU), torch backend of every op, in eval under ``no_grad`` and in train. A new graph
break (a host sync, a ``bool(tensor)`` branch, ``.item()``, a ``data_ptr()`` test) in
any layer or op makes them fail.

GPU tests (``gpu``): the same layers with the default backends, captured into a CUDA
graph and compiled with ``mode="reduce-overhead"``, against eager.
"""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch._dynamo as dynamo

from foldops.nn import MSALayer, PairformerLayer
from foldops.testing import capture_cuda_graph

# Graph breaks tolerated by the start of Dynamo's message (the eval tests then compile
# without fullgraph and fail on any other break). None today: keep it empty.
KNOWN_BREAKS = ()

B, N, S = 1, 7, 3  # batch, tokens (prime), MSA rows
TOKEN_S, TOKEN_Z, HEADS, PW, PH = 16, 8, 2, 4, 2


def _pairformer(backend="torch", device="cpu", dropout=0.0):
    return PairformerLayer(
        TOKEN_S, TOKEN_Z, num_heads=HEADS, dropout=dropout, pairwise_head_width=PW, pairwise_num_heads=PH,
        backend=backend, device=device,
    )


def _msa(backend="torch", device="cpu"):
    return MSALayer(8, TOKEN_Z, 0.0, 0.0, pairwise_head_width=PW, pairwise_num_heads=PH, backend=backend, device=device)


def _masks(device="cpu"):
    mask = torch.ones(B, N, device=device)
    mask[:, -2:] = 0  # two padded tokens: fully masked rows in triangle attention
    return mask, mask[:, :, None] * mask[:, None, :]


def _pairformer_inputs(device="cpu", dtype=torch.float32):
    gen = torch.Generator(device="cpu").manual_seed(0)
    s = torch.randn(B, N, TOKEN_S, generator=gen).to(device, dtype)
    z = torch.randn(B, N, N, TOKEN_Z, generator=gen).to(device, dtype)
    return (s, z, *_masks(device))


def _msa_inputs(device="cpu", dtype=torch.float32):
    gen = torch.Generator(device="cpu").manual_seed(1)
    z = torch.randn(B, N, N, TOKEN_Z, generator=gen).to(device, dtype)
    m = torch.randn(B, S, N, 8, generator=gen).to(device, dtype)
    msa_mask = torch.ones(B, S, N, device=device)
    msa_mask[:, :, -2:] = 0
    return (z, m, _masks(device)[1], msa_mask)


def _nonzero_(module):
    # Boltz's init zeroes output projections; random weights make every path matter.
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.3)
    return module


def _unknown_breaks():
    from torch._dynamo.utils import counters

    reasons = list(counters["graph_break"]) + list(counters["unimplemented"])
    return [reason.splitlines()[0] for reason in reasons if not reason.startswith(KNOWN_BREAKS)]


def _compile(module):
    return torch.compile(module, backend="aot_eager", fullgraph=not KNOWN_BREAKS)


def _assert_close(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


CASES = {"pairformer": (_pairformer, _pairformer_inputs), "msa": (_msa, _msa_inputs)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_eval_no_grad_equals_eager(name):
    build, make_inputs = CASES[name]
    module = _nonzero_(build()).eval()
    args = make_inputs()
    dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        expected = module(*args)
        actual = _compile(module)(*args)
    assert _unknown_breaks() == []
    dynamo.reset()
    _assert_close(actual, expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_train_fullgraph_equals_eager(name):
    build, make_inputs = CASES[name]
    module = _nonzero_(build()).train()
    args = make_inputs()
    dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)

    def run(fn):
        inputs = [a.clone().requires_grad_(a.dtype.is_floating_point and i < 2) for i, a in enumerate(args)]
        module.zero_grad(set_to_none=True)
        outs = fn(*inputs)
        sum(o.float().square().sum() for o in outs).backward()
        grads = [inputs[0].grad, inputs[1].grad] + [p.grad for p in module.parameters()]
        return list(outs), grads

    expected, expected_grads = run(module)
    actual, actual_grads = run(compiled)
    dynamo.reset()
    _assert_close(actual, expected)
    for (pname, _), a, e in zip([("input0", 0), ("input1", 1)] + list(module.named_parameters()), actual_grads,
                                expected_grads):
        assert (a is None) == (e is None), pname
        if a is not None:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{pname}: {m}")


# ---------------------------------------------------------------- GPU: graphs, reduce-overhead


def _gpu_case(name, dtype=torch.float32):
    build, make_inputs = CASES[name]
    module = _nonzero_(build(backend="auto", device="cuda")).eval()
    return module, make_inputs("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_graph_capture_equals_eager(name):
    module, args = _gpu_case(name)
    with torch.no_grad():
        expected = module(*args)
        static = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles, autotuning, allocator pools
                module(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph, out = capture_cuda_graph(lambda: module(*static))
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        torch.cuda.synchronize()
    _assert_close(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_reduce_overhead_equals_eager(name):
    module, args = _gpu_case(name)
    dynamo.reset()
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=not KNOWN_BREAKS)
    with torch.no_grad():
        expected = module(*args)
        for _ in range(3):  # the third call replays the recorded graph
            actual = [t.clone() for t in compiled(*args)]
    dynamo.reset()
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=2e-3, atol=2e-3)  # inductor reorders fp32 sums


@pytest.mark.gpu
def test_pairformer_train_step_reduce_overhead_equals_eager():
    build, make_inputs = CASES["pairformer"]
    module = _nonzero_(build(backend="auto", device="cuda")).train()
    args = make_inputs("cuda")
    dynamo.reset()
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)

    def run(fn):
        s = args[0].clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        out_s, out_z = fn(s, *args[1:])
        (out_s.square().sum() + out_z.square().sum()).backward()
        return out_s.detach().clone(), s.grad.clone()

    expected = run(module)
    for _ in range(3):
        actual = run(compiled)
    dynamo.reset()
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("op_name", ["triangle_attention", "attention_pair_bias"])
def test_triton_op_fwd_bwd_captured_equals_eager(op_name):
    """The Triton ops' forward and backward (launchers, scratch, mask bias) under CUDA
    graph capture: no host sync, same results on replay."""
    import foldops.ops as ops

    op = getattr(ops, op_name)
    gen = torch.Generator(device="cpu").manual_seed(3)
    n, heads, d = 40, 2, 32
    q, k, v = (torch.randn(1, n, n, heads, d, generator=gen).cuda().requires_grad_() for _ in range(3))
    bias = torch.randn(1, heads, n, n, generator=gen).cuda().requires_grad_()
    mask = torch.rand(1, n, n, generator=gen).cuda() > 0.2
    if op_name == "attention_pair_bias":
        mask = mask[:, 0]  # [B, Nk], shared by the samples
    go = torch.randn(q.shape, generator=gen).cuda()
    leaves = [q, k, v, bias]

    def step():
        out = op(q, k, v, bias, mask, backend="triton")
        return [out.detach(), *torch.autograd.grad(out, leaves, go)]

    # Results detached: a kept autograd graph keeps the leaves' AccumulateGrad nodes,
    # made on the default stream, and the captured backward then makes the (legacy)
    # default stream wait on the capture stream: cudaErrorStreamCaptureImplicit, with
    # autograd's "AccumulateGrad node's stream does not match" warning.
    expected = [t.clone() for t in step()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*AccumulateGrad node's stream does not match")
        graph, captured = capture_cuda_graph(step)
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(captured, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
def test_a_failed_capture_leaves_the_process_usable():
    """``capture_cuda_graph`` resets what a failed capture leaves behind (the default
    generator's capture state, the current stream: the one current before it, default
    or not): random ops and eager work run after it. In a subprocess, so that a failure
    here cannot spill into other tests."""
    code = textwrap.dedent("""
        import torch
        from foldops.testing import capture_cuda_graph
        x = torch.ones(4, device="cuda")

        def fail_to_capture():
            try:
                capture_cuda_graph(lambda: x.sum().item())  # a host read: the capture fails
            except Exception:
                pass
            else:
                raise SystemExit("the capture did not fail")

        fail_to_capture()
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            fail_to_capture()
            assert torch.cuda.current_stream() == side, torch.cuda.current_stream()
        torch.nn.functional.dropout(torch.randn(8, device="cuda"), 0.5)  # RNG offsets
        graph, y = capture_cuda_graph(lambda: torch.rand(3, device="cuda") + x[:3])
        graph.replay()
        torch.cuda.synchronize()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
