"""Test set-up. Triton kernels run through the interpreter when no GPU is present: the variable is read
when @triton.jit runs, so it is set here, before any kernel module is imported.

With FLUX2_TEST_TRACE=<dir> (set by .ci/run), the suite also leaves a trail for a crash that kills the
interpreter (SIGABRT/SIGSEGV in native code, where pytest itself reports nothing): ``<dir>/current`` names
the test being run, and ``<dir>/faulthandler.txt`` receives the Python stacks of every thread. CI prints
both when the run fails, so the end of its log says where it died."""

import faulthandler
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
_TRACE_DIR = os.environ.get("FLUX2_TEST_TRACE")
_trace_file = None


def pytest_sessionstart(session):
    # After pytest's own faulthandler plugin has configured itself (it points the handler at stderr):
    # a file survives a log truncated to its tail.
    global _trace_file
    if _TRACE_DIR:
        os.makedirs(_TRACE_DIR, exist_ok=True)
        _trace_file = open(os.path.join(_TRACE_DIR, "faulthandler.txt"), "w")  # noqa: SIM115 (open for the session)
        faulthandler.enable(file=_trace_file, all_threads=True)


def pytest_runtest_logstart(nodeid, location):
    if _TRACE_DIR:
        with open(os.path.join(_TRACE_DIR, "current"), "w") as f:
            f.write(nodeid + "\n")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU; run `pytest -m gpu` on the device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
