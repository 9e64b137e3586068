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
        mlp_hidden = ckpt.shape(names["mlp_out"])[1]
    elif names["linear2"] in present:
        mlp_hidden = ckpt.shape(names["linear2"])[1] - hidden
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


def _plan(ckpt: Checkpoint, cfg: Flux2Config, model_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[Piece]]:
    """Map every model parameter to its source pieces, or raise listing every problem at once."""
    if ckpt.convention == "bfl":
        plan = {name: [Piece(name)] for name in model_shapes}
    else:
        plan = diffusers_pieces(cfg)
    problems: list[str] = []
    present = set(ckpt.keys())
    used: set[str] = set()
    for name, shape in model_shapes.items():
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
    return plan


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
    progress: bool = True,
) -> Flux2:
    """Load a FLUX.2 transformer from a BFL single file, a diffusers folder/file or sharded safetensors.

    Strict: every missing or unexpected key and every shape or dtype mismatch is listed in one
    `CheckpointError` before anything is read. Streams tensor by tensor onto `device`.
    """
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
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Flux2(cfg).named_parameters()}
    plan = _plan(ckpt, cfg, shapes)

    model = empty_transformer(cfg, device=device, dtype=dtype)
    params = dict(model.named_parameters())
    total = sum(
        ckpt.readers[ckpt.prefix + p.key].tensors[ckpt.prefix + p.key].nbytes for ps in plan.values() for p in ps
    )
    cache: dict[str, torch.Tensor] = {}  # a source tensor split over two pieces is read once
    with (
        torch.no_grad(),
        tqdm(total=total, unit="B", unit_scale=True, desc="loading transformer", disable=not progress) as bar,
    ):
        for name, pieces in plan.items():
            dst = params[name]
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
                del src, part
            cache.clear()
    return model


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
) -> Flux2:
    """Random weights of the exact shapes, drawn directly on `device` in `dtype` (no fp32 copy, ever).

    Deterministic per (seed, parameter name, device type): each parameter has its own generator
    seeded from the seed and its index, so the result does not depend on allocation order.
    """
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    model = empty_transformer(cfg, device=device, dtype=dtype)
    dev = torch.device(device)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
            torch.randn(p.shape, generator=g, device=dev, dtype=dtype, out=p.data)
            std = _param_std(name, tuple(p.shape))
            if std == 0.0:
                p.mul_(0.05).add_(1.0)
            else:
                p.mul_(std)
    return model


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
