"""The fake op of the bench tests, importable by name (``conftest`` is not: every
conftest.py without an ``__init__.py`` is imported as the one module ``conftest``, so
``from conftest import ...`` gets whichever conftest pytest loaded last)."""

import torch

from foldops import backends

FAKE_OP = "_bench_fake"


def fake_op(x, mask=None, *, backend="auto"):
    """out = 2 x (zeros where mask is False); backends differ in how well they do it.

    Selects as the real ops with size rules do: with the size ``n`` and the mode
    (``training``: autograd records the call).
    """
    training = torch.is_grad_enabled() and x.requires_grad
    impl = backends.select(FAKE_OP, backend, device=x.device, dtype=x.dtype, n=x.shape[1], training=training)
    return impl.fn(x, mask)
