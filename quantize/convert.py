"""Streaming checkpoint converter: a bf16 FLUX.2 transformer or text encoder -> FP8 / 4-bit safetensors.

Host memory stays bounded by the largest tensor, never the checkpoint: the output header is planned
from the input headers, then one source tensor is read, checked (NaN/Inf), quantized in row chunks
into preallocated outputs and written before the next is read (peak ~ 2x the largest tensor plus the
chunk temporaries; FLUX.2-dev's largest, single_blocks.*.linear1, is 680 MB in bf16).

Writes are safe: everything goes to a hidden staging folder beside the destination and is renamed
into place at the end, so an interrupted run (Ctrl-C, kill) leaves nothing that looks complete; a
failed run removes its staging folder, and a rerun removes the one a killed run left.

The output keeps the input's key convention and layout: an official BFL file stays a BFL file (the
`model.diffusion_model.` prefix included), a diffusers or transformers folder stays a folder with
its config.json (nf4 adds the `quantization_config` diffusers and transformers read).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flux2_bench.quantize import formats as F
from flux2_bench.quantize.linear import BLOCK_LINEARS
from flux2_bench.quantize.recipes import COMFY_FP8, COMFY_NVFP4, Recipe, RecipeConfig, get_recipe, nf4_tensors
from flux2_bench.safetensors_io import CheckpointError, SafetensorsReader, SafetensorsWriter
from flux2_bench.weights import infer_config, open_checkpoint, preset_name, resolve_files

FORMAT_VERSION = "1"
DEFAULT_SHARD_SIZE = 5 * 1000**3  # what the input used when it was sharded and no size is given
CHUNK_ELEMENTS = 4 * 1024 * 1024  # rows of a weight quantized at a time: ~16 MB of fp32 temporaries each
META = "flux2_bench."

# Block linears of the FLUX.2 transformer (BFL names from quantize.linear, plus diffusers' names);
# everything else stays bf16.
FLUX2_BLOCK_LINEARS = (
    *BLOCK_LINEARS,
    "transformer_blocks.*.attn.to_[qkv]",
    "transformer_blocks.*.attn.add_[qkv]_proj",
    "transformer_blocks.*.attn.to_out.0",
    "transformer_blocks.*.attn.to_add_out",
    "transformer_blocks.*.ff.linear_in",
    "transformer_blocks.*.ff.linear_out",
    "transformer_blocks.*.ff_context.linear_in",
    "transformer_blocks.*.ff_context.linear_out",
    "single_transformer_blocks.*.attn.to_qkv_mlp_proj",
    "single_transformer_blocks.*.attn.to_out",
)
# Text encoders (Mistral3 / Qwen3, transformers layout): attention and MLP projections of the decoder
# layers; embeddings, norms, lm_head and the multimodal projector stay bf16.
TEXT_ENCODER_LINEARS = ("*layers.*_proj", "*layers.*.mlp.*")
QUANTIZED_MARKERS = (".weight_scale", ".scale_weight", ".comfy_quant", ".absmax", "scaled_fp8", ".quant_map")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# The source


@dataclass
class Source:
    """A checkpoint opened header-only: its files, keys, architecture and how to name the output."""

    path: Path
    files: list[Path]
    readers: dict[str, SafetensorsReader]  # full key -> reader
    architecture: str  # "flux2" | "mistral3" | "qwen3"
    convention: str  # "bfl" | "diffusers" | "transformers"
    prefix: str  # stripped for layer-policy matching ("" or "model.diffusion_model.")
    preset: str
    folder: Path | None  # set when the input is a folder (or an index inside one)
    base_name: str  # output file stem, e.g. "diffusion_pytorch_model" or "model"
    config: dict | None = None

    def keys(self) -> list[str]:
        return list(self.readers)

    def info(self, key: str):
        return self.readers[key].tensors[key]

    @property
    def nbytes(self) -> int:
        return sum(self.info(k).nbytes for k in self.readers)


_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}$")


def _text_encoder_arch(keys: list[str], config: dict | None) -> str | None:
    if config:
        mt = str(config.get("model_type", ""))
        archs = " ".join(config.get("architectures") or [])
        if mt == "mistral3" or "Mistral3" in archs:
            return "mistral3"
        if mt == "qwen3" or "Qwen3" in archs:
            return "qwen3"
    has_layers = any(re.search(r"layers\.\d+\.self_attn\.q_proj\.weight$", k) for k in keys)
    if not has_layers:
        return None
    if any("language_model." in k for k in keys):
        return "mistral3"
    if any(k.endswith("self_attn.q_norm.weight") for k in keys):
        return "qwen3"
    return None


def open_source(path: str | os.PathLike) -> Source:
    """Open a FLUX.2 transformer (BFL file, diffusers folder, sharded index) or a Mistral3/Qwen3 text
    encoder header-first. Raises CheckpointError for pickles, truncated or corrupt files, unknown
    architectures and inputs that are already quantized."""
    path = Path(path)
    files, config = resolve_files(path)  # refuses pickles, finds index / folder files
    folder = None if (path.is_file() and path.suffix == ".safetensors") else files[0].parent
    readers: dict[str, SafetensorsReader] = {}
    for f in files:
        r = SafetensorsReader(f)  # validates the header against the file size: truncation fails here
        for k in r.keys():
            if k in readers:
                raise CheckpointError(f"key {k!r} appears in both {readers[k].path} and {f}")
            readers[k] = r
    keys = list(readers)
    _refuse_quantized(path, readers)
    try:
        ckpt = open_checkpoint(path)
    except CheckpointError as e:
        if "unknown architecture" not in str(e):
            raise
        arch = _text_encoder_arch(keys, config)
        if arch is None:
            raise CheckpointError(
                f"{path}: unknown architecture: neither a FLUX.2 transformer (img_in.weight / x_embedder.weight) "
                f"nor a Mistral3/Qwen3 text encoder (layers.N.self_attn.q_proj.weight); first keys: {sorted(keys)[:5]}"
            ) from None
        architecture, convention, prefix, preset = arch, "transformers", "", str((config or {}).get("model_type", arch))
    else:
        architecture, convention, prefix = "flux2", ckpt.convention, ckpt.prefix
        preset = preset_name(infer_config(ckpt))
    index = [f for f in (folder.glob("*.safetensors.index.json") if folder else []) if f.is_file()]
    if index and len(files) > 1:
        base = index[0].name.removesuffix(".safetensors.index.json")
    else:
        base = _SHARD_RE.sub("", files[0].stem)
    return Source(path, files, readers, architecture, convention, prefix, preset, folder, base, config)


def _refuse_quantized(path: Path, readers: dict[str, SafetensorsReader]) -> None:
    meta = next(iter(readers.values())).metadata if readers else {}
    why = []
    if META + "recipe" in meta:
        why.append(f"its metadata says recipe {meta[META + 'recipe']!r}")
    if "_quantization_metadata" in meta:
        why.append("it carries ComfyUI _quantization_metadata")
    for k, r in readers.items():
        if len(why) >= 3:
            break
        dt = r.tensors[k].dtype
        if dt in (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8, torch.int8):
            why.append(f"{k} is {dt}")
        elif any(m in k for m in QUANTIZED_MARKERS):
            why.append(f"it has quantization key {k}")
    if why:
        raise CheckpointError(
            f"{path}: already quantized ({'; '.join(why[:3])}); convert from the original bf16 checkpoint"
        )


# ---------------------------------------------------------------------------------------------------
# Which layers


def _match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(source: Source, *, keep: Sequence[str] = (), only: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(quantized, kept) layer names (full key minus `.weight`) among the 2-D float `.weight` tensors.

    Default: the architecture's block linears. `only` replaces the default with its globs; `keep`
    globs then remove layers. Globs match the full layer name or the name without a ComfyUI prefix."""
    default = FLUX2_BLOCK_LINEARS if source.architecture == "flux2" else TEXT_ENCODER_LINEARS
    quantized, kept = [], []
    for key in source.keys():
        info = source.info(key)
        if not key.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            continue
        layer = key.removesuffix(".weight")
        names = (layer, layer.removeprefix(source.prefix))
        chosen = any(_match(n, only) for n in names) if only else _match(names[1], default)
        if chosen and any(_match(n, keep) for n in names):
            chosen = False
        (quantized if chosen else kept).append(layer)
    for pattern in only:
        if not any(
            fnmatch.fnmatchcase(n, pattern) for layer in quantized for n in (layer, layer.removeprefix(source.prefix))
        ):
            raise ValueError(f"--only {pattern!r} matches no linear layer of {source.path}")
    return quantized, kept


