"""Lint over the sources.

- pyflakes over src/, tests/ and benchmarks/ finds nothing: unused imports and names,
  undefined names, redefinitions and the like fail the suite. A finding on a line that
  carries ``# noqa`` is accepted: that marks a deliberate side-effect import
  (``import foldops.ops  # noqa: F401  (registers the backends)``).
- No string literal ``"cuda"`` / ``"cuda:<n>"`` in src/foldops outside
  ``foldops/device.py`` and ``foldops/kernels/``: everything else asks ``foldops.device``
  (or a tensor's ``.device``), so that the same code runs on XPU, MPS and CPU.
- A Triton kernel's docstring is its first statement (a string placed after code is
  no docstring), and no kernel casts one scalar argument twice.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("src", "tests", "benchmarks")
PACKAGE = ROOT / "src" / "foldops"


def test_pyflakes_finds_nothing():
    pyflakes_api = pytest.importorskip("pyflakes.api", reason="pyflakes is in the test extra: pip install -e '.[test]'")
    from pyflakes import reporter as pyflakes_reporter

    class Collect(pyflakes_reporter.Reporter):
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

    collect = Collect()
    files = sorted(p for tree in TREES for p in (ROOT / tree).rglob("*.py"))
    assert files
    for path in files:
        pyflakes_api.checkPath(str(path), collect)
    assert not collect.findings, "pyflakes:\n" + "\n".join(collect.findings)


def _cuda_uses(source: str):
    """Line numbers of code that names CUDA itself: string constants naming the device
    type (``"cuda"``, ``"cuda:0"``, also as the literal part of an f-string,
    ``f"cuda:{i}"``) and the ``torch.cuda`` module. Docstrings, comments and device
    classes such as ``"cuda-sm90"`` are not device names."""
    lines = set()
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and (node.value == "cuda" or node.value.startswith("cuda:"))):
            lines.add(node.lineno)
        elif (isinstance(node, ast.Attribute) and node.attr == "cuda"
              and isinstance(node.value, ast.Name) and node.value.id == "torch"):
            lines.add(node.lineno)
    return sorted(lines)


def test_cuda_use_finder():
    source = ('a = "cuda"\nb = f"cuda:{i}"\nc = "cuda-sm90"\n"""Runs on cuda."""\n# "cuda"\nd = "cuda:1"\n'
              "e = torch.cuda.current_stream()\nf = x.cuda\n")
    assert _cuda_uses(source) == [1, 2, 6, 7]


def test_no_cuda_outside_the_device_module_and_kernels():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "device.py" or rel.startswith("kernels/"):
            continue
        found += [f"src/foldops/{rel}:{line}" for line in _cuda_uses(path.read_text())]
    assert not found, ('"cuda" literals or torch.cuda (ask foldops.device, or use a tensor\'s .device):\n'
                       + "\n".join(found))


def _is_triton_jit(fn) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def _kernel_findings(source: str):
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or not _is_triton_jit(fn):
            continue
        for i, stmt in enumerate(fn.body[1:], 1):
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                found.append(f"{stmt.lineno}: {fn.name}: a string statement after code (the docstring goes first)")
        casts = {}
        for stmt in fn.body:
            value = getattr(stmt, "value", None)
            if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(value, ast.Call) and ast.unparse(value.func).endswith("cast") and value.args
                    and ast.unparse(value.args[0]) == stmt.targets[0].id):
                casts.setdefault(stmt.targets[0].id, []).append(stmt.lineno)
        found += [f"{lines[1]}: {fn.name}: {name} cast again (first at line {lines[0]})"
                  for name, lines in casts.items() if len(lines) > 1]
    return found


def test_kernel_finder():
    source = (
        "@triton.jit\ndef k(scale):\n    scale = tl.cast(scale, tl.float32)\n    '''doc'''\n"
        "    scale = tl.cast(scale, tl.float32)\n"
        "@triton.jit\ndef ok(eps):\n    '''doc'''\n    eps = tl.cast(eps, tl.float32)\n"
    )
    assert [f.split(":")[0] for f in _kernel_findings(source)] == ["4", "5"]


def test_kernel_docstrings_first_and_scalar_casts_once():
    found = []
    for path in sorted((PACKAGE / "kernels").rglob("*.py")):
        found += [f"{path.relative_to(ROOT)}:{f}" for f in _kernel_findings(path.read_text())]
    assert not found, "\n".join(found)
