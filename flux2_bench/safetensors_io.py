"""Streaming safetensors reading and writing with bounded host memory.

The reader parses the header itself and reads one tensor at a time with plain file reads (no mmap),
so host memory holds at most the tensor being read: mapped pages would stay resident and count
against the process for the whole file. It validates the header against the file size up front, so a
truncated file fails before anything is read.

The writer takes the header (names, dtypes, shapes) first and then the tensors in order, so a
converter never holds more than one output tensor. It writes to a temporary name in the destination
folder and renames at the end: an interrupted write leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: truncated, corrupt, pickled or of an unknown layout."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing to read a pickle file ({path.suffix}). Pickle can run arbitrary code on "
            "load; flux2-bench reads safetensors only. Convert it once in a trusted environment, e.g. "
            "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')."
        )


class SafetensorsReader:
    """Header-first, tensor-at-a-time reader of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_pickle(self.path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: not a safetensors file or truncated (header length {n}, file {size} bytes)"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        base = 8 + n
        data_end = base
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for {name!r}: {entry!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or begin < 0:
                raise CheckpointError(
                    f"{self.path}: header entry {name!r} spans {end - begin} bytes but "
                    f"{entry['dtype']}{list(shape)} needs {numel * dtype.itemsize}"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + begin, base + end)
            data_end = max(data_end, base + end)
        if data_end > size:
            raise CheckpointError(f"{self.path}: truncated: the header describes {data_end} bytes, the file has {size}")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh (CPU) memory."""
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        with open(self.path, "rb") as f:
            f.seek(info.start)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise CheckpointError(f"{self.path}: truncated while reading {name!r}")
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(info.dtype).reshape(info.shape)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.read(name)


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor: declare every (name, dtype, shape) first.

    Use as a context manager; the file appears under its final name only when every declared tensor
    was written and the block exited without an exception.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        header: dict = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise TypeError("safetensors metadata must map str to str")
            header["__metadata__"] = metadata
        offset = 0
        self._expected: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, (dtype, shape) in layout.items():
            numel = 1
            for s in shape:
                numel *= int(s)
            nbytes = numel * dtype.itemsize
            header[name] = {
                "dtype": DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._expected[name] = (dtype, tuple(shape), nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors writes it
        self._header = raw
        self._order = list(layout)
        self._next = 0
        self._f = None

    def __enter__(self) -> SafetensorsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(self._header)))
        self._f.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"tensors must be written in declared order: expected {want}, got {name}")
        dtype, shape, nbytes = self._expected[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: declared {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if nbytes:
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is None and self._next != len(self._order):
            exc_type = RuntimeError
            missing = self._order[self._next :][:5]
            os.unlink(self.tmp)
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} declared tensors unwritten: {missing}")
        if exc_type is not None:
            if self.tmp.exists():
                os.unlink(self.tmp)
            return
        os.replace(self.tmp, self.path)


def save_streaming(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a dict of tensors (any device) moving one tensor at a time to the host."""
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with SafetensorsWriter(path, layout, metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
