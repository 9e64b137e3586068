"""Loading, saving and synthesizing FLUX.2 transformer weights.

One loader for every layout a user has: the official BFL single file (with or without the ComfyUI
`model.diffusion_model.` prefix), a diffusers `transformer/` folder or file (q/k/v unfused, final
shift/scale swapped) and sharded safetensors with an `*.index.json`. It plans the whole load from the
headers first (so every missing key, unexpected key, shape and dtype problem is reported in one error
before a byte of weights is read), then streams tensor by tensor into a model allocated on the target
device: host memory holds one tensor (plus its dtype conversion) at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from flux2_bench.model import PRESETS, Flux2, Flux2Config, get_preset
from flux2_bench.safetensors_io import (
    CheckpointError,
    SafetensorsReader,
    refuse_pickle,
    save_streaming,
)

COMFY_PREFIX = "model.diffusion_model."
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------
# Key conventions


@dataclass(frozen=True)
class Piece:
    """Rows [dst0, dst1) of a BFL parameter come from rows [src0, src1) of a source tensor."""

    key: str
    dst: tuple[int, int] | None = None  # None: the whole tensor
    src: tuple[int, int] | None = None


def diffusers_pieces(cfg: Flux2Config) -> dict[str, list[Piece]]:
    """For every BFL parameter, where it lives in a diffusers `Flux2Transformer2DModel` state dict."""
    h = cfg.hidden_size
    plan: dict[str, list[Piece]] = {
        "img_in.weight": [Piece("x_embedder.weight")],
        "txt_in.weight": [Piece("context_embedder.weight")],
        "time_in.in_layer.weight": [Piece("time_guidance_embed.timestep_embedder.linear_1.weight")],
        "time_in.out_layer.weight": [Piece("time_guidance_embed.timestep_embedder.linear_2.weight")],
        "double_stream_modulation_img.lin.weight": [Piece("double_stream_modulation_img.linear.weight")],
        "double_stream_modulation_txt.lin.weight": [Piece("double_stream_modulation_txt.linear.weight")],
        "single_stream_modulation.lin.weight": [Piece("single_stream_modulation.linear.weight")],
        # BFL stores (shift, scale), diffusers (scale, shift)
        "final_layer.adaLN_modulation.1.weight": [
            Piece("norm_out.linear.weight", (0, h), (h, 2 * h)),
            Piece("norm_out.linear.weight", (h, 2 * h), (0, h)),
        ],
        "final_layer.linear.weight": [Piece("proj_out.weight")],
    }
    if cfg.use_guidance_embed:
        plan["guidance_in.in_layer.weight"] = [Piece("time_guidance_embed.guidance_embedder.linear_1.weight")]
        plan["guidance_in.out_layer.weight"] = [Piece("time_guidance_embed.guidance_embedder.linear_2.weight")]
    for i in range(cfg.depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for stream, qkv, norm_q, norm_k, proj, ff in (
            ("img", ("to_q", "to_k", "to_v"), "norm_q", "norm_k", "to_out.0", "ff"),
            (
                "txt",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                "norm_added_q",
                "norm_added_k",
                "to_add_out",
                "ff_context",
            ),
        ):
            plan[f"{b}{stream}_attn.qkv.weight"] = [
                Piece(f"{d}attn.{name}.weight", (j * h, (j + 1) * h)) for j, name in enumerate(qkv)
            ]
            plan[f"{b}{stream}_attn.norm.query_norm.scale"] = [Piece(f"{d}attn.{norm_q}.weight")]
            plan[f"{b}{stream}_attn.norm.key_norm.scale"] = [Piece(f"{d}attn.{norm_k}.weight")]
            plan[f"{b}{stream}_attn.proj.weight"] = [Piece(f"{d}attn.{proj}.weight")]
            plan[f"{b}{stream}_mlp.0.weight"] = [Piece(f"{d}{ff}.linear_in.weight")]
            plan[f"{b}{stream}_mlp.2.weight"] = [Piece(f"{d}{ff}.linear_out.weight")]
    for i in range(cfg.depth_single_blocks):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.attn."
        plan[f"{b}linear1.weight"] = [Piece(f"{d}to_qkv_mlp_proj.weight")]
        plan[f"{b}linear2.weight"] = [Piece(f"{d}to_out.weight")]
        plan[f"{b}norm.query_norm.scale"] = [Piece(f"{d}norm_q.weight")]
        plan[f"{b}norm.key_norm.scale"] = [Piece(f"{d}norm_k.weight")]
    return plan


def diffusers_config(cfg: Flux2Config) -> dict:
    """The `config.json` that diffusers' `Flux2Transformer2DModel.from_pretrained` reads."""
    return {
        "_class_name": "Flux2Transformer2DModel",
        "_diffusers_version": "0.42.1",
        "patch_size": 1,
        "in_channels": cfg.in_channels,
        "out_channels": None,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "attention_head_dim": cfg.head_dim,
        "num_attention_heads": cfg.num_heads,
        "joint_attention_dim": cfg.context_in_dim,
        "timestep_guidance_channels": 256,
        "mlp_ratio": cfg.mlp_ratio,
        "axes_dims_rope": list(cfg.axes_dim),
        "rope_theta": cfg.theta,
        "eps": 1e-6,
        "guidance_embeds": cfg.use_guidance_embed,
    }


