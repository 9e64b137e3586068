"""The FLUX.2 autoencoder (spec §4), official BFL parameter names, plus tiled encode/decode.

Encode: image in [-1, 1] → Encoder (+ quant_conv) → mean half of the moments → 2×2 patchify
(channel = c·4 + pi·2 + pj) → BatchNorm with the stored running stats (eps 1e-4) → (B, 4·z, H/16, W/16).
Decode is the exact inverse. `ae.safetensors` loads without renaming; a diffusers `vae/` folder
(`AutoencoderKLFlux2`) loads through one key map (`diffusers_key`).

Tiling: the image (or latent) is cut into overlapping tiles, each tile runs through the network on
its own, and tiles are merged by a weighted average whose weights ramp linearly across every
interior overlap, so there is no hard seam. Memory then scales with the tile, not the image.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2_bench.safetensors_io import CheckpointError, SafetensorsReader


@dataclass(frozen=True)
class AutoEncoderConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    patch: int = 2
    bn_eps: float = 1e-4

    @property
    def downsample(self) -> int:
        """Pixels per latent pixel (8 for FLUX.2)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def token_size(self) -> int:
        """Pixels per transformer token side (16 for FLUX.2)."""
        return self.downsample * self.patch

    @property
    def latent_channels(self) -> int:
        """Channels of the patchified, normalized latent (= transformer in_channels)."""
        return self.z_channels * self.patch * self.patch


AE_PRESETS: dict[str, AutoEncoderConfig] = {
    "flux.2": AutoEncoderConfig(),
    # Same as environment.md's tiny AutoencoderKLFlux2: block_out_channels=(32, 64), layers_per_block=1,
    # latent_channels=8, norm_num_groups=32, patch 2x2 -> 32 token channels = tiny transformer in_channels.
    "tiny": AutoEncoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8),
}


def get_ae_preset(name: str) -> AutoEncoderConfig:
    if name not in AE_PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; valid: {', '.join(AE_PRESETS)}")
    return AE_PRESETS[name]


# ---------------------------------------------------------------------------------------------------
# Modules (BFL names)


