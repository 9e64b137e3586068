"""Measurement primitives: statistics, CPU fallbacks, NVML absence, OOM recognition; GPU behaviour marked."""

from __future__ import annotations

import pytest
import torch

from flux2_bench.measure import (
    PeakMemory,
    Timing,
    cuda_timing,
    emulate_vram,
    is_oom,
    nvml_used_bytes,
    percentile,
    summarize,
)

HAS_CUDA = torch.cuda.is_available()


def test_percentile_matches_linear_interpolation():
    # 10 values 1..10: position (10 - 1) * 0.1 = 0.9 -> 1 + 0.9 * (2 - 1) = 1.9; p90 at 8.1 -> 9.1
    v = [float(x) for x in range(10, 0, -1)]
    assert percentile(v, 10) == pytest.approx(1.9)
    assert percentile(v, 90) == pytest.approx(9.1)
    assert percentile(v, 50) == pytest.approx(5.5)
    assert percentile([3.0], 90) == 3.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def test_summarize():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0, 100.0, 6.0])
    # sorted 1 2 3 4 5 6 100: median 4; p10 at 0.6 -> 1.6; p90 at 5.4 -> 6 + 0.4 * 94 = 43.6
    assert (t.median, t.p10, t.p90) == (4.0, pytest.approx(1.6), pytest.approx(43.6))
    assert t.all == (5.0, 1.0, 3.0, 2.0, 4.0, 100.0, 6.0) and t.clock == "cuda_events"


def test_cuda_timing_excludes_warmup_and_counts_repeats():
    calls = []
    t = cuda_timing(lambda: calls.append(1), warmup=3, repeats=5, device="cpu")
    assert len(calls) == 8 and len(t.all) == 5
    assert isinstance(t, Timing) and t.clock == "perf_counter"
    assert t.p10 <= t.median <= t.p90
    with pytest.raises(ValueError, match="repeats"):
        cuda_timing(lambda: None, repeats=0)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-driver path")
def test_peak_memory_without_a_gpu_records_the_reason():
    with PeakMemory() as mem:
        torch.ones(10)
    d = mem.as_dict()
    assert d["device_peak_bytes"] is None and d["allocator_peak_bytes"] is None
    assert d["device_reason"] == "no CUDA device"
    assert nvml_used_bytes() is None  # NVMLError_LibraryNotFound is caught, not raised
    with pytest.raises(RuntimeError, match="needs a CUDA device"), emulate_vram(24):
        pass


def test_is_oom():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))  # not a runtime failure


@pytest.mark.gpu
def test_peak_memory_and_cap_on_gpu():
    with PeakMemory() as mem:
        x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    assert mem.allocator_peak_bytes >= 256 * 2**20
    if mem.device_reason is None:
        assert mem.device_peak_bytes >= mem.device_before_bytes
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    with emulate_vram(4.0, context_overhead_gib=1.0) as cap:
        assert cap.allocator_cap_bytes == 3 * 2**30
        with pytest.raises(torch.OutOfMemoryError) as e:
            torch.empty(int(3.5 * 2**30), dtype=torch.uint8, device="cuda")
        assert is_oom(e.value)
        y = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")  # below the cap: fine
        del y
    z = torch.empty(int(min(8, total_gib / 2) * 2**30), dtype=torch.uint8, device="cuda")  # cap lifted
    del z
