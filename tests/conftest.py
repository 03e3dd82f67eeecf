"""Shared test set-up.

Without a CUDA GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1),
which Triton reads when a kernel is defined, so it is set here before any foldops
kernel module is imported. ``auto`` never picks the interpreter; kernel tests ask for
``backend="triton"`` by name. Tests marked ``gpu`` need a real kernel-capable GPU.
"""

import os

import pytest
import torch

HAS_KERNEL_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
if not HAS_KERNEL_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_KERNEL_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with compute capability >= 8.0")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