def _norm(cfg_groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = _norm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, 1×1 conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(groups, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, then stride-2 conv without padding


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, cfg.ch * mult, g))
                block_in = cfg.ch * mult
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _mid(block_in, g)
        self.norm_out = _norm(g, block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels, 3, 1, 1)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.quant_conv(self.conv_out(F.silu(self.norm_out(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoEncoderConfig):
        super().__init__()
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = _mid(block_in, g)
        up: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, cfg.ch * cfg.ch_mult[i], g))
                block_in = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)  # up[0] is the full-resolution level, run last
        self.norm_out = _norm(g, block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(self.post_quant_conv(z))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def patchify(z: Tensor, p: int = 2) -> Tensor:
    """(B, C, H, W) → (B, C·p·p, H/p, W/p), channel index c·p² + pi·p + pj."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: Tensor, p: int = 2) -> Tensor:
    b, c, h, w = z.shape
    z = z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (p * p), h * p, w * p)


def _tile_starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Tile origins covering [0, size): stride tile-overlap, the last tile flush with the end."""
    if size <= tile:
        return [0]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # size and tile are multiples of `align`, so this one is too
    return starts


def _ramp(n: int, lo_ramp: int, hi_ramp: int, device, dtype) -> Tensor:
    """1-D blend weight of length n: rises linearly over the first lo_ramp, falls over the last hi_ramp."""
    w = torch.ones(n, device=device, dtype=dtype)
    if lo_ramp:
        w[:lo_ramp] = (torch.arange(lo_ramp, device=device, dtype=dtype) + 0.5) / lo_ramp
    if hi_ramp:
        w[n - hi_ramp :] = torch.minimum(
            w[n - hi_ramp :], (torch.arange(hi_ramp, 0, -1, device=device, dtype=dtype) - 0.5) / hi_ramp
        )
    return w


def _tiled(fn, x: Tensor, tile: int, overlap: int, align: int, scale: float, out_channels: int) -> Tensor:
    """Run `fn` on overlapping tiles of x (B, C, H, W) and blend; fn maps a tile of side s to side s·scale.

    Each output tile is weighted by the product of two linear ramps that span its overlap with the
    neighbours (weight → 0 at the tile's interior edges), and the sum is divided by the summed weights,
    so any arrangement of overlaps blends to a partition of unity.
    """
    b, _, hgt, wid = x.shape
    rows = _tile_starts(hgt, tile, overlap, align)
    cols = _tile_starts(wid, tile, overlap, align)
    out_h, out_w = round(hgt * scale), round(wid * scale)
    out = weight = None
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            y = fn(x[:, :, r : r + tile, c : c + tile]).float()
            if out is None:
                out = torch.zeros(b, out_channels, out_h, out_w, device=y.device)
                weight = torch.zeros(1, 1, out_h, out_w, device=y.device)
            th, tw = y.shape[-2:]
            r0, c0 = round(r * scale), round(c * scale)
            # ramp length = the actual overlap with the previous/next tile, in output pixels
            up = round((rows[i - 1] + tile - r) * scale) if i else 0
            down = round((r + tile - rows[i + 1]) * scale) if i + 1 < len(rows) else 0
            left = round((cols[j - 1] + tile - c) * scale) if j else 0
            right = round((c + tile - cols[j + 1]) * scale) if j + 1 < len(cols) else 0
            wv = _ramp(th, up, down, y.device, torch.float32)
            wh = _ramp(tw, left, right, y.device, torch.float32)
            w2 = (wv[:, None] * wh[None, :])[None, None]
            out[:, :, r0 : r0 + th, c0 : c0 + tw] += y * w2
            weight[:, :, r0 : r0 + th, c0 : c0 + tw] += w2
            del y
    return (out / weight).to(x.dtype)


class AutoEncoder(nn.Module):
    """FLUX.2 VAE with BFL names: `encoder.*`, `decoder.*`, `bn.running_mean/var`."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.bn = nn.BatchNorm2d(config.latent_channels, eps=config.bn_eps, affine=False, momentum=0.1)

    # The BN statistics are applied by hand (not self.bn(...)) so the module never updates them,
    # even in train mode, and the arithmetic matches diffusers' pipeline exactly.
    def normalize(self, z: Tensor) -> Tensor:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.bn_eps).to(z.device, z.dtype)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        mean = self.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.config.bn_eps).to(z.device, z.dtype)
        return z * std + mean

    def _check_image(self, x: Tensor) -> None:
        t = self.config.token_size
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % t or x.shape[3] % t:
            raise ValueError(
                f"image must be (B, {self.config.in_channels}, H, W) with H and W multiples of {t}, "
                f"got {tuple(x.shape)}"
            )

    def encode_moments_mean(self, x: Tensor) -> Tensor:
        return self.encoder(x)[:, : self.config.z_channels]

    def encode(self, x: Tensor, *, tiled: bool = False, tile_size: int = 512, tile_overlap: int = 128) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] → normalized patchified latent (B, 4·z, H/16, W/16).

        `tile_size`/`tile_overlap` are in pixels (rounded to multiples of the token size).
        """
        self._check_image(x)
        x = x.to(self.encoder.conv_in.weight.dtype)
        if tiled:
            t, a = self.config.token_size, self.config.downsample
            z = _tiled(
                self.encode_moments_mean,
                x,
                tile=max(t, tile_size // t * t),
                overlap=tile_overlap // t * t,
                align=t,
                scale=1 / a,
                out_channels=self.config.z_channels,
            )
        else:
            z = self.encode_moments_mean(x)
        return self.normalize(patchify(z, self.config.patch))

    def decode(self, z: Tensor, *, tiled: bool = False, tile_size: int = 512, tile_overlap: int = 128) -> Tensor:
        """Normalized patchified latent (B, 4·z, h, w) → image (B, 3, 16h, 16w), not clamped.

        `tile_size`/`tile_overlap` are in output pixels.
        """
        cfg = self.config
        if z.ndim != 4 or z.shape[1] != cfg.latent_channels:
            raise ValueError(f"latent must be (B, {cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        z = unpatchify(self.denormalize(z), cfg.patch).to(self.decoder.conv_in.weight.dtype)
        if not tiled:
            return self.decoder(z)
        a = cfg.downsample
        return _tiled(
            self.decoder,
            z,
            tile=max(cfg.patch, tile_size // a // cfg.patch * cfg.patch),
            overlap=tile_overlap // a // cfg.patch * cfg.patch,
            align=cfg.patch,
            scale=a,
            out_channels=cfg.out_ch,
        )


# ---------------------------------------------------------------------------------------------------
# Loading: official ae.safetensors and diffusers vae/ folders


def diffusers_key(bfl_key: str, num_levels: int) -> str:
    """The `AutoencoderKLFlux2` key of a BFL autoencoder key (spec §4.4)."""
    k = bfl_key
    if k.startswith("encoder.quant_conv."):
        return k[len("encoder.") :]
    if k.startswith("decoder.post_quant_conv."):
        return k[len("decoder.") :]
    m = re.match(r"decoder\.up\.(\d+)\.", k)
    if m:  # diffusers numbers decoder levels in execution order (lowest resolution first)
        k = f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}." + k[m.end() :]
    k = re.sub(r"encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", k)
    k = re.sub(r"\.block\.(\d+)\.", r".resnets.\1.", k)
    k = k.replace(".downsample.conv.", ".downsamplers.0.conv.").replace(".upsample.conv.", ".upsamplers.0.conv.")
    k = k.replace(".nin_shortcut.", ".conv_shortcut.")
    k = k.replace(".mid.block_1.", ".mid_block.resnets.0.").replace(".mid.block_2.", ".mid_block.resnets.1.")
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    m = re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", k)
    if m:
        return f"{m.group(1)}.mid_block.attentions.0.{attn[m.group(2)]}.{m.group(3)}"
    k = k.replace(".norm_out.", ".conv_norm_out.")
    return k


def _is_attn_proj(bfl_key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_key))


def _ae_files(path: Path) -> tuple[Path, str]:
    """(weights file, layout) for an ae.safetensors file, a diffusers vae/ folder or a folder holding either."""
    if path.is_file():
        return path, "auto"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    for sub in (path, path / "vae"):
        f = sub / "diffusion_pytorch_model.safetensors"
        if f.is_file():
            return f, "diffusers"
    f = path / "ae.safetensors"
    if f.is_file():
        return f, "bfl"
    raise CheckpointError(
        f"{path}: no autoencoder found (looked for ae.safetensors, diffusion_pytorch_model.safetensors, "
        "vae/diffusion_pytorch_model.safetensors)"
    )


def infer_ae_config(keys: dict[str, tuple[int, ...]], layout: str) -> AutoEncoderConfig:
    """Architecture from tensor names and shapes (BFL or diffusers names)."""
    d = layout == "diffusers"
    conv_in = keys.get("encoder.conv_in.weight")
    pq = keys.get("post_quant_conv.weight" if d else "decoder.post_quant_conv.weight")
    if conv_in is None or pq is None:
        raise CheckpointError("not a FLUX.2 autoencoder: encoder.conv_in / post_quant_conv missing")
    ch = conv_in[0]
    down = "encoder.down_blocks." if d else "encoder.down."
    levels = 1 + max(int(k[len(down) :].split(".")[0]) for k in keys if k.startswith(down))
    blocks = "resnets" if d else "block"
    mult = []
    for i in range(levels):
        w = keys[f"{down}{i}.{blocks}.0.conv1.weight"]
        mult.append(w[0] // ch)
    res = 1 + max(int(k.split(".")[4]) for k in keys if k.startswith(f"{down}0.{blocks}."))
    return AutoEncoderConfig(ch=ch, ch_mult=tuple(mult), num_res_blocks=res, z_channels=pq[0], in_channels=conv_in[1])


def load_autoencoder(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AutoEncoder:
    """Load `ae.safetensors` (BFL keys) or a diffusers `vae/` folder, strictly, one tensor at a time."""
    path = Path(path)
    file, layout = _ae_files(path)
    reader = SafetensorsReader(file)
    shapes = {k: reader.tensors[k].shape for k in reader.keys()}
    if layout == "auto":
        layout = "diffusers" if any(k.startswith("encoder.down_blocks.") for k in shapes) else "bfl"
    cfg = infer_ae_config(shapes, layout)
    cfg_file = file.parent / "config.json"
    if layout == "diffusers" and cfg_file.is_file():
        eps = json.loads(cfg_file.read_text()).get("batch_norm_eps")
        if eps is not None:
            cfg = replace(cfg, bn_eps=float(eps))
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    want = {k: t for k, t in ae.state_dict().items() if not k.endswith("num_batches_tracked")}
    src = {k: (diffusers_key(k, len(cfg.ch_mult)) if layout == "diffusers" else k) for k in want}
    missing = [f"{s} (for {k})" for k, s in src.items() if s not in reader]
    used = set(src.values()) | {"bn.num_batches_tracked"}
    unexpected = [k for k in reader.keys() if k not in used]
    bad = []
    for k, s in src.items():
        if s in reader:
            got, need = tuple(reader.tensors[s].shape), tuple(want[k].shape)
            if got != need and not (layout == "diffusers" and _is_attn_proj(k) and got == need[:2]):
                bad.append(f"{s}: {list(got)} vs expected {list(need)}")
    if missing or unexpected or bad:
        raise CheckpointError(
            f"{file}: not a {layout} FLUX.2 autoencoder of the inferred shape {cfg}: "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(bad)} shape mismatches {bad[:5]}"
        )
    ae = ae.to_empty(device=device)
    state = dict(ae.named_parameters()) | dict(ae.named_buffers())
    with torch.no_grad():
        for k, s in src.items():
            t = reader.read(s)
            state[k].copy_(t.reshape(state[k].shape))
        state["bn.num_batches_tracked"].zero_()
    return ae.to(dtype=dtype).eval()


def autoencoder_state(ae: AutoEncoder, layout: str = "bfl") -> dict[str, Tensor]:
    """Tensors under BFL or diffusers keys (attention 1×1 convs become 2-D linears for diffusers)."""
    state = {k: v.detach() for k, v in ae.state_dict().items() if not k.endswith("num_batches_tracked")}
    if layout == "bfl":
        return state
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; valid: 'bfl', 'diffusers'")
    n = len(ae.config.ch_mult)
    return {diffusers_key(k, n): (v.flatten(1) if _is_attn_proj(k) else v) for k, v in state.items()}


def synthetic_autoencoder(
    config: str | AutoEncoderConfig = "flux.2",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> AutoEncoder:
    """Random weights of the exact shapes, drawn on `device` in `dtype` (for timing, not for images).

    Convs get std 1/sqrt(fan_in) and zero bias, norms weight 1 / bias 0, BN stats mean 0 / var 1,
    which keeps activations O(1) through the residual stack.
    """
    cfg = get_ae_preset(config) if isinstance(config, str) else config
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    ae = ae.to(dtype).to_empty(device=device)  # no fp32 copy on the device
    dev = torch.device(device)
    with torch.no_grad():
        for i, (name, p) in enumerate(ae.named_parameters()):
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
                torch.randn(p.shape, generator=g, device=dev, dtype=dtype, out=p.data)
                p.mul_(math.prod(p.shape[1:]) ** -0.5)
        ae.bn.running_mean.zero_()
        ae.bn.running_var.fill_(1.0)
        ae.bn.num_batches_tracked.zero_()
    return ae.eval()
