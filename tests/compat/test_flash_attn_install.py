"""install(): flash_attn's import lines resolve to foldops, and a real flash_attn is never shadowed."""

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import foldops.compat.flash_attn as fa

SRC = str(Path(__file__).resolve().parents[2] / "src")

# A small module written against flash_attn, as model code is (SEDD's transformer, ESM ports).
USER_MODULE = textwrap.dedent("""
    import flash_attn
    from flash_attn import flash_attn_varlen_qkvpacked_func as top_level
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func, flash_attn_func
    from flash_attn.ops.fused_dense import FusedDense, FusedMLP
    from flash_attn.layers.rotary import RotaryEmbedding, apply_rotary_emb, apply_rotary_emb_qkv_
    from flash_attn.bert_padding import pad_input, unpad_input

    VERSION = flash_attn.__version__

    def mlp_keys():
        return list(FusedMLP(8, hidden_features=16).state_dict())
""")


@pytest.fixture
def clean_imports():
    """Restore sys.path, sys.meta_path and flash_attn modules after the test."""
    path, meta = list(sys.path), list(sys.meta_path)
    saved = {n: m for n, m in sys.modules.items() if n == "flash_attn" or n.startswith("flash_attn.")}
    fa.uninstall()
    yield
    fa.uninstall()
    for name in [n for n in sys.modules if n == "flash_attn" or n.startswith("flash_attn.") or n == "fa_user"]:
        del sys.modules[name]
    sys.modules.update(saved)
    sys.path[:], sys.meta_path[:] = path, meta
    importlib.invalidate_caches()


def _write(tmp_path, name, text):
    (tmp_path / name).write_text(text)


def test_install_resolves_flash_attn_imports(tmp_path, clean_imports):
    if fa.real_flash_attn_available():
        pytest.skip("a real flash_attn is installed here")
    with pytest.raises(ImportError):
        importlib.import_module("flash_attn")
    assert fa.install() is True and fa.install() is True  # idempotent
    _write(tmp_path, "fa_user.py", USER_MODULE)
    sys.path.insert(0, str(tmp_path))
    user = importlib.import_module("fa_user")
    assert user.flash_attn_varlen_qkvpacked_func is fa.flash_attn_varlen_qkvpacked_func
    assert user.top_level is fa.flash_attn_varlen_qkvpacked_func
    assert user.FusedMLP is fa.FusedMLP and user.apply_rotary_emb_qkv_ is fa.apply_rotary_emb_qkv_
    assert user.unpad_input is fa.unpad_input
    assert user.mlp_keys() == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert user.VERSION.startswith("2.") and user.VERSION.endswith("+foldops")
    assert sys.modules["flash_attn.ops.fused_dense"].__name__ == "flash_attn.ops.fused_dense"
    with pytest.raises(ImportError):
        importlib.import_module("flash_attn.modules.mha")  # not covered: ImportError, as without install()
    with pytest.raises(ImportError, match="flash_attn_with_kvcache"):
        exec("from flash_attn.flash_attn_interface import flash_attn_with_kvcache", {})
    fa.uninstall()
    assert "flash_attn" not in sys.modules
    with pytest.raises(ImportError):
        importlib.import_module("flash_attn")


NOT_PROVIDED = "foldops's stand-in for flash_attn does not provide it"


@pytest.mark.parametrize("statement, error", [
    ("from flash_attn import flash_attn_with_kvcache", ImportError),
    ("from flash_attn.flash_attn_interface import flash_attn_with_kvcache", ImportError),
    ("from flash_attn.ops import triton", ImportError),
    ("from flash_attn.layers.rotary import apply_rotary_emb, missing_name", ImportError),
    ("import flash_attn.modules.mha", ModuleNotFoundError),
    ("from flash_attn.modules.mha import MHA", ModuleNotFoundError),
])
def test_what_foldops_lacks_is_named_in_the_error(clean_imports, statement, error):
    """Python replaces an AttributeError's message in ``from m import name`` by "cannot
    import name ... (unknown location)": the message must still say foldops lacks it."""
    if fa.real_flash_attn_available():
        pytest.skip("a real flash_attn is installed here")
    fa.install()
    with pytest.raises(error, match=NOT_PROVIDED) as info:
        exec(statement, {})
    assert "unknown location" not in str(info.value)
    import flash_attn

    # Attribute look-ups keep their AttributeError (hasattr / getattr with a default work).
    assert not hasattr(flash_attn, "flash_attn_with_kvcache")
    assert getattr(flash_attn, "flash_attn_with_kvcache", None) is None
    with pytest.raises(AttributeError, match="foldops does not provide it"):
        flash_attn.flash_attn_with_kvcache  # noqa: B018


def _fake_real_flash_attn(tmp_path):
    pkg = tmp_path / "real" / "flash_attn"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("REAL = True\n__version__ = '2.7.0'\n")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "fused_dense.py").write_text("REAL = True\n")
    return str(tmp_path / "real")


def test_install_never_shadows_a_real_flash_attn(tmp_path, clean_imports):
    sys.path.insert(0, _fake_real_flash_attn(tmp_path))
    importlib.invalidate_caches()
    assert fa.real_flash_attn_available()
    assert fa.install() is False and not fa.is_installed()
    import flash_attn
    from flash_attn.ops import fused_dense

    assert flash_attn.REAL and fused_dense.REAL


def test_real_flash_attn_added_after_install_still_wins(tmp_path, clean_imports):
    if fa.real_flash_attn_available():
        pytest.skip("a real flash_attn is installed here")
    assert fa.install() is True
    sys.path.insert(0, _fake_real_flash_attn(tmp_path))
    importlib.invalidate_caches()
    import flash_attn

    assert getattr(flash_attn, "REAL", False)  # the finder is last on sys.meta_path


def test_install_in_a_fresh_process(tmp_path):
    """The way a user runs unmodified code: install() first, then their module imports flash_attn."""
    _write(tmp_path, "fa_user.py", USER_MODULE)
    code = textwrap.dedent("""
        import foldops.compat.flash_attn as fa
        if fa.real_flash_attn_available():
            print("REAL"); raise SystemExit
        assert fa.install()
        import torch, fa_user
        qkv = torch.randn(1, 5, 3, 2, 8)
        fa_user.apply_rotary_emb_qkv_(qkv, torch.randn(5, 4), torch.randn(5, 4))
        print("OK", fa_user.mlp_keys()[0])
    """)
    env = dict(os.environ, PYTHONPATH=f"{SRC}:{tmp_path}")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] in ("OK", "REAL")
