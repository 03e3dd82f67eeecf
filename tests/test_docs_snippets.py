"""The README's Python snippets run as written, so the tour cannot rot.

Every ```python block of README.md runs in a fresh namespace, in a temporary working
directory, at the small sizes it is written with. A block preceded by the line
``<!-- snippet: not run -->`` is skipped (say why next to it), and so is one that needs
an optional package that is not installed. Also: every page under
docs/ is listed in docs/README.md, and the README's relative links resolve.
"""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_MARK = "<!-- snippet: not run -->"
OPTIONAL = {"boltz"}
"""Third-party packages a snippet may need; without them it is skipped (the test
environment of the README installs them)."""
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.M | re.S)


def python_blocks(text: str):
    """[(line number, code, skipped)] of the ```python blocks of a Markdown text."""
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        skipped = bool(before) and before[-1].strip() == SKIP_MARK
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1), skipped))
    return blocks


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


README_BLOCKS = python_blocks(_read("README.md"))


def test_the_readme_has_snippets():
    assert len([b for b in README_BLOCKS if not b[2]]) >= 3


@pytest.mark.parametrize("line, code, skipped", README_BLOCKS, ids=[f"README.md:{b[0]}" for b in README_BLOCKS])
def test_readme_snippet_runs(line, code, skipped, tmp_path, monkeypatch):
    if skipped:
        pytest.skip(f"README.md:{line} is marked not runnable")
    for key in [k for k in os.environ if k.startswith("FOLDOPS_BACKEND")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except ModuleNotFoundError as exc:
        if exc.name not in OPTIONAL:
            raise
        pytest.skip(f"README.md:{line} needs {exc.name}, not installed here")


def test_python_blocks_honours_the_skip_mark():
    text = "x\n```python\na = 1\n```\n\n" + SKIP_MARK + "\n```python\nraise SystemExit\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", False), (7, "raise SystemExit\n", True)]


def test_docs_index_lists_every_page():
    index = _read(os.path.join("docs", "README.md"))
    linked = set(re.findall(r"\]\(([^)#]+\.md)", index))
    docs = os.path.join(ROOT, "docs")
    pages = {os.path.relpath(os.path.join(d, f), docs).replace(os.sep, "/")
             for d, _, files in os.walk(docs) for f in files if f.endswith(".md")}
    assert pages - {"README.md"} <= linked, sorted(pages - {"README.md"} - linked)


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)", _read("README.md")):
        if "://" not in target:
            assert os.path.exists(os.path.join(ROOT, target)), target
