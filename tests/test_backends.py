"""foldops.backends: registration, priority, explicit requests, environment overrides."""

import logging
import os

import pytest
import torch

from foldops import backends
from foldops.backends import BackendUnavailableError

OP = "_test_op"
OTHER = "_test_other_op"


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """The real registry, restored after the test; no FOLDOPS_BACKEND* in the environment.

    Changes to the registry are undone in place: real ops get back exactly the backends
    they had, test ops (names starting with '_') go. Replacing the registry object would
    lose the registrations of op modules first imported during the test.
    """
    import foldops.ops  # noqa: F401  (register the real ops before the snapshot)

    saved = {op: dict(table) for op, table in backends._REGISTRY.items()}
    monkeypatch.setattr(backends, "_logged", set())
    for key in list(os.environ):
        if key.startswith(backends.ENV_GLOBAL):
            monkeypatch.delenv(key)
    yield
    for op in list(backends._REGISTRY):
        if op in saved:
            backends._REGISTRY[op] = saved[op]
        elif op.startswith("_"):
            del backends._REGISTRY[op]


def _fn(tag):
    return lambda *args, **kwargs: tag


def _never(reason):
    return lambda **ctx: reason


def _boom(**ctx):
    raise ImportError("broken third-party install")


@pytest.fixture
def three():
    """fast (100, runs only on 'gpu'), slow (50), exact (0, auto=False)."""
    backends.register(OP, "slow", _fn("slow"), priority=50)
    backends.register(OP, "fast", _fn("fast"), priority=100,
                      supports=lambda device, explicit, **_: None if device == "gpu" else f"needs gpu, got {device}")
    backends.register(OP, "exact", _fn("exact"), priority=0, auto=False)


# Registration ----------------------------------------------------------------------------------

def test_backends_of_is_priority_order(three):
    assert [b.name for b in backends.backends_of(OP)] == ["fast", "slow", "exact"]
    assert OP in backends.ops()
    assert backends.ops() == sorted(backends.ops())


def test_register_replaces_and_returns_the_backend(three):
    b = backends.register(OP, "slow", _fn("slow2"), priority=200)
    assert isinstance(b, backends.Backend) and b.op == OP and b.name == "slow" and b.auto
    assert [x.name for x in backends.backends_of(OP)] == ["slow", "fast", "exact"]
    assert backends.select(OP, device="cpu").fn() == "slow2"


def test_register_rejects_auto():
    with pytest.raises(ValueError, match="name: 'auto' is reserved"):
        backends.register(OP, "auto", _fn("x"), priority=1)


def test_backends_of_unknown_op():
    with pytest.raises(ValueError, match=r"op: unknown op '_nope'; known ops: \["):
        backends.backends_of("_nope")


# Auto selection ------------------------------------------------------------------------------

def test_auto_takes_the_best_backend_that_can_run(three):
    assert backends.select(OP, "auto", device="gpu").name == "fast"
    assert backends.select(OP, "auto", device="cpu").name == "slow"
    assert backends.select(OP, None, device="cpu").name == "slow"
    assert backends.select(OP, device="cpu").name == "slow"


def test_auto_never_takes_opt_out_backends(three):
    backends.register(OP, "slow", _fn("slow"), priority=50, supports=_never("no"))
    with pytest.raises(BackendUnavailableError, match="no backend can run"):
        backends.select(OP, device="cpu")  # 'exact' could run, but only when named
    assert backends.select(OP, "exact", device="cpu").name == "exact"


def test_auto_skips_a_raising_support_check(three):
    backends.register(OP, "fast", _fn("fast"), priority=100, supports=_boom)
    assert backends.select(OP, device="gpu").name == "slow"
    reasons = dict(backends.availability(OP, device="gpu"))
    assert reasons["fast"] == "support check failed: ImportError: broken third-party install"


def test_auto_logs_each_skip_once(three, caplog):
    with caplog.at_level(logging.DEBUG, logger="foldops.backends"):
        for _ in range(3):
            backends.select(OP, device="cpu")
    skips = [r for r in caplog.records if "auto skips backend 'fast'" in r.getMessage()]
    assert len(skips) == 1 and "needs gpu, got cpu" in skips[0].getMessage()


def test_support_checks_learn_whether_the_backend_was_named():
    seen = []

    def check(explicit, **ctx):
        seen.append((explicit, ctx))
        return None if explicit else "interpreter: only when named"

    backends.register(OP, "interp", _fn("interp"), priority=100, supports=check)
    backends.register(OP, "slow", _fn("slow"), priority=50)
    assert backends.select(OP, device="cpu", dtype=torch.float32).name == "slow"
    assert backends.select(OP, "interp", device="cpu", dtype=torch.float32).name == "interp"
    assert seen == [(False, {"device": "cpu", "dtype": torch.float32}), (True, {"device": "cpu", "dtype": torch.float32})]


# Explicit requests -----------------------------------------------------------------------------

