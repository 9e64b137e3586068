"""Measurement primitives: latency with CUDA events, VRAM peaks (allocator + NVML), a VRAM cap that
emulates a smaller GPU, and OOM recognition.

    t = cuda_timing(lambda: model(*inputs), warmup=2, repeats=7)   # Timing(median, p10, p90, all) in ms
    with PeakMemory() as mem:
        model(*inputs)
    mem.allocator_peak_bytes, mem.device_peak_bytes                  # device figure None + reason without NVML
    with emulate_vram(24.0) as cap:                                  # allocator capped at 24 GiB - context
        try: model(*inputs)
        except Exception as e:
            if not is_oom(e): raise

"Fits a tier" is decided on the device-level figure (NVML `used`: context, cuBLAS/cuDNN workspaces and
the caching allocator's reserve included); the allocator peak is reported beside it.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GIB = 2**30


# -- latency ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Milliseconds of repeated runs (warm-up excluded). `clock`: "cuda_events" or "perf_counter" (CPU)."""

    median: float
    p10: float
    p90: float
    all: tuple[float, ...]
    clock: str = "cuda_events"


def percentile(values: list[float] | tuple[float, ...], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times_ms: list[float], clock: str = "cuda_events") -> Timing:
    return Timing(
        median=statistics.median(times_ms),
        p10=percentile(times_ms, 10),
        p90=percentile(times_ms, 90),
        all=tuple(times_ms),
        clock=clock,
    )


def cuda_timing(fn: Callable[[], object], warmup: int = 2, repeats: int = 7, device=None) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times, each between two CUDA events on the current
    stream; synchronizes once at the end. Without CUDA (or with a CPU `device`) it times with
    `time.perf_counter` and says so in `Timing.clock`."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    on_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    for _ in range(warmup):
        fn()
    if not on_cuda:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times, clock="perf_counter")
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in events])


# -- memory ----------------------------------------------------------------------------------------------


def _nvml_handle(device_index: int):
    """(pynvml module, handle) or (None, reason)."""
    try:
        import pynvml
    except ImportError as e:
        return None, f"nvidia-ml-py is not installed ({e})"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return None, "NVML library not found (no NVIDIA driver on this machine)"
    except pynvml.NVMLError as e:
        return None, f"nvmlInit failed: {e}"
    try:
        # NVML indexes physical devices; honour CUDA_VISIBLE_DEVICES through the PCI address
        p = torch.cuda.get_device_properties(device_index)
        bus = f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        return pynvml, pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except (pynvml.NVMLError, AttributeError, RuntimeError, TypeError):
        pass
    try:
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index)
    except pynvml.NVMLError as e:
        return None, f"no NVML handle for device {device_index}: {e}"


def nvml_used_bytes(device_index: int = 0) -> int | None:
    """Device-level memory in use (all processes on the GPU), or None without NVML."""
    nvml, handle = _nvml_handle(device_index)
    return None if nvml is None else int(nvml.nvmlDeviceGetMemoryInfo(handle).used)


class PeakMemory:
    """Context manager recording the allocator peak and the device-level (NVML) peak over its body.

    The NVML figure comes from a thread sampling `nvmlDeviceGetMemoryInfo(handle).used` every
    `interval_s` plus reads right before and after the body (after a synchronize), so a peak shorter
    than the interval between samples can be missed: the allocator's reserved peak
    (`reserved_peak_bytes`) is recorded as a cross-check. NVML counts every process on the GPU.
    Without NVML `device_peak_bytes` is None and `device_reason` says why.
    """

    def __init__(self, device=None, interval_s: float = 0.005):
        self.device = torch.device(device) if device is not None else None
        self.interval_s = interval_s
        self.allocator_peak_bytes: int | None = None
        self.reserved_peak_bytes: int | None = None
        self.device_peak_bytes: int | None = None
        self.device_before_bytes: int | None = None
        self.device_reason: str | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = self._handle = None

    def _index(self) -> int:
        if self.device is not None and self.device.index is not None:
            return self.device.index
        return torch.cuda.current_device()

    def _poll(self):
        while not self._stop.is_set():
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.device_peak_bytes = max(self.device_peak_bytes or 0, used)
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if not torch.cuda.is_available():
            self.device_reason = "no CUDA device"
            return self
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._nvml, handle_or_reason = _nvml_handle(self._index())
        if self._nvml is None:
            self.device_reason = handle_or_reason
            return self
        self._handle = handle_or_reason
        self.device_before_bytes = self.device_peak_bytes = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        self._thread = threading.Thread(target=self._poll, name="nvml-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if not torch.cuda.is_available():
            return False
        torch.cuda.synchronize(self.device)
        self.allocator_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        self.reserved_peak_bytes = torch.cuda.max_memory_reserved(self.device)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.device_peak_bytes = max(self.device_peak_bytes or 0, used)
        return False

    def as_dict(self) -> dict:
        return {
            "allocator_peak_bytes": self.allocator_peak_bytes,
            "reserved_peak_bytes": self.reserved_peak_bytes,
            "device_peak_bytes": self.device_peak_bytes,
            "device_before_bytes": self.device_before_bytes,
            "device_reason": self.device_reason,
            "nvml_samples": self.samples,
        }


def context_overhead_bytes(device=None) -> int | None:
    """Device-level use not held by this process's caching allocator: CUDA context, cuBLAS/cuDNN
    workspaces (and any other process). None without NVML."""
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(dev)
    used = nvml_used_bytes(dev.index if dev.index is not None else torch.cuda.current_device())
    return None if used is None else used - torch.cuda.memory_reserved(dev)


@dataclass(frozen=True)
class VramCap:
    """What `emulate_vram` set: the tier's VRAM, the context overhead assumed, and the allocator cap."""

    vram_bytes: int
    context_overhead_bytes: int
    allocator_cap_bytes: int
    fraction: float
    overhead_source: str  # "measured (NVML)" or "given"


@contextmanager
def emulate_vram(vram_gib: float, *, context_overhead_gib: float | None = None, device=None):
    """Cap the caching allocator so that cap + context overhead = `vram_gib` (the tier's memory).

    The overhead is measured here (NVML used - allocator reserved) unless given. The cap goes through
    `torch.cuda.set_per_process_memory_fraction`, which limits what the allocator may reserve: an
    allocation past it raises `torch.OutOfMemoryError` (check with `is_oom`). Cached blocks are freed
    on entry and exit, and the fraction is restored to 1.0 on exit.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("emulate_vram needs a CUDA device")
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    if context_overhead_gib is None:
        overhead = context_overhead_bytes(dev)
        if overhead is None:
            raise RuntimeError("no NVML to measure the context overhead: pass context_overhead_gib")
        source = "measured (NVML)"
    else:
        overhead, source = int(context_overhead_gib * GIB), "given"
    total = torch.cuda.get_device_properties(dev).total_memory
    vram = int(vram_gib * GIB)
    cap = vram - overhead
    if not 0 < cap <= total:
        raise ValueError(
            f"cannot emulate {vram_gib} GiB on {total / GIB:.1f} GiB with {overhead / GIB:.2f} GiB of context overhead"
        )
    cap_info = VramCap(vram, overhead, cap, cap / total, source)
    torch.cuda.set_per_process_memory_fraction(cap_info.fraction, dev)
    try:
        yield cap_info
    finally:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (torch.OutOfMemoryError, or a RuntimeError from a library that
    reports it in words, e.g. cuBLAS workspace allocation)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg or "cudaErrorMemoryAllocation" in msg
    )
