"""Lint: pyflakes over src/, tests/ and benchmarks/ finds nothing.

Unused imports and names, undefined names, redefinitions and the like fail the suite.
A finding on a line that carries ``# noqa`` is accepted: that marks a deliberate
side-effect import (``import foldops.ops  # noqa: F401  (registers the backends)``).
"""

from pathlib import Path

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api", reason="pyflakes is in the test extra: pip install -e '.[test]'")
from pyflakes import reporter as pyflakes_reporter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TREES = ("src", "tests", "benchmarks")


class _Collect(pyflakes_reporter.Reporter):
    def __init__(self):
        self.findings = []

    def unexpectedError(self, filename, msg):
        self.findings.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.findings.append(f"{filename}:{lineno}: syntax error: {msg}")

    def flake(self, message):
        path = Path(message.filename)
        line = path.read_text().splitlines()[message.lineno - 1]
        if "# noqa" not in line:
            self.findings.append(str(message))


def test_pyflakes_finds_nothing():
    collect = _Collect()
    files = sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py"))
    assert files
    for path in files:
        pyflakes_api.checkPath(str(path), collect)
    assert not collect.findings, "pyflakes:\n" + "\n".join(collect.findings)
