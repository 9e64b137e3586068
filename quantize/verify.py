"""Check a converted checkpoint against its source (per-layer SQNR) and describe one (inspect).

Both read the files header-first and one layer at a time: verifying FLUX.2-dev holds one source
weight and its dequantized fp32 copy, never the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux2_bench.quantize.convert import META, sha256_file
from flux2_bench.quantize.formats import sqnr
from flux2_bench.quantize.recipes import Recipe, dequantize_layer, get_recipe
from flux2_bench.safetensors_io import CheckpointError, SafetensorsReader
from flux2_bench.weights import resolve_files


@dataclass
class Opened:
    files: list[Path]
    readers: dict[str, SafetensorsReader]
    metadata: dict[str, str]

    def read(self, key: str) -> torch.Tensor:
        return self.readers[key].read(key)

    @property
    def nbytes(self) -> int:
        return sum(r.tensors[k].nbytes for k, r in self.readers.items())


def _open(path: str | os.PathLike) -> Opened:
    files, _ = resolve_files(path)
    readers: dict[str, SafetensorsReader] = {}
    for f in files:
        r = SafetensorsReader(f)
        for k in r.keys():
            readers[k] = r
    meta = next(iter(readers.values())).metadata if readers else {}
    return Opened(files, readers, meta)


def _quantized_meta(opened: Opened, path) -> tuple[Recipe, list[str], list[str]]:
    meta = opened.metadata
    if META + "recipe" not in meta:
        raise CheckpointError(f"{path}: not a flux2-quantize output (no {META}recipe in its metadata)")
    version = meta.get(META + "format_version")
    if version != "1":
        raise CheckpointError(f"{path}: format version {version!r}; this tool reads version '1'")
    return (
        Recipe(meta[META + "recipe"]),
        json.loads(meta[META + "quantized_layers"]),
        json.loads(meta[META + "kept_layers"]),
    )


def _layer_tensors(opened: Opened, layer: str) -> dict[str, torch.Tensor]:
    prefix = layer + "."
    return {k[len(prefix) :]: opened.read(k) for k in opened.readers if k.startswith(prefix)}


@dataclass
class LayerCheck:
    layer: str
    shape: tuple[int, ...]
    sqnr_db: float
    max_abs_err: float
    bytes: int


@dataclass
class VerifyReport:
    recipe: str
    floor_db: float
    layers: list[LayerCheck] = field(default_factory=list)
    kept_mismatches: list[str] = field(default_factory=list)
    hash_ok: bool | None = None
    bytes_out: int = 0
    bytes_src: int = 0

    @property
    def failures(self) -> list[LayerCheck]:
        return [c for c in self.layers if not c.sqnr_db >= self.floor_db]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.kept_mismatches and self.hash_ok is not False

    def table(self) -> str:
        lines = [f"{'layer':<60} {'shape':>16} {'SQNR dB':>8} {'max |err|':>10} {'MB':>8}"]
        for c in self.layers:
            flag = "" if c.sqnr_db >= self.floor_db else "  < floor"
            lines.append(
                f"{c.layer:<60} {'x'.join(map(str, c.shape)):>16} {c.sqnr_db:8.2f} {c.max_abs_err:10.3g} "
                f"{c.bytes / 1e6:8.2f}{flag}"
            )
        worst = min((c.sqnr_db for c in self.layers), default=math.nan)
        lines.append(
            f"recipe {self.recipe}: {len(self.layers)} quantized layers, worst {worst:.2f} dB (floor "
            f"{self.floor_db} dB), {len(self.failures)} below; kept layers differing from the source: "
            f"{len(self.kept_mismatches)}; source hash "
            f"{'matches' if self.hash_ok else 'differs' if self.hash_ok is False else 'not checked'}"
        )
        lines.append(
            f"size: {self.bytes_out / 1e9:.3f} GB (source {self.bytes_src / 1e9:.3f} GB, "
            f"{self.bytes_out / max(self.bytes_src, 1):.1%})"
        )
        return "\n".join(lines)


def verify(out: str | os.PathLike, *, against: str | os.PathLike, check_hash: bool = True) -> VerifyReport:
    """Per quantized layer: SQNR (dB) and max |error| of the dequantized weight against the source;
    kept tensors must equal the source bit for bit; the recorded source sha256 must match."""
    q = _open(out)
    recipe, quantized, kept = _quantized_meta(q, out)
    opts = json.loads(q.metadata.get(META + "recipe_options", "{}"))
    cfg = get_recipe(recipe, **opts)
    src = _open(against)
    report = VerifyReport(recipe.value, cfg.sqnr_floor_db, bytes_out=q.nbytes, bytes_src=src.nbytes)
    if check_hash:
        recorded = json.loads(q.metadata.get(META + "source_sha256", "{}"))
        actual = {f.name: sha256_file(f) for f in src.files}
        report.hash_ok = recorded == actual
    qset = set(quantized)
    for layer in quantized:
        key = layer + ".weight"
        if key not in src.readers:
            raise CheckpointError(f"{against}: has no {key}, which {out} quantized; wrong source?")
        w = src.read(key).float()
        stored = _layer_tensors(q, layer)
        dq = dequantize_layer(recipe, stored)
        if dq.shape != w.shape:
            raise CheckpointError(f"{layer}: dequantized shape {list(dq.shape)} != source {list(w.shape)}")
        err = (dq - w).abs().max().item()
        report.layers.append(
            LayerCheck(
                layer, tuple(w.shape), sqnr(w, dq), err, sum(t.numel() * t.element_size() for t in stored.values())
            )
        )
        del w, dq, stored
    for key in src.readers:
        if key.removesuffix(".weight") in qset and key.endswith(".weight"):
            continue
        if key not in q.readers or not torch.equal(q.read(key), src.read(key)):
            report.kept_mismatches.append(key)
    del kept
    return report


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """Format, recipe, layers and sizes of a checkpoint (ours or any safetensors), from headers only."""
    opened = _open(path)
    meta = opened.metadata
    by_dtype: dict[str, int] = {}
    for k, r in opened.readers.items():
        dt = str(r.tensors[k].dtype).removeprefix("torch.")
        by_dtype[dt] = by_dtype.get(dt, 0) + r.tensors[k].nbytes
    info = {
        "path": str(path),
        "files": [str(f) for f in opened.files],
        "tensors": len(opened.readers),
        "bytes": opened.nbytes,
        "bytes_by_dtype": by_dtype,
        "recipe": meta.get(META + "recipe"),
        "format_version": meta.get(META + "format_version"),
        "preset": meta.get(META + "preset"),
        "architecture": meta.get(META + "architecture"),
        "convention": meta.get(META + "convention"),
        "tool_version": meta.get(META + "tool_version"),
        "source_sha256": json.loads(meta[META + "source_sha256"]) if META + "source_sha256" in meta else None,
        "comfy_quantization_metadata": "_quantization_metadata" in meta,
    }
    if info["recipe"]:
        quantized = json.loads(meta[META + "quantized_layers"])
        info["quantized_layers"] = {
            layer: sum(opened.readers[k].tensors[k].nbytes for k in opened.readers if k.startswith(layer + "."))
            for layer in quantized
        }
        info["kept_layers"] = json.loads(meta[META + "kept_layers"])
    return info


def format_inspect(info: dict) -> str:
    lines = [f"{info['path']}: {len(info['files'])} file(s), {info['tensors']} tensors, {info['bytes'] / 1e9:.3f} GB"]
    lines.append("  by dtype: " + ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in info["bytes_by_dtype"].items()))
    if not info["recipe"]:
        lines.append("  not a flux2-quantize output (no recipe in metadata)")
        return "\n".join(lines)
    lines.append(
        f"  recipe {info['recipe']} (format v{info['format_version']}, tool {info['tool_version']}), preset "
        f"{info['preset']}, {info['architecture']} / {info['convention']} keys"
        + (", ComfyUI markers" if info["comfy_quantization_metadata"] else "")
    )
    lines.append(f"  source sha256: {info['source_sha256']}")
    q = info["quantized_layers"]
    lines.append(f"  quantized layers: {len(q)} ({sum(q.values()) / 1e9:.3f} GB)")
    for layer, n in q.items():
        lines.append(f"    {layer:<60} {n / 1e6:10.2f} MB")
    lines.append(f"  kept in high precision: {len(info['kept_layers'])}: {', '.join(info['kept_layers'])}")
    return "\n".join(lines)
