"""Fixtures for the bench tests: a fake op with well-behaved and failing backends."""

import os

import pytest
import torch

from foldops import backends
from foldops.bench import cases as bench_cases
from foldops.bench.cases import BenchCase

from bench_fake_op import FAKE_OP, fake_op

def _double(x, mask):
    out = x * 2
    return out if mask is None else out * mask[..., None].to(out.dtype)


def _broken(x, mask):
    raise RuntimeError("kaboom")


def _oom(x, mask):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 PiB (fake)")


def _off_by_half(x, mask):
    return _double(x, mask) + 0.5


def _build(dims, generator):
    b, n, c = dims["B"], dims["N"], dims["C"]
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[:, -1] = False
    return {"x": torch.randn(b, n, c, generator=generator), "mask": mask}


@pytest.fixture
def isolated_registry(monkeypatch):
    """The backend registry and the bench cases, restored after the test; no FOLDOPS_BACKEND*.

    Changes to the registry are undone in place: real ops get back exactly the backends
    they had, test ops (names starting with '_') go. Replacing the registry object would
    lose the registrations of op modules first imported during the test.
    """
    import foldops.ops  # noqa: F401  (register the real ops before the snapshot)

    saved = {op: dict(table) for op, table in backends._REGISTRY.items()}
    monkeypatch.setattr(backends, "_logged", set())
    monkeypatch.setattr(bench_cases, "CASES", dict(bench_cases.CASES))
    for key in list(os.environ):
        if key.startswith(backends.ENV_GLOBAL):
            monkeypatch.delenv(key)
    yield
    for op in list(backends._REGISTRY):
        if op in saved:
            backends._REGISTRY[op] = saved[op]
        elif op.startswith("_"):
            del backends._REGISTRY[op]


@pytest.fixture
def fake_case(isolated_registry):
    """Registers FAKE_OP with backends good/reference/broken/oom/nope/interp/off_by_half."""
    backends.register(FAKE_OP, "good", _double, priority=90)
    backends.register(FAKE_OP, "broken", _broken, priority=80)
    backends.register(FAKE_OP, "oom", _oom, priority=70)
    backends.register(FAKE_OP, "nope", _double, priority=60, supports=lambda **_: "needs a unicorn")
    backends.register(FAKE_OP, "interp", _double, priority=50,
                      supports=lambda explicit, **_: None if explicit else "interpreter: only when named")
    backends.register(FAKE_OP, "off_by_half", _off_by_half, priority=40)
    backends.register(FAKE_OP, "reference", _double, priority=0, auto=False)
    case = BenchCase(
        op=FAKE_OP,
        loader=lambda: fake_op,
        build=_build,
        positional=("x", "mask"),
        grad_names=("x",),
        dims={"cpu": {"B": 1, "N": 0, "C": 3}, "gpu": {"B": 1, "N": 0, "C": 8}},
        sizes={"cpu": (3, 5), "gpu": (64,)},
        ref_elements=lambda d: d["B"] * d["N"] * d["C"],
    )
    bench_cases.register_case(case)
    return case
