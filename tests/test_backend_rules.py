"""foldops.backend_rules: auto follows the size rules (thresholds as data), explicit
requests and FOLDOPS_BACKEND bypass them, the choice and its reason are logged."""

import logging
import os

import pytest
import torch

from foldops import backend_rules, backends
from foldops.backend_rules import DEFAULT, Rule

OP = "_rules_op"
SEEDED_RULES = backend_rules.RULES
DEVICE_CLASS = backend_rules.device_class


@pytest.fixture(autouse=True)
def fake_op(monkeypatch):
    """A test op with a kernel backend (runs everywhere) and a torch backend, and rules
    for a made-up device class that every device here belongs to."""
    monkeypatch.setattr(backends, "_logged", set())
    for key in list(os.environ):
        if key.startswith(backends.ENV_GLOBAL):
            monkeypatch.delenv(key)
    backends.register(OP, "triton", lambda: "triton", priority=100)
    backends.register(OP, "torch", lambda: "torch", priority=50)
    backends.register(OP, "reference", lambda: "reference", priority=0, auto=False)
    monkeypatch.setattr(backend_rules, "device_class", lambda device: "test-class")
    rules = {OP: {"test-class": {"training": Rule(256, "measure --training", "torch 2x at small N"),
                                 "inference": Rule(64, "measure --inference", "host-bound below 64")}}}
    monkeypatch.setattr(backend_rules, "RULES", rules)
    backend_rules._preferred.cache_clear()
    yield
    backends._REGISTRY.pop(OP, None)
    backend_rules._preferred.cache_clear()


def pick(n, training, requested="auto"):
    return backends.select(OP, requested, device=torch.device("cpu"), training=training, n=n).name


@pytest.mark.parametrize("n, training, expected", [
    (1, True, "torch"), (256, True, "torch"), (257, True, "triton"), (1024, True, "triton"),
    (64, False, "torch"), (65, False, "triton"), (256, False, "triton"),
])
def test_auto_follows_threshold(n, training, expected):
    assert pick(n, training) == expected


def test_no_size_in_context_keeps_priority_order():
    assert backends.select(OP, "auto", device=torch.device("cpu")).name == "triton"


def test_unmeasured_device_class_takes_default(monkeypatch):
    monkeypatch.setattr(backend_rules, "device_class", lambda device: "never-measured")
    backend_rules._preferred.cache_clear()
    assert DEFAULT.at_most == 0
    assert pick(1, True) == "triton"


def test_explicit_and_environment_bypass_rules(monkeypatch):
    assert pick(1, True, requested="triton") == "triton"
    monkeypatch.setenv("FOLDOPS_BACKEND", "triton")
    assert pick(1, True) == "triton"
    monkeypatch.setenv(f"FOLDOPS_BACKEND_{OP.upper()}", "reference")
    assert pick(1, True) == "reference"


def test_preferred_backend_that_cannot_run_falls_back():
    backends.register(OP, "torch", lambda: "torch", priority=50, supports=lambda **ctx: "not here")
    assert pick(1, True) == "triton"


def test_choice_and_reason_logged_once(caplog):
    with caplog.at_level(logging.DEBUG, logger="foldops.backends"):
        pick(32, True)
        pick(32, True)
        pick(512, True)
    ruled = [r.getMessage() for r in caplog.records if "by rule" in r.getMessage()]
    assert len(ruled) == 1 and "torch 2x at small N" in ruled[0] and "measure --training" in ruled[0]
    assert any("by priority order" in r.getMessage() for r in caplog.records)


def test_decision_cached_per_signature(monkeypatch):
    calls = []
    original = backend_rules.rule_for
    monkeypatch.setattr(backend_rules, "rule_for", lambda *a: calls.append(a) or original(*a))
    for _ in range(5):
        pick(100, True)
    assert len(calls) == 1


def test_seeded_rules_are_well_formed():
    for op, classes in SEEDED_RULES.items():
        for cls, modes in classes.items():
            for mode, rule in modes.items():
                assert mode in ("inference", "training"), (op, cls, mode)
                assert rule.at_most >= 0 and rule.command and rule.reason, (op, cls, mode)
    h100 = SEEDED_RULES["attention_pair_bias"]["cuda-sm90"]
    assert h100["training"].at_most >= 1024 and h100["inference"].at_most == 0  # the kernel at inference
    assert SEEDED_RULES["triangle_attention"]["cuda-sm90"]["training"].at_most == 256


def test_device_class_names():
    assert DEVICE_CLASS(torch.device("cpu")) == "cpu"
    assert DEVICE_CLASS(torch.device("meta")) == "meta"


def test_real_ops_pass_size_and_mode(monkeypatch):
    """triangle_attention and attention_pair_bias hand n and training to the rules."""
    import foldops.ops  # noqa: F401
    from foldops.ops import triangle_attention

    seen = []
    original = backend_rules.preferred
    monkeypatch.setattr(backend_rules, "preferred", lambda op, **ctx: seen.append((op, ctx)) or original(op, **ctx))
    q = torch.randn(1, 3, 5, 2, 4, requires_grad=True)
    triangle_attention(q, q, q, torch.randn(1, 2, 5, 5))
    with torch.no_grad():
        triangle_attention(q, q, q, torch.randn(1, 2, 5, 5))
    assert [(ctx["n"], ctx["training"]) for op, ctx in seen if op == "triangle_attention"] == [(5, True), (5, False)]
