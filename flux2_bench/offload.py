"""Placement mechanisms: a module's weights parked in pinned host memory, moved to the GPU for a phase,
and transformer blocks streamed one ahead while the previous one computes.

    te = PinnedModule(text_encoder)                       # weights now in pinned host memory
    with offload_between_phases(text_encoder, "cuda"):    # on the GPU for this phase only
        emb = text_encoder(...)

    with BlockStreamer(model, "cuda"):                    # model.double_blocks / .single_blocks
        out = model(img, img_ids, txt, txt_ids, t, guidance)

A `PinnedModule` packs every parameter and buffer of a module into ONE flat host buffer (offsets aligned
to 512 B, as the caching allocator aligns), so moving it is one host-to-device copy into one device
allocation, and parking it again costs nothing: the weights are read-only, so "back to the host" only
re-points the parameters at the host copy and drops the device buffer.

`BlockStreamer` installs forward pre-/post-hooks on every block (double then single, the order forward
runs them). Before block i runs it makes the compute stream wait for block i's copy, then starts copying
block i+1 (wrapping to block 0 for the next step) on a side stream; after block i runs its device buffer
is released. At most two blocks are on the GPU at once. The side stream waits for the compute stream
before each prefetch, and every prefetched buffer is `record_stream`-ed on the compute stream so the
caching allocator never hands its memory out while a kernel still reads it.

On a CPU device the same code runs (copies are plain CPU copies, no streams, nothing pinned), so tests
can check the order of transfers (`BlockStreamer.log`) and that outputs are unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn

_ALIGN = 512  # bytes; the CUDA caching allocator's alignment, so views start where a fresh tensor would


class PinnedModule:
    """All parameters and buffers of `module` in one flat (pinned when CUDA is present) host buffer.

    After construction the module's tensors are views of the host buffer. `to_device` copies the buffer to
    a device in one transfer (on the current stream) and re-points the tensors at it; `to_host` re-points
    them at the host buffer, releasing the device copy.
    """

    def __init__(self, module: nn.Module, *, pin: bool | None = None):
        self.module = module
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.entries: list[tuple[nn.Module, str, str, torch.Size, torch.dtype, int, int]] = []
        offset = 0
        for mod in module.modules():
            for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    nbytes = t.numel() * t.element_size()
                    self.entries.append((mod, kind, name, t.shape, t.dtype, offset, nbytes))
                    offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.host = torch.empty(offset, dtype=torch.uint8, pin_memory=self.pin)
        with torch.no_grad():
            for (mod, kind, name, *_), view in zip(self.entries, self._views(self.host), strict=True):
                src = mod._parameters[name] if kind == "param" else mod._buffers[name]
                view.copy_(src.detach())
        self.device_buffer: Tensor | None = None
        self.to_host()

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[off : off + nb].view(dtype).view(shape) for (_, _, _, shape, dtype, off, nb) in self.entries]

    def _point(self, flat: Tensor) -> None:
        for (mod, kind, name, *_), view in zip(self.entries, self._views(flat), strict=True):
            if kind == "param":
                mod._parameters[name].data = view
            else:
                mod._buffers[name] = view

    def to_device(self, device, non_blocking: bool = True) -> Tensor:
        """Copy to `device` on the current stream; returns the flat device buffer (for `record_stream`)."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        buf.copy_(self.host, non_blocking=non_blocking and self.pin)
        self.device_buffer = buf
        self._point(buf)
        return buf

    def to_host(self) -> None:
        """Point the module back at the host copy; the device buffer is freed once nothing uses it."""
        self._point(self.host)
        self.device_buffer = None

    @property
    def on_device(self) -> bool:
        return self.device_buffer is not None


def to_pinned_host(module: nn.Module) -> PinnedModule:
    """Park `module` in pinned host memory (idempotent: the PinnedModule is kept on the module)."""
    pm = getattr(module, "_flux2_pinned", None)
    if pm is None:
        pm = PinnedModule(module)
        module._flux2_pinned = pm
    return pm


@contextmanager
def offload_between_phases(module: nn.Module, device):
    """The module's weights on `device` for the body only, parked in pinned host memory before and after."""
    pm = to_pinned_host(module)
    pm.to_device(device)
    try:
        yield module
    finally:
        pm.to_host()


class BlockStreamer:
    """Stream `model.double_blocks` + `model.single_blocks` from pinned host memory, one block ahead.

    Everything else in the model (embedders, modulation, final layer) is moved to `device` and stays.
    Use as a context manager or call `remove()`: hooks come off and the blocks stay in host memory.
    `log` records ("load" | "wait" | "prefetch" | "release", block index) in order; `max_on_device`
    is the most blocks that were on the device at once.
    """

    def __init__(self, model: nn.Module, device, *, prefetch: bool = True):
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.blocks: list[nn.Module] = list(model.double_blocks) + list(model.single_blocks)
        if not self.blocks:
            raise ValueError("the model has no double_blocks / single_blocks to stream")
        in_blocks = {id(t) for b in self.blocks for t in (*b.parameters(), *b.buffers())}
        with torch.no_grad():
            for mod in model.modules():
                for p in mod._parameters.values():
                    if p is not None and id(p) not in in_blocks:
                        p.data = p.data.to(self.device)
                for name, b in mod._buffers.items():
                    if b is not None and id(b) not in in_blocks:
                        mod._buffers[name] = b.to(self.device)
        self.pinned = [PinnedModule(b, pin=self.on_cuda) for b in self.blocks]
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # give back the device memory the blocks had
        self.prefetch = prefetch
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.events: list[torch.cuda.Event | None] = [None] * len(self.blocks)
        self.log: list[tuple[str, int]] = []
        self.max_on_device = 0
        self._handles = []
        for i, b in enumerate(self.blocks):
            self._handles.append(b.register_forward_pre_hook(partial(self._before, i)))
            self._handles.append(b.register_forward_hook(partial(self._after, i)))

    @property
    def block_bytes(self) -> list[int]:
        """Bytes of each streamed block (flat, aligned), execution order."""
        return [p.nbytes for p in self.pinned]

    def _count(self):
        self.max_on_device = max(self.max_on_device, sum(p.on_device for p in self.pinned))

    def _before(self, i: int, module, args):
        pm = self.pinned[i]
        if not pm.on_device:  # first block of the first step, or prefetch off
            pm.to_device(self.device)
            self.log.append(("load", i))
        else:  # prefetched during the previous block: the compute stream waits for that copy
            if self.events[i] is not None:
                torch.cuda.current_stream(self.device).wait_event(self.events[i])
                self.events[i] = None
            self.log.append(("wait", i))
        j = (i + 1) % len(self.blocks)
        if self.prefetch and j != i and not self.pinned[j].on_device:
            self._prefetch(j)
        self._count()

    def _prefetch(self, j: int):
        if not self.on_cuda:
            self.pinned[j].to_device(self.device)
        else:
            main = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(main)  # copy only after the kernels queued so far (1 block ahead)
            with torch.cuda.stream(self.stream):
                buf = self.pinned[j].to_device(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            buf.record_stream(main)  # freed buffer is not reused before the compute stream is done with it
            self.events[j] = ev
        self.log.append(("prefetch", j))

    def _after(self, i: int, module, args, output):
        self.pinned[i].to_host()
        self.log.append(("release", i))

    def remove(self) -> None:
        """Take the hooks off and park every block back in host memory."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.on_cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for pm in self.pinned:
            pm.to_host()
        self.events = [None] * len(self.blocks)

    def __enter__(self) -> BlockStreamer:
        return self

    def __exit__(self, *exc):
        self.remove()
        return False
