"""Test set-up. Triton kernels run through the interpreter when no GPU is present: the variable is read
when @triton.jit runs, so it is set here, before any kernel module is imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; run `pytest -m gpu` on the device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