def test_explicit_backend_that_cannot_run_names_the_reason(three):
    with pytest.raises(BackendUnavailableError, match="backend: backend 'fast' cannot run _test_op: needs gpu, got cpu"):
        backends.select(OP, "fast", device="cpu")


def test_explicit_backend_with_a_raising_check(three):
    backends.register(OP, "fast", _fn("fast"), priority=100, supports=_boom)
    with pytest.raises(BackendUnavailableError, match="support check failed: ImportError"):
        backends.select(OP, "fast", device="gpu")


def test_explicit_unknown_backend_lists_the_known_ones(three):
    with pytest.raises(BackendUnavailableError, match=r"no backend 'trifast'; available: \['exact', 'fast', 'slow'\] or 'auto'"):
        backends.select(OP, "trifast", device="cpu")


def test_backend_must_be_a_string(three):
    with pytest.raises(TypeError, match="backend: expected a backend name string, got int"):
        backends.select(OP, 3, device="cpu")


def test_backend_unavailable_error_is_a_runtime_error():
    assert issubclass(BackendUnavailableError, RuntimeError)


# Environment overrides ---------------------------------------------------------------------------

def test_per_op_env_override(three, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND__TEST_OP", "exact")
    assert backends.select(OP, device="gpu").name == "exact"
    monkeypatch.setenv("FOLDOPS_BACKEND__TEST_OP", " slow ")
    assert backends.select(OP, device="gpu").name == "slow"
    monkeypatch.setenv("FOLDOPS_BACKEND__TEST_OP", "auto")
    assert backends.select(OP, device="gpu").name == "fast"


def test_per_op_env_override_is_explicit(three, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND__TEST_OP", "fast")
    with pytest.raises(BackendUnavailableError, match="FOLDOPS_BACKEND__TEST_OP: backend 'fast' cannot run _test_op: needs gpu"):
        backends.select(OP, device="cpu")
    monkeypatch.setenv("FOLDOPS_BACKEND__TEST_OP", "nope")
    with pytest.raises(BackendUnavailableError, match="FOLDOPS_BACKEND__TEST_OP: op '_test_op' has no backend 'nope'"):
        backends.select(OP, device="cpu")


def test_global_env_override(three, monkeypatch):
    backends.register(OTHER, "slow", _fn("other-slow"), priority=10)
    backends.register(OTHER, "only", _fn("only"), priority=20)
    monkeypatch.setenv("FOLDOPS_BACKEND", "exact")
    assert backends.select(OP, device="gpu").name == "exact"
    assert backends.select(OTHER).name == "only"  # no 'exact' there: ignored
    monkeypatch.setenv("FOLDOPS_BACKEND", "slow")
    assert backends.select(OTHER).name == "slow"
    monkeypatch.setenv("FOLDOPS_BACKEND", "auto")
    assert backends.select(OP, device="gpu").name == "fast"


def test_global_env_override_is_explicit(three, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND", "fast")
    with pytest.raises(BackendUnavailableError, match="FOLDOPS_BACKEND: backend 'fast' cannot run _test_op: needs gpu"):
        backends.select(OP, device="cpu")


def test_override_precedence(three, monkeypatch):
    monkeypatch.setenv("FOLDOPS_BACKEND", "slow")
    monkeypatch.setenv("FOLDOPS_BACKEND__TEST_OP", "exact")
    assert backends.select(OP, device="gpu").name == "exact"  # per-op beats global
    assert backends.select(OP, "fast", device="gpu").name == "fast"  # the argument beats both


# availability ----------------------------------------------------------------------------------

def test_availability_in_priority_order(three):
    assert backends.availability(OP, device="cpu") == [("fast", "needs gpu, got cpu"), ("slow", None), ("exact", None)]
    assert backends.availability(OP, device="gpu") == [("fast", None), ("slow", None), ("exact", None)]


def test_availability_passes_the_explicit_flag():
    backends.register(OP, "interp", _fn("x"), priority=1,
                      supports=lambda explicit, **_: None if explicit else "only when named")
    assert backends.availability(OP) == [("interp", None)]
    assert backends.availability(OP, explicit=False) == [("interp", "only when named")]


# The real registry ---------------------------------------------------------------------------------

def test_auto_never_picks_the_triton_interpreter(monkeypatch):
    import foldops.ops.triangle_attention  # noqa: F401  (registers its backends)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ctx = dict(device=torch.device("cpu"), dtype=torch.float32, head_dim=32)
    assert backends.select("triangle_attention", **ctx).name == "torch"
    reasons = dict(backends.availability("triangle_attention", explicit=False, **ctx))
    assert reasons["triton"] is not None


def test_triton_support_checks_trace_without_a_graph_break():
    """The support checks run inside a traced forward (torch.compile with fullgraph=True
    of a layer), so they must not call importlib (Dynamo cannot trace it) or sync. With
    the interpreter allowed (an explicit backend) each check reaches its kernel import."""
    import pathlib
    import sys

    import foldops.ops  # noqa: F401 (registers the backends)

    ops_dir = pathlib.Path(foldops.ops.__file__).parent
    assert not [p.name for p in ops_dir.glob("*.py") if "importlib" in p.read_text()]
    checks = [sys.modules[f"foldops.ops.{name}"]._triton_supports
              for name in ("triangle_attention", "pair_weighted_averaging")]

    def body(x):
        for check in checks:
            x = x + (0.0 if check(x.device, x.dtype, head_dim=32, explicit=True) is None else 1.0)
        return x

    eager = body(torch.zeros(2))
    traced = torch.compile(body, fullgraph=True, backend="eager")(torch.zeros(2))
    torch.testing.assert_close(traced, eager)


def test_auto_traces_its_first_choice_without_a_graph_break(monkeypatch, caplog):
    """``auto`` logs each choice the first time it makes it. A process whose first call of
    an op is inside torch.compile(fullgraph=True) must trace (Dynamo cannot trace a
    logger call) and equal eager; the choice is logged by the next eager call."""
    import warnings

    from foldops import ops

    monkeypatch.setattr(backends, "_logged", set())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 6, 2, 8, generator=gen)
    bias = torch.randn(1, 2, 6, 6, generator=gen)
    mask = torch.rand(1, 6, 6, generator=gen) > 0.3

    def body(q, bias, mask):
        return ops.triangle_attention(q, q, q, bias, mask)

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    compiled_body = torch.compile(body, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Dynamo warning either (e.g. on lru_cache wrappers)
        compiled = compiled_body(q, bias, mask)
    assert backends._logged == set()
    with caplog.at_level(logging.DEBUG, logger="foldops.backends"):
        eager = body(q, bias, mask)
    torch.testing.assert_close(compiled, eager)
    assert any("triangle_attention: auto picks" in r.getMessage() for r in caplog.records)
    # The log's memory is no guard of the compiled graph: logging the choice eagerly
    # (or any other op's) does not recompile it.
    graphs = counters["stats"]["unique_graphs"]
    backends._logged.add(("some_op", "torch", "priority"))
    torch.testing.assert_close(compiled_body(q, bias, mask), eager)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_module_backend_names_the_backend_of_each_op_that_has_it(monkeypatch):
    """A module's backend= is checked when it is built, and, like FOLDOPS_BACKEND, names
    the backend of every op of the module that has one: PairformerLayer(backend="triton")
    runs its kernels (the interpreter here) and its transitions, which have none, on auto."""
    from foldops import nn as fnn

    monkeypatch.delenv("FOLDOPS_BACKEND", raising=False)
    with pytest.raises(ValueError, match="backend: unknown backend 'trition'"):
        fnn.PairformerLayer(8, 8, 2, 0.0, 4, 2, backend="trition")
    with pytest.raises(TypeError, match="backend: expected a backend name string"):
        fnn.Transition(8, 16, backend=None)
    with pytest.raises(ValueError, match="backend: unknown backend 'bogus'"):
        fnn.InvariantPointAttention(16, 8, 4, 2, 3, 2, backend="bogus")
    assert backends.for_op("swiglu_transition", "triton") == "auto"
    assert backends.for_op("triangle_attention", "triton") == "triton"
    layer = fnn.Transition(8, 16)
    layer.backend = "trition"  # set after construction: refused at the call, not taken as auto
    with pytest.raises(ValueError, match="backend: unknown backend 'trition'"):
        layer(torch.randn(2, 8))
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    from foldops.testing import assert_within_baseline

    gen = torch.Generator().manual_seed(0)
    s, z = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 5, 8, generator=gen)
    mask = torch.ones(1, 5)
    mask[:, -1] = 0
    pair_mask = mask[:, :, None] * mask[:, None, :]
    exact = fnn.PairformerLayer(8, 8, 2, 0.0, 4, 2, backend="reference", dtype=torch.float64).eval()
    with torch.no_grad():  # Boltz's init zeroes the output projections: randomise every weight
        for p in exact.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    results = {}
    for name, dtype in (("triton", torch.float32), ("torch", torch.float32), ("reference", torch.float64)):
        layer = fnn.PairformerLayer(8, 8, 2, 0.0, 4, 2, backend=name, dtype=dtype).eval()
        layer.load_state_dict(exact.state_dict())
        leaves = [s.to(dtype).requires_grad_(), z.to(dtype).requires_grad_()]
        s_out, z_out = layer(*leaves, mask, pair_mask)
        grads = torch.autograd.grad((s_out.square().sum() + z_out.square().sum()), leaves)
        results[name] = [t.detach().double() for t in (s_out, z_out, *grads)]
    for i, what in enumerate(("s", "z", "ds", "dz")):
        assert_within_baseline(what, results["triton"][i], results["reference"][i], results["torch"][i],
                               dtype=torch.float32)