# ---------------------------------------------------------------------------------------------------
# Finding the files


@dataclass
class Checkpoint:
    """The tensors of a checkpoint across its files, by key, plus what its folder says about it."""

    files: list[Path]
    readers: dict[str, SafetensorsReader]  # key -> reader holding it
    convention: str  # "bfl" | "diffusers"
    prefix: str  # stripped from every key ("" or COMFY_PREFIX)
    diffusers_cfg: dict | None = None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.readers[self.prefix + key].tensors[self.prefix + key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.readers[self.prefix + key].tensors[self.prefix + key].dtype

    def read(self, key: str) -> torch.Tensor:
        return self.readers[self.prefix + key].read(self.prefix + key)

    def keys(self) -> list[str]:
        return [k[len(self.prefix) :] for k in self.readers]

    @property
    def metadata(self) -> dict[str, str]:
        return next(iter(self.readers.values())).metadata if self.readers else {}


def _files_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index_path.parent / n).is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: shards listed in the index are missing: {missing}")
    return [index_path.parent / n for n in names]


def resolve_files(path: str | os.PathLike) -> tuple[list[Path], dict | None]:
    """The safetensors files of a checkpoint path, and a diffusers config.json if one sits beside them."""
    path = Path(path)
    refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.name.endswith(".index.json"):
            files, folder = _files_from_index(path), path.parent
        elif path.suffix == ".safetensors":
            files, folder = [path], None
        else:
            raise CheckpointError(
                f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors, a "
                "*.safetensors.index.json, or a folder holding them"
            )
    else:
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            files = _files_from_index(indexes[0])
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in (".bin", ".pt", ".ckpt", ".pth")]
            why = f" (found pickle files {pickles}: only safetensors are read)" if pickles else ""
            raise CheckpointError(f"{folder}: no .safetensors files{why}")
    cfg = None
    if folder is not None and (folder / "config.json").is_file():
        cfg = json.loads((folder / "config.json").read_text())
    return files, cfg


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    files, dcfg = resolve_files(path)
    readers: dict[str, SafetensorsReader] = {}
    for f in files:
        r = SafetensorsReader(f)
        for k in r.keys():
            if k in readers:
                raise CheckpointError(f"key {k!r} appears in both {readers[k].path} and {f}")
            readers[k] = r
    keys = list(readers)
    prefix = COMFY_PREFIX if keys and all(k.startswith(COMFY_PREFIX) for k in keys) else ""
    stripped = {k[len(prefix) :] for k in keys}
    if "x_embedder.weight" in stripped or "context_embedder.weight" in stripped:
        convention = "diffusers"
    elif "img_in.weight" in stripped or "txt_in.weight" in stripped:
        convention = "bfl"
    else:
        sample = sorted(stripped)[:5]
        raise CheckpointError(
            f"{path}: unknown architecture: no FLUX.2 transformer keys (img_in.weight or x_embedder.weight); "
            f"first keys: {sample}"
        )
    return Checkpoint(files, readers, convention, prefix, dcfg)


# ---------------------------------------------------------------------------------------------------
# Inferring the config