# ---------------------------------------------------------------------------------------------------
# Planning the output


@dataclass
class OutputTensor:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source_key: str  # the source tensor it comes from
    suffix: str | None = None  # for quantized layers: the suffix after `<layer>.`

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


@dataclass
class Plan:
    tensors: list[OutputTensor]
    shards: list[list[OutputTensor]]
    file_names: list[str]
    index_name: str | None
    quantized: list[str]
    kept: list[str]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_output(
    source: Source,
    cfg: RecipeConfig,
    quantized: list[str],
    kept: list[str],
    shard_size: int | None,
    base_name: str,
    single_name: str,
) -> Plan:
    """Output tensors in source order, split into shards (a source tensor's outputs stay together);
    files `<base>-0000i-of-0000n.safetensors` + `<base>.safetensors.index.json`, or `single_name`."""
    qset = set(quantized)
    tensors: list[OutputTensor] = []
    for key in source.keys():
        info = source.info(key)
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and layer in qset:
            cfg.check_shape(key, info.shape)
            for suffix, (dt, shape) in cfg.layout(info.shape, info.dtype).items():
                tensors.append(OutputTensor(f"{layer}.{suffix}", dt, tuple(shape), key, suffix))
        else:
            tensors.append(OutputTensor(key, info.dtype, info.shape, key))
    if shard_size is None and len(source.files) > 1:
        shard_size = DEFAULT_SHARD_SIZE
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:  # tensors of one source tensor stay in one shard (they are written together)
        if shard_size and shards[-1] and size + t.nbytes > shard_size and t.suffix in (None, "weight"):
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    if n == 1:
        names, index = [single_name], None
    else:
        names = [f"{base_name}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        index = f"{base_name}.safetensors.index.json"
    return Plan(tensors, shards, names, index, quantized, kept)


# ---------------------------------------------------------------------------------------------------
# Quantizing one tensor in row chunks


def _chunks(n_rows: int, n_cols: int, multiple: int = 128) -> Iterable[tuple[int, int]]:
    rows = max(multiple, (CHUNK_ELEMENTS // max(n_cols, 1)) // multiple * multiple)
    for r0 in range(0, n_rows, rows):
        yield r0, min(n_rows, r0 + rows)


def _check_finite(key: str, w: torch.Tensor) -> None:
    if not w.dtype.is_floating_point or w.numel() == 0:
        return
    flat = w.reshape(-1)
    step = CHUNK_ELEMENTS
    for s in range(0, flat.numel(), step):
        part = flat[s : s + step]
        # max/min propagate NaN and Inf and cost a quarter of isfinite().all() on CPU
        if not torch.isfinite(F.amax(part)):
            bad = (~torch.isfinite(part)).nonzero()[:3].flatten() + s
            vals = [flat[i].item() for i in bad.tolist()]
            raise CheckpointError(
                f"tensor {key} has non-finite values (first flat indices {bad.tolist()}: {vals}); "
                "refusing to quantize a corrupt checkpoint"
            )


def quantize_streaming(cfg: RecipeConfig, key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize a whole weight chunk by chunk into preallocated outputs; checks NaN/Inf on the way.

    Equal to `recipes.quantize_layer(cfg, w)` (tests check it), with temporaries bounded by
    CHUNK_ELEMENTS instead of a few fp32 copies of the whole weight."""
    n, k = w.shape
    w_amax = None
    if cfg.needs_amax():
        w_amax = torch.zeros((), dtype=torch.float32)
        for r0, r1 in _chunks(n, k):
            part = w[r0:r1]
            _check_finite(key, part)
            w_amax = torch.maximum(w_amax, F.amax(part))
    if cfg.recipe is Recipe.NF4:
        packed = torch.empty((n * k // 2, 1), dtype=torch.uint8)
        absmax = torch.empty((n * k // F.NF4_BLOCK,), dtype=torch.float32)
        for r0, r1 in _chunks(n, k):
            part = w[r0:r1]
            _check_finite(key, part)
            p, a = F.quantize_nf4(part)
            packed[r0 * k // 2 : r1 * k // 2] = p
            absmax[r0 * k // F.NF4_BLOCK : r1 * k // F.NF4_BLOCK] = a
        return nf4_tensors(cfg, packed, absmax, (n, k), w.dtype)

    from flux2_bench.quantize.recipes import quantize_layer

    layout = cfg.layout((n, k), w.dtype)
    out: dict[str, torch.Tensor] = {}
    pos = dict.fromkeys(layout, 0)
    for r0, r1 in _chunks(n, k):
        part = w[r0:r1]
        if w_amax is None:
            _check_finite(key, part)
        stored = quantize_layer(cfg, part, w_amax)
        for suffix, t in stored.items():
            dt, shape = layout[suffix]
            if suffix not in out:
                out[suffix] = t if (shape == () or suffix == "comfy_quant") else torch.empty(shape, dtype=dt)
            if shape == () or suffix == "comfy_quant":
                continue
            # every stored tensor is row-separable: chunks are multiples of 128 rows, so block/group
            # scales and nvfp4's 128-row swizzle tiles of a chunk are a contiguous run of rows
            take = min(t.shape[0], shape[0] - pos[suffix])
            out[suffix][pos[suffix] : pos[suffix] + take] = t[:take]
            pos[suffix] += take
    return {s: out[s] for s in layout}


# ---------------------------------------------------------------------------------------------------
# Hashing and metadata


def sha256_file(path: Path, bar: tqdm | None = None, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if bar is not None:
                bar.update(n)
    return h.hexdigest()


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("flux2-bench")
    except Exception:  # not installed (running from a checkout)
        return "unknown"


def _metadata(source: Source, cfg: RecipeConfig, plan: Plan, hashes: dict[str, str]) -> dict[str, str]:
    meta = {
        "format": "pt",
        META + "format_version": FORMAT_VERSION,
        META + "recipe": cfg.name,
        META + "recipe_options": json.dumps({"comfy": cfg.comfy, "double_quant": cfg.double_quant}),
        META + "source_sha256": json.dumps(hashes),
        META + "preset": source.preset,
        META + "architecture": source.architecture,
        META + "convention": source.convention,
        META + "quantized_layers": json.dumps(plan.quantized),
        META + "kept_layers": json.dumps(plan.kept),
        META + "tool_version": tool_version(),
    }
    if cfg.comfy:
        fmt = COMFY_FP8 if cfg.recipe is Recipe.FP8_TENSOR else COMFY_NVFP4
        meta["_quantization_metadata"] = json.dumps(
            {"format_version": "1.0", "layers": {layer: dict(fmt) for layer in plan.quantized}}
        )
    return meta


def bnb_quantization_config(cfg: RecipeConfig, kept: list[str]) -> dict:
    """`quantization_config` as diffusers' BitsAndBytesConfig(load_in_4bit=True, nf4).to_dict() writes it;
    the kept linears are listed in llm_int8_skip_modules so the loader leaves them unquantized."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": kept or None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": cfg.double_quant,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


# ---------------------------------------------------------------------------------------------------
# The conversion


@dataclass
class ConvertResult:
    out: Path
    files: list[Path]
    recipe: str
    preset: str
    bytes_in: int
    bytes_out: int
    seconds: float  # whole run: hashing + converting + writing
    hash_seconds: float
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / self.seconds if self.seconds else float("inf")


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated(f"terminated by signal {signum}")


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    recipe: str | Recipe = Recipe.FP8_TENSOR,
    comfy: bool = False,
    double_quant: bool = False,
    keep: Sequence[str] = (),
    only: Sequence[str] = (),
    shard_size: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> ConvertResult:
    """Convert a checkpoint to `recipe`, streaming one tensor at a time.

    `out` is a `.safetensors` file for a single-file input (shards beside it, plus
    `<stem>.safetensors.index.json`, when `shard_size` asks for them) and a folder for a folder input.
    Everything is checked before anything is written except NaN/Inf, which is checked per tensor as
    it streams (the run then aborts and removes its temporaries)."""
    t0 = time.perf_counter()
    cfg = get_recipe(recipe, comfy=comfy, double_quant=double_quant)
    source = open_source(src)
    out = Path(out)
    folder_out = source.folder is not None
    if not folder_out and out.suffix != ".safetensors":
        raise ValueError(f"{out}: the input is a single file, so the output must be a .safetensors file")
    if folder_out and out.suffix == ".safetensors":
        raise ValueError(f"{out}: the input is a folder ({source.folder}), so the output must be a folder")
    quantized, kept = select_layers(source, keep=keep, only=only)
    if not quantized:
        raise ValueError(f"{src}: no layer selected for quantization (check --only / --keep)")
    base = source.base_name if folder_out else out.stem
    single = f"{base}.safetensors" if folder_out else out.name
    plan = plan_output(source, cfg, quantized, kept, shard_size, base, single)

    final_dir = out if folder_out else out.parent
    names = [*plan.file_names, *([plan.index_name] if plan.index_name else [])]
    if folder_out:
        if out.exists() and (out.is_file() or any(out.iterdir())) and not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    else:
        clash = [n for n in names if (final_dir / n).exists()]
        if clash and not force:
            raise FileExistsError(f"{final_dir / clash[0]} exists; pass --force to overwrite")
    free = shutil.disk_usage(_existing_ancestor(final_dir)).free
    need = plan.nbytes + 64 * 1024 * 1024
    if free < need:
        raise OSError(f"not enough free disk space at {final_dir}: need {need / 1e9:.2f} GB, have {free / 1e9:.2f} GB")

    stage = out.absolute().parent / f".{out.name}.flux2-quantize.partial"
    if stage.exists():  # left by a killed run
        shutil.rmtree(stage)
    old_term = signal.getsignal(signal.SIGTERM)
    in_main = True
    try:
        signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        in_main = False
    try:
        stage.mkdir(parents=True)
        th = time.perf_counter()
        with tqdm(total=source.nbytes, unit="B", unit_scale=True, desc="hashing source", disable=not progress) as bar:
            hashes = {f.name: sha256_file(f, bar) for f in source.files}
        hash_seconds = time.perf_counter() - th
        meta = _metadata(source, cfg, plan, hashes)
        _write(source, cfg, plan, stage, meta, progress)
        if folder_out:
            _write_configs(source, cfg, plan, stage)
        if plan.index_name:
            weight_map = {t.key: name for name, shard in zip(plan.file_names, plan.shards, strict=True) for t in shard}
            index = {"metadata": {"total_size": plan.nbytes, **meta}, "weight_map": weight_map}
            (stage / plan.index_name).write_text(json.dumps(index, indent=2))
        # publish: a folder in one rename; files one by one with the index (what makes it look complete) last
        if folder_out:
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            out.parent.mkdir(parents=True, exist_ok=True)
            os.rename(stage, out)
            files = [out / n for n in plan.file_names]
        else:
            files = []
            for n in plan.file_names:
                os.replace(stage / n, final_dir / n)
                files.append(final_dir / n)
            if plan.index_name:
                os.replace(stage / plan.index_name, final_dir / plan.index_name)
            shutil.rmtree(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
    return ConvertResult(
        out=out,
        files=files,
        recipe=cfg.name,
        preset=source.preset,
        bytes_in=source.nbytes,
        bytes_out=plan.nbytes,
        seconds=time.perf_counter() - t0,
        hash_seconds=hash_seconds,
        quantized=plan.quantized,
        kept=plan.kept,
    )


def _write(source: Source, cfg: RecipeConfig, plan: Plan, stage: Path, meta: dict[str, str], progress: bool) -> None:
    with tqdm(
        total=source.nbytes, unit="B", unit_scale=True, desc=f"converting to {cfg.name}", disable=not progress
    ) as bar:
        for name, shard in zip(plan.file_names, plan.shards, strict=True):
            layout = {t.key: (t.dtype, t.shape) for t in shard}
            with SafetensorsWriter(stage / name, layout, meta) as writer:
                i = 0
                while i < len(shard):
                    t = shard[i]
                    w = source.readers[t.source_key].read(t.source_key)
                    if t.suffix is None:
                        _check_finite(t.key, w)
                        writer.write(t.key, w)
                        i += 1
                    else:
                        stored = quantize_streaming(cfg, t.source_key, w)
                        layer = t.source_key.removesuffix(".weight")
                        for suffix, tensor in stored.items():
                            writer.write(f"{layer}.{suffix}", tensor)
                        i += len(stored)
                        del stored
                    bar.update(source.info(t.source_key).nbytes)
                    del w


def _write_configs(source: Source, cfg: RecipeConfig, plan: Plan, stage: Path) -> None:
    folder = source.folder
    assert folder is not None
    for name in ("config.json", "generation_config.json"):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, stage / name)
    if cfg.recipe is Recipe.NF4 and (stage / "config.json").is_file():
        config = json.loads((stage / "config.json").read_text())
        config["quantization_config"] = bnb_quantization_config(cfg, plan.kept)
        (stage / "config.json").write_text(json.dumps(config, indent=2))


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5G', '123' (bytes) -> bytes (decimal units, as safetensors sharding uses)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))