def _count_blocks(keys: list[str], prefix: str) -> int:
    idx = {int(k[len(prefix) :].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0


def logical_shape(ckpt: Checkpoint, key: str) -> tuple[int, ...]:
    """The (out, in) shape of a linear weight, also when it is stored packed at 4 bits."""
    layer = key.removesuffix(".weight")
    state = f"{layer}.weight.quant_state.bitsandbytes__nf4"
    if state in ckpt.keys():
        return tuple(json.loads(bytes(ckpt.read(state).tolist()).decode())["shape"])
    shape = tuple(ckpt.shape(key))
    if ckpt.dtype(key) == torch.uint8 and f"{layer}.weight_scale" in ckpt.keys():
        return (shape[0], 2 * shape[1])  # two 4-bit codes per byte
    return shape


def infer_config(ckpt: Checkpoint) -> Flux2Config:
    """A config from tensor shapes; a preset when the shapes match one, else a custom config."""
    keys = ckpt.keys()
    if ckpt.convention == "bfl":
        names = {
            "img_in": "img_in.weight",
            "txt_in": "txt_in.weight",
            "norm": "double_blocks.0.img_attn.norm.query_norm.scale",
            "single_norm": "single_blocks.0.norm.query_norm.scale",
            "mlp_out": "double_blocks.0.img_mlp.2.weight",
            "linear2": "single_blocks.0.linear2.weight",
        }
        depth, single = _count_blocks(keys, "double_blocks."), _count_blocks(keys, "single_blocks.")
        guidance = "guidance_in.in_layer.weight" in keys
    else:
        names = {
            "img_in": "x_embedder.weight",
            "txt_in": "context_embedder.weight",
            "norm": "transformer_blocks.0.attn.norm_q.weight",
            "single_norm": "single_transformer_blocks.0.attn.norm_q.weight",
            "mlp_out": "transformer_blocks.0.ff.linear_out.weight",
            "linear2": "single_transformer_blocks.0.attn.to_out.weight",
        }
        depth, single = (
            _count_blocks(keys, "transformer_blocks."),
            _count_blocks(keys, "single_transformer_blocks."),
        )
        guidance = "time_guidance_embed.guidance_embedder.linear_1.weight" in keys
    present = set(keys)
    if names["img_in"] not in present or names["txt_in"] not in present:
        raise CheckpointError(f"cannot infer the architecture: {names['img_in']} or {names['txt_in']} missing")
    hidden, in_channels = ckpt.shape(names["img_in"])
    context = ckpt.shape(names["txt_in"])[1]
    norm_key = names["norm"] if names["norm"] in present else names["single_norm"]
    if norm_key not in present:
        raise CheckpointError(f"cannot infer the head dim: {names['norm']} missing")
    head_dim = ckpt.shape(norm_key)[0]
    if names["mlp_out"] in present:
        mlp_hidden = logical_shape(ckpt, names["mlp_out"])[1]
    elif names["linear2"] in present:
        mlp_hidden = logical_shape(ckpt, names["linear2"])[1] - hidden
    else:
        raise CheckpointError("cannot infer the MLP width: no double-block MLP or single-block linear2")
    dc = ckpt.diffusers_cfg or {}
    axes = tuple(dc.get("axes_dims_rope") or ((32, 32, 32, 32) if head_dim == 128 else (head_dim // 4,) * 4))
    shape_fields = dict(
        in_channels=in_channels,
        context_in_dim=context,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        mlp_ratio=mlp_hidden / hidden,
        axes_dim=axes,
        theta=int(dc.get("rope_theta", 2000)),
        use_guidance_embed=guidance,
    )
    for preset in PRESETS.values():
        if all(getattr(preset, k) == v for k, v in shape_fields.items()):
            return preset
    return Flux2Config(**shape_fields)


def preset_name(cfg: Flux2Config) -> str:
    for name, p in PRESETS.items():
        if p == cfg:
            return name
    return "custom"


def _architecture_diff(a: Flux2Config, b: Flux2Config) -> list[str]:
    skip = {"default_steps", "default_guidance", "text_layers"}
    return [
        f"{f.name}: {getattr(a, f.name)} vs {getattr(b, f.name)}"
        for f in fields(Flux2Config)
        if f.name not in skip and getattr(a, f.name) != getattr(b, f.name)
    ]


# ---------------------------------------------------------------------------------------------------
# Loading


def _plan(
    ckpt: Checkpoint,
    cfg: Flux2Config,
    model_shapes: dict[str, tuple[int, ...]],
    quantized: dict[str, QuantSource] | None = None,
) -> dict[str, list[Piece]]:
    """Map every plain model parameter to its source pieces, or raise listing every problem at once.

    `quantized` layers (loaded into QuantLinear from their stored tensors) claim their keys."""
    quantized = quantized or {}
    if ckpt.convention == "bfl":
        plan = {name: [Piece(name)] for name in model_shapes}
    else:
        plan = diffusers_pieces(cfg)
    problems: list[str] = []
    present = set(ckpt.keys())
    used: set[str] = set()
    for q in quantized.values():
        used.update(q.keys)
        problems += q.problems
    for name, shape in model_shapes.items():
        if name.removesuffix(".weight") in quantized:
            continue
        pieces = plan.get(name)
        if pieces is None:
            problems.append(f"no mapping for model parameter {name}")
            continue
        for p in pieces:
            used.add(p.key)
            if p.key not in present:
                problems.append(f"missing key: {p.key}" + (f" (for {name})" if p.key != name else ""))
                continue
            src_shape = tuple(ckpt.shape(p.key))
            # a split piece (fused q/k/v) is a slab of the parameter; a row-swapped piece reads the
            # whole source tensor, which has the parameter's shape
            want = (p.dst[1] - p.dst[0], *shape[1:]) if p.dst and not p.src else tuple(shape)
            if src_shape != want:
                problems.append(f"shape mismatch: {p.key} is {list(src_shape)}, expected {list(want)}")
            dt = ckpt.dtype(p.key)
            if dt not in FLOAT_DTYPES:
                problems.append(
                    f"dtype mismatch: {p.key} is {dt}, expected a float (bf16/fp16/fp32); "
                    "quantized files load through their recipe"
                )
    unexpected = sorted(present - used)
    problems += [f"unexpected key: {k}" for k in unexpected]
    if problems:
        head = f"cannot load {len(ckpt.files)} file(s) {[str(f) for f in ckpt.files][:3]} as {preset_name(cfg)}"
        raise CheckpointError(head + f": {len(problems)} problem(s)\n  " + "\n  ".join(problems))
    return {n: plan[n] for n in model_shapes if n.removesuffix(".weight") not in quantized}


# ---------------------------------------------------------------------------------------------------
# Quantized checkpoints: this project's flux2-quantize files, ComfyUI fp8 / nvfp4 files and diffusers
# bitsandbytes-NF4 folders. Each quantized layer goes into a QuantLinear straight from its stored
# tensors; no bf16 copy of it is ever made.

# stored next to a quantized weight, not needed by the runtime: ComfyUI's per-layer format marker and
# its static activation scale (the FP8 kernels scale activations dynamically, per row or per tensor)
_IGNORED_SUFFIXES = ("comfy_quant", "input_scale", "scale_input")


@dataclass
class QuantSource:
    """Where one BFL layer's quantized tensors are: one source layer, or q/k/v rows of a fused one."""

    recipe: object  # quantize.recipes.Recipe
    sources: list[tuple[str, tuple[int, int] | None]]  # (source layer name, rows of the BFL weight)
    keys: list[str]
    problems: list[str]


def _stored(ckpt: Checkpoint, layer: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    prefix = layer + "."
    return {k[len(prefix) :]: (ckpt.dtype(k), tuple(ckpt.shape(k))) for k in ckpt.keys() if k.startswith(prefix)}


def quantized_layers(ckpt: Checkpoint, cfg: Flux2Config) -> dict[str, QuantSource]:
    """BFL layer name -> where its quantized tensors are, for every linear stored quantized."""
    from flux2_bench.quantize.linear import detect_recipe
    from flux2_bench.quantize.recipes import Recipe

    with torch.device("meta"):
        linears = {n: m.weight.shape for n, m in Flux2(cfg).named_modules() if isinstance(m, nn.Linear)}
    pieces = diffusers_pieces(cfg) if ckpt.convention == "diffusers" else {}
    present = set(ckpt.keys())
    out: dict[str, QuantSource] = {}
    for layer in linears:
        if ckpt.convention == "bfl":
            sources = [(layer, None)]
        else:
            sources = [(p.key.removesuffix(".weight"), p.dst) for p in pieces[f"{layer}.weight"]]
            if any(p.src for p in pieces[f"{layer}.weight"]):
                sources = sources[:1]  # row-swapped (final layer): quantized only if whole
        recipes, keys, problems = set(), [], []
        for src, _ in sources:
            if f"{src}.weight" not in present:
                continue
            stored = _stored(ckpt, src)
            try:
                r = detect_recipe(stored)
            except ValueError as e:
                problems.append(f"{src}: {e}")
                continue
            if r is not None:
                recipes.add(r)
                keys += [f"{src}.{sfx}" for sfx in stored]
        if not recipes:
            continue
        recipe = recipes.pop()
        if recipes:
            problems.append(f"{layer}: its pieces are stored in different recipes {sorted([recipe, *recipes])}")
        if len(sources) > 1 and recipe is Recipe.FP8_TENSOR:
            recipe = Recipe.FP8_ROW  # q, k and v carry one scalar scale each: fused, they are per-row
        if any(p.src for p in pieces.get(f"{layer}.weight", [])):
            problems.append(f"{layer}: a quantized final-layer modulation cannot be un-swapped; keep it bf16")
        out[layer] = QuantSource(recipe, sources, keys, problems)
    return out


def _check_recipe_metadata(ckpt: Checkpoint, quantized: dict[str, QuantSource], path) -> None:
    """A file that names its recipe must hold exactly that recipe: refuse a mismatch naming both."""
    from flux2_bench.quantize.recipes import Recipe

    declared = ckpt.metadata.get("flux2_bench.recipe")
    if declared is None:
        return
    found = {str(q.recipe) for q in quantized.values()}
    allowed = {declared} | ({str(Recipe.FP8_ROW)} if declared == Recipe.FP8_TENSOR else set())
    if not quantized or not found <= allowed:
        raise CheckpointError(
            f"{path}: its metadata says recipe {declared!r}, but its tensors are "
            + (f"{sorted(found)}" if found else "not quantized")
        )


def _read_quantized(ckpt: Checkpoint, layer: str, q: QuantSource, n: int, k: int, device) -> dict[str, torch.Tensor]:
    """The runtime tensors of one quantized layer, fused from its sources where diffusers split it."""
    from flux2_bench.quantize.linear import to_runtime
    from flux2_bench.quantize.recipes import Recipe

    parts = []
    for src, rows in q.sources:
        stored = {k_[len(src) + 1 :]: ckpt.read(k_).to(device) for k_ in q.keys if k_.startswith(src + ".")}
        stored = {s: t for s, t in stored.items() if s not in _IGNORED_SUFFIXES}
        n_src = rows[1] - rows[0] if rows else n
        src_recipe = (
            Recipe.FP8_TENSOR if (q.recipe is Recipe.FP8_ROW and stored["weight_scale"].numel() == 1) else q.recipe
        )
        rt = to_runtime(src_recipe, stored, n_src, k)
        if src_recipe is not q.recipe:  # scalar -> per-row scale for a fused fp8-tensor layer
            rt["weight_scale"] = rt["weight_scale"].reshape(1, 1).expand(n_src, 1)
        parts.append(rt)
    if len(parts) == 1:
        return parts[0]
    fused = {}
    for name in parts[0]:
        if name in ("code", "weight_scale_2"):
            if not all(torch.equal(p[name], parts[0][name]) for p in parts):
                raise CheckpointError(f"{layer}: its q/k/v pieces disagree on {name}; cannot fuse them")
            fused[name] = parts[0][name]
        else:
            fused[name] = torch.cat([p[name] for p in parts], dim=0)
    return fused


def empty_transformer(cfg: Flux2Config, *, device, dtype) -> Flux2:
    """Allocate a model on `device` in `dtype` without initializing (and without an fp32 copy)."""
    with torch.device("meta"):
        model = Flux2(cfg)
    return model.to(dtype=dtype).to_empty(device=device).eval()


def load_transformer(
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    recipe: str | None = None,
    progress: bool = True,
) -> Flux2:
    """Load a FLUX.2 transformer from a BFL single file, a diffusers folder/file or sharded safetensors.

    Strict: every missing or unexpected key and every shape or dtype mismatch is listed in one
    `CheckpointError` before anything is read. Streams tensor by tensor onto `device`.

    Quantized files (flux2-quantize output, ComfyUI fp8 / nvfp4, diffusers bitsandbytes-NF4) load
    their quantized linears into `QuantLinear`s straight from the stored tensors. `recipe=` quantizes
    the block linears of a bf16 checkpoint while loading, layer by layer, so the whole model never
    exists in bf16 on the device (the 64 GB FLUX.2-dev fits a 40 GB-class GPU as fp8).
    """
    from flux2_bench.quantize.linear import QuantLinear, is_block_linear, replace_module
    from flux2_bench.quantize.recipes import Recipe, get_recipe, quantize_layer

    ckpt = open_checkpoint(path)
    inferred = infer_config(ckpt)
    if preset is not None:
        cfg = get_preset(preset)
        diff = _architecture_diff(cfg, inferred)
        if diff:
            raise CheckpointError(
                f"{path}: the checkpoint is not {preset!r} (its shapes say {preset_name(inferred)}): " + "; ".join(diff)
            )
    else:
        cfg = inferred
    quantized = quantized_layers(ckpt, cfg)
    _check_recipe_metadata(ckpt, quantized, path)
    if recipe is not None and quantized:
        some = next(iter(quantized.values())).recipe
        raise CheckpointError(
            f"{path}: already quantized ({some}); recipe={recipe!r} quantizes bf16 checkpoints on load"
        )
    with torch.device("meta"):
        model = Flux2(cfg).to(dtype)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    plan = _plan(ckpt, cfg, shapes, quantized)

    on_load = {}
    if recipe is not None:
        on_load = {
            name: get_recipe(recipe) for name in (n.removesuffix(".weight") for n in plan) if is_block_linear(name)
        }
    with torch.device("meta"):
        for layer in [*quantized, *on_load]:
            n, k = shapes[f"{layer}.weight"]
            r = quantized[layer].recipe if layer in quantized else Recipe(recipe)
            replace_module(model, layer, QuantLinear(k, n, r))
    model = model.to_empty(device=device).eval()
    params = dict(model.named_parameters())

    total = sum(
        ckpt.readers[ckpt.prefix + p.key].tensors[ckpt.prefix + p.key].nbytes for ps in plan.values() for p in ps
    )
    total += sum(
        ckpt.readers[ckpt.prefix + k].tensors[ckpt.prefix + k].nbytes for q in quantized.values() for k in q.keys
    )
    with (
        torch.no_grad(),
        tqdm(total=total, unit="B", unit_scale=True, desc="loading transformer", disable=not progress) as bar,
    ):
        for layer, q in quantized.items():
            module = model.get_submodule(layer)
            module.load_runtime(_read_quantized(ckpt, layer, q, module.out_features, module.in_features, device))
            bar.update(sum(ckpt.readers[ckpt.prefix + k].tensors[ckpt.prefix + k].nbytes for k in q.keys))
        for name, pieces in plan.items():
            layer = name.removesuffix(".weight")
            if layer in on_load:
                dst = torch.empty(shapes[name], dtype=dtype, device=device)
            else:
                dst = params[name]
            _copy_pieces(ckpt, pieces, dst, bar)
            if layer in on_load:
                model.get_submodule(layer).load_stored(quantize_layer(on_load[layer], dst))
                del dst
    return model


def _copy_pieces(ckpt: Checkpoint, pieces: list[Piece], dst: torch.Tensor, bar) -> None:
    cache: dict[str, torch.Tensor] = {}  # a source tensor split over two pieces is read once
    for p in pieces:
        src = cache.pop(p.key, None)
        if src is None:
            src = ckpt.read(p.key)
            bar.update(src.numel() * src.element_size())
            if sum(q.key == p.key for q in pieces) > 1:
                cache[p.key] = src
        part = src[p.src[0] : p.src[1]] if p.src else src
        target = dst[p.dst[0] : p.dst[1]] if p.dst else dst
        target.copy_(part)


# ---------------------------------------------------------------------------------------------------
# Saving


def transformer_state(model: Flux2, layout: str = "bfl") -> dict[str, torch.Tensor]:
    """The model's tensors under BFL or diffusers keys (views where possible, no copies of the model)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "bfl":
        return state
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; valid: 'bfl', 'diffusers'")
    out: dict[str, torch.Tensor] = {}
    for name, pieces in diffusers_pieces(model.config).items():
        t = state[name]
        if len(pieces) == 1:
            out[pieces[0].key] = t
        elif all(p.src is None for p in pieces):  # fused q/k/v -> three tensors
            for p in pieces:
                out[p.key] = t[p.dst[0] : p.dst[1]]
        else:  # final layer: one tensor with its row blocks swapped
            out[pieces[0].key] = torch.cat([t[p.dst[0] : p.dst[1]] for p in sorted(pieces, key=lambda p: p.src)])
    return out


def save_transformer(
    model: Flux2, path: str | os.PathLike, layout: str = "bfl", metadata: dict[str, str] | None = None
) -> Path:
    """Save as an official BFL single file or a diffusers `transformer/` folder (file + config.json).

    `layout="diffusers"` with a path ending in `.safetensors` writes only the weights file; otherwise
    `path` is the folder and receives `diffusion_pytorch_model.safetensors` and `config.json`.
    """
    path = Path(path)
    tensors = transformer_state(model, layout)
    meta = {"format": "pt", "flux2_bench.preset": preset_name(model.config), **(metadata or {})}
    if layout == "bfl" or path.suffix == ".safetensors":
        save_streaming(path, tensors, meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    save_streaming(path / "diffusion_pytorch_model.safetensors", tensors, meta)
    (path / "config.json").write_text(json.dumps(diffusers_config(model.config), indent=2))
    return path


# ---------------------------------------------------------------------------------------------------
# Synthetic weights


def _param_std(name: str, shape: tuple[int, ...]) -> float:
    """Per-parameter scale for random weights that keep activations finite through all blocks.

    Linear weights get std 1/sqrt(fan_in), so each linear preserves the activation RMS. The three
    modulation linears are scaled by 0.1 more: their gates multiply every residual update, and
    small gates (about 0.1 x) keep the residual stream's growth over 56 blocks near-linear instead of
    exponential.
    """
    if name.endswith(".scale"):
        return 0.0  # RMSNorm scales: 1 + small noise (see synthetic_transformer)
    fan_in = shape[1]
    std = fan_in**-0.5
    if "modulation" in name:
        std *= 0.1
    return std


def synthetic_transformer(
    preset: str | Flux2Config,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    recipe: str | None = None,
) -> Flux2:
    """Random weights of the exact shapes, drawn directly on `device` in `dtype` (no fp32 copy, ever).

    Deterministic per (seed, parameter name, device type): each parameter has its own generator
    seeded from the seed and its index, so the result does not depend on allocation order.
    With `recipe`, the block linears are QuantLinears: each random bf16 weight is drawn, quantized
    and freed in turn, so the bf16 model never exists (equal to `swap_linears` on the bf16 model).
    """
    from flux2_bench.quantize.linear import QuantLinear, is_block_linear, replace_module
    from flux2_bench.quantize.recipes import get_recipe, quantize_layer

    cfg = get_preset(preset) if isinstance(preset, str) else preset
    with torch.device("meta"):
        model = Flux2(cfg).to(dtype)
        params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
        quantized = set()
        if recipe is not None:
            for name, shape in params:
                layer = name.removesuffix(".weight")
                if is_block_linear(layer):
                    replace_module(model, layer, QuantLinear(shape[1], shape[0], recipe))
                    quantized.add(layer)
    model = model.to_empty(device=device).eval()
    dev = torch.device(device)
    live = dict(model.named_parameters())
    with torch.no_grad():
        for i, (name, shape) in enumerate(params):
            layer = name.removesuffix(".weight")
            p = torch.empty(shape, dtype=dtype, device=dev) if layer in quantized else live[name]
            g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
            torch.randn(shape, generator=g, device=dev, dtype=dtype, out=p.data)
            std = _param_std(name, shape)
            if std == 0.0:
                p.mul_(0.05).add_(1.0)
            else:
                p.mul_(std)
            if layer in quantized:
                model.get_submodule(layer).load_stored(quantize_layer(get_recipe(recipe), p))
                del p
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of weights, quantized buffers included."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
