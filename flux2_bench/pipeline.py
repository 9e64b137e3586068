"""FLUX.2 text-to-image and multi-reference editing: text encoder → Euler sampling → VAE decode.

    pipe = Flux2Pipeline.from_pretrained("FLUX.2-dev/", device="cuda", dtype=torch.bfloat16)
    out = pipe.generate("a red fox", width=1024, height=1024, steps=50, guidance=4.0, seed=0)
    out.images[0].save("fox.png"); print(out.timings)

`from_pretrained` takes the official file set (flux2-dev.safetensors + ae.safetensors + a
text-encoder folder) or a diffusers layout (transformer/, vae/, text_encoder/, tokenizer/). Every
phase is timed (`last_timings`: encode / denoise / decode seconds), and components can be moved
to the device only for their phase (`offload=True`).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from flux2_bench.autoencoder import AutoEncoder, load_autoencoder
from flux2_bench.sampling import denoise, get_noise, get_schedule, image_ids, pack, reference_ids, text_ids, unpack
from flux2_bench.text_encoder import EmbeddingCache, TextEncoder
from flux2_bench.weights import load_transformer

MAX_REFERENCES = 10
MAX_OUTPUT_PIXELS = 2048 * 2048  # "up to 4 MP" output
SINGLE_REF_PIXELS = 2024 * 2024  # official cap for exactly one reference (~4.1 MP)
MULTI_REF_PIXELS = 1024 * 1024  # official cap per reference when there are several
MIN_REF_SIDE = 64
MAX_REF_ASPECT = 8.0
REF_FORMATS = ("PNG", "JPEG")


# ---------------------------------------------------------------------------------------------------
# Reference images


def load_reference(ref: str | os.PathLike | Image.Image) -> Image.Image:
    """Open a PNG/JPEG file (or take a PIL image) as RGB; clear errors for anything else."""
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    path = Path(ref)
    if not path.is_file():
        raise ValueError(f"reference image {path}: no such file")
    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt not in REF_FORMATS:
                raise ValueError(f"reference image {path}: format {fmt} is not supported; use PNG or JPEG")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"reference image {path}: not a readable PNG/JPEG file ({e})") from None


def prepare_reference(image: Image.Image, max_pixels: int, multiple: int = 16) -> Tensor:
    """Official preprocessing (spec §5.4): validate, LANCZOS-downscale to `max_pixels` keeping the
    aspect ratio, center-crop each side to a multiple of `multiple`, scale to [-1, 1] → (1, 3, H, W)."""
    w, h = image.size
    if min(w, h) < MIN_REF_SIDE:
        raise ValueError(f"reference image is {w}x{h}: both sides must be at least {MIN_REF_SIDE} px")
    if max(w / h, h / w) > MAX_REF_ASPECT:
        raise ValueError(f"reference image is {w}x{h}: aspect ratio {max(w / h, h / w):.1f} exceeds {MAX_REF_ASPECT:g}")
    if w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        w, h = max(multiple, int(w * s)), max(multiple, int(h * s))
        image = image.resize((w, h), Image.Resampling.LANCZOS)
    cw, ch = w // multiple * multiple, h // multiple * multiple
    left, top = (w - cw) // 2, (h - ch) // 2
    image = image.crop((left, top, left + cw, top + ch))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0  # same arithmetic as diffusers' image processor


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → PIL images (uint8 = round(255·(x/2 + 1/2)), as diffusers)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------------------------------------------
# Pipeline


@dataclass
class GenerationOutput:
    images: list[Image.Image] | Tensor  # PIL list, (B,3,H,W) in [0,1] for "pt", (B,N,C) tokens for "latent"
    width: int
    height: int
    timings: dict[str, float] = field(default_factory=dict)
    latents: Tensor | None = None  # (B, N, C) fp32 final tokens, before the VAE


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _module_device(m) -> torch.device:
    return next(m.parameters()).device


class Flux2Pipeline:
    """Components by value: a `flux2_bench.model.Flux2`, an `AutoEncoder`, a `TextEncoder` or None.

    `device` is where the transformer runs; the VAE runs on `vae_device` (default: `device`), the
    text encoder where it was loaded. With `offload=True` each component is moved to its device
    only for its phase and back to the CPU afterwards.
    """

    def __init__(
        self,
        transformer,
        vae: AutoEncoder,
        text_encoder: TextEncoder | None = None,
        *,
        device: str | torch.device | None = None,
        vae_device: str | torch.device | None = None,
        offload: bool = False,
        embedding_cache: EmbeddingCache | str | os.PathLike | None = None,
        tiled_vae: bool = False,
    ):
        if transformer.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"transformer in_channels {transformer.config.in_channels} != VAE latent channels "
                f"{vae.config.latent_channels} (z_channels {vae.config.z_channels} x 2x2 patch)"
            )
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.device = torch.device(device) if device is not None else _module_device(transformer)
        self.vae_device = torch.device(vae_device) if vae_device is not None else self.device
        self.offload = offload
        if embedding_cache is not None and not isinstance(embedding_cache, EmbeddingCache):
            embedding_cache = EmbeddingCache(embedding_cache)
        self.embedding_cache = embedding_cache
        self.tiled_vae = tiled_vae
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype | None = None,
        text_encoder_device: str | torch.device | None = None,
        load_text_encoder: bool = True,
        recipe: str | None = None,
        **kwargs,
    ) -> Flux2Pipeline:
        """Official file set (flux2-*.safetensors, ae.safetensors, a text-encoder folder) or diffusers layout.

        `recipe` quantizes a bf16 transformer's block linears while loading (see `load_transformer`);
        a quantized transformer file loads as what it is."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a folder")
        load_dev = "cpu" if kwargs.get("offload") else device
        te_dir = tok_dir = None
        if (folder / "transformer").is_dir():
            transformer = load_transformer(folder / "transformer", device=load_dev, dtype=dtype, recipe=recipe)
            vae = load_autoencoder(folder / "vae", device=load_dev, dtype=vae_dtype or dtype)
            te_dir = folder / "text_encoder"
            tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
        else:
            files = sorted(p for p in folder.glob("*.safetensors") if p.name != "ae.safetensors")
            if not files or not (folder / "ae.safetensors").is_file():
                raise FileNotFoundError(
                    f"{folder}: expected a diffusers layout (transformer/, vae/) or the official files "
                    f"(flux2-*.safetensors + ae.safetensors); found {[p.name for p in folder.iterdir()]}"
                )
            main = next((p for p in files if p.name.startswith("flux2")), files[0])
            transformer = load_transformer(main, device=load_dev, dtype=dtype, recipe=recipe)
            vae = load_autoencoder(folder / "ae.safetensors", device=load_dev, dtype=vae_dtype or dtype)
            te_dir = next((d for d in sorted(folder.iterdir()) if (d / "config.json").is_file()), None)
        text_encoder = None
        if load_text_encoder and te_dir is not None and (te_dir / "config.json").is_file():
            text_encoder = TextEncoder.from_pretrained(
                te_dir,
                tokenizer_folder=tok_dir,
                device=text_encoder_device or ("cpu" if kwargs.get("offload") else device),
                dtype=dtype,
                layers=transformer.config.text_layers,
            )
        return cls(transformer, vae, text_encoder, device=device, **kwargs)

    # -- phases -------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str]) -> Tensor:
        te = self.text_encoder
        if self.embedding_cache is not None and te is not None:
            return self.embedding_cache.encode(te, prompts)
        if te is None or te.model is None:
            raise ValueError("no text encoder loaded: pass prompt_embeds=(B, 512, context_dim) instead of prompt")
        if self.offload:
            te.model.to(self.device)
            try:
                return te.encode(prompts).cpu()
            finally:
                te.model.to("cpu")
        return te.encode(prompts)

    def _place(self, module, device: torch.device) -> None:
        if self.offload:
            module.to(device)

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        *,
        width: int = 1024,
        height: int = 1024,
        steps: int = 50,
        guidance: float | None = 4.0,
        seed: int = 0,
        reference_images: list | None = None,
        output_type: str = "pil",
        latents: Tensor | None = None,
        progress: bool = True,
    ) -> GenerationOutput:
        """Generate images; returns them with the time split (also in `self.last_timings`).

        `latents` optionally replaces the seeded initial noise: (B, C, h, w) on the token grid.
        `output_type`: "pil" (list of images), "pt" ((B, 3, H, W) in [0, 1]) or "latent" ((B, N, C)
        fp32 tokens before the VAE, as diffusers returns them).
        """
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        refs = list(reference_images or [])
        if len(refs) > MAX_REFERENCES:
            raise ValueError(f"{len(refs)} reference images given; at most {MAX_REFERENCES} are supported")
        tok = self.vae.config.token_size
        if width % 16 or height % 16:
            w16, h16 = width // 16 * 16, height // 16 * 16
            warnings.warn(f"width/height {width}x{height} floored to multiples of 16: {w16}x{h16}", stacklevel=2)
            width, height = w16, h16
        if width < 16 or height < 16:
            raise ValueError(f"output must be at least 16x16 px, got {width}x{height}")
        if width * height > MAX_OUTPUT_PIXELS:
            raise ValueError(f"output {width}x{height} is {width * height / 1e6:.1f} MP; at most 4 MP (2048x2048)")
        # validate and preprocess references before any heavy work, so bad input fails fast
        cap = SINGLE_REF_PIXELS if len(refs) == 1 else MULTI_REF_PIXELS
        ref_pixels = [prepare_reference(load_reference(r), cap) for r in refs]

        timings: dict[str, float] = {}
        dtype = next(self.transformer.parameters()).dtype
        # -- encode: text, then references through the VAE
        _sync(self.device)
        t0 = time.perf_counter()
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode_prompt(prompts)
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.transformer.config.context_in_dim:
            raise ValueError(
                f"prompt_embeds must be (B, L, {self.transformer.config.context_in_dim}), "
                f"got {tuple(prompt_embeds.shape)}"
            )
        txt = prompt_embeds.to(self.device, dtype)
        batch = txt.shape[0]
        _sync(self.device)
        timings["encode_text_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        ref_tokens = ref_id = None
        if ref_pixels:
            self._place(self.vae, self.vae_device)
            vae_dtype = next(self.vae.parameters()).dtype
            grids = [
                self.vae.encode(p.to(self.vae_device, vae_dtype), tiled=self.tiled_vae).float() for p in ref_pixels
            ]
            self._place(self.vae, torch.device("cpu"))
            ref_tokens = torch.cat([pack(g) for g in grids], dim=1).to(self.device).expand(batch, -1, -1)
            ref_id = reference_ids([tuple(g.shape[-2:]) for g in grids], batch=batch, device=self.device)
        _sync(self.device)
        timings["encode_refs_s"] = time.perf_counter() - t1
        timings["encode_s"] = timings["encode_text_s"] + timings["encode_refs_s"]

        # -- denoise
        gh, gw = height // tok, width // tok
        c = self.transformer.config.in_channels
        if latents is None:
            latents = get_noise(batch, c, gh, gw, seed=seed, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != (batch, c, gh, gw):
            raise ValueError(f"latents must be {(batch, c, gh, gw)}, got {tuple(latents.shape)}")
        x = pack(latents.to(self.device, torch.float32))
        img_id = image_ids(gh, gw, batch=batch, device=self.device)
        txt_id = text_ids(txt.shape[1], batch=batch, device=self.device)
        timesteps = get_schedule(steps, gh * gw)
        use_g = self.transformer.config.use_guidance_embed
        self._place(self.transformer, self.device)
        _sync(self.device)
        t2 = time.perf_counter()
        x = denoise(
            self.transformer, x, img_id, txt, txt_id, timesteps, guidance if use_g else None,
            ref_tokens=ref_tokens, ref_ids=ref_id, progress=progress,
        )  # fmt: skip
        _sync(self.device)
        timings["denoise_s"] = time.perf_counter() - t2
        self._place(self.transformer, torch.device("cpu"))

        # -- decode
        t3 = time.perf_counter()
        if output_type == "latent":
            images = x
        else:
            self._place(self.vae, self.vae_device)
            grid = unpack(x, gh, gw).to(self.vae_device, next(self.vae.parameters()).dtype)
            pixels = self.vae.decode(grid, tiled=self.tiled_vae).float().clamp(-1, 1)
            self._place(self.vae, torch.device("cpu"))
            images = to_pil(pixels) if output_type == "pil" else (pixels / 2 + 0.5).clamp(0, 1)
        _sync(self.vae_device)
        timings["decode_s"] = time.perf_counter() - t3
        timings["total_s"] = time.perf_counter() - t0
        self.last_timings = timings
        return GenerationOutput(images=images, width=width, height=height, timings=timings, latents=x)


# ---------------------------------------------------------------------------------------------------
# One call for the CLI

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def synthetic_prompt_embeds(prompt: str, context_dim: int, length: int = 512, seed: int = 0) -> Tensor:
    """Stand-in prompt embeddings (1, length, context_dim) for synthetic runs: N(0, 1) seeded by the
    prompt text, so different prompts give different (meaningless) conditioning."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") ^ seed
    g = torch.Generator().manual_seed(h & (2**63 - 1))
    return torch.randn(1, length, context_dim, generator=g)


def generate_to_file(
    *,
    prompt: str,
    out: str,
    refs: list[str] | None = None,
    checkpoint: str | None = None,
    preset: str = "tiny",
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "fp32",
    offload: bool = False,
    tiled_vae: bool = False,
    cache_dir: str | None = None,
) -> GenerationOutput:
    """Generate one image into `out` (PNG/JPEG by suffix) and print the time split.

    With `checkpoint` (a folder, official or diffusers layout) real weights are loaded. Without it,
    the `preset` transformer and the matching VAE get synthetic random weights and the prompt is
    replaced by seeded random embeddings (no text encoder): a plumbing and timing run, not an image.
    Size defaults: 1024² for checkpoints and full presets, 128² for `tiny`.
    """
    from flux2_bench.autoencoder import synthetic_autoencoder
    from flux2_bench.model import get_preset
    from flux2_bench.weights import synthetic_transformer

    torch_dtype = _DTYPES[dtype]
    embeds = None
    if checkpoint:
        pipe = Flux2Pipeline.from_pretrained(
            checkpoint, device=device, dtype=torch_dtype, offload=offload, tiled_vae=tiled_vae,
            embedding_cache=cache_dir,
        )  # fmt: skip
        cfg = pipe.transformer.config
        default_size = 1024
    else:
        cfg = get_preset(preset)
        ae_name = "tiny" if preset == "tiny" else "flux.2"
        transformer = synthetic_transformer(preset, device=device, dtype=torch_dtype, seed=seed)
        vae = synthetic_autoencoder(ae_name, device=device, dtype=torch_dtype, seed=seed)
        pipe = Flux2Pipeline(transformer, vae, None, device=device, offload=offload, tiled_vae=tiled_vae)
        embeds = synthetic_prompt_embeds(prompt, cfg.context_in_dim, seed=seed)
        default_size = 128 if preset == "tiny" else 1024
    result = pipe.generate(
        prompt=None if embeds is not None else prompt,
        prompt_embeds=embeds,
        width=width or default_size,
        height=height or default_size,
        steps=steps or cfg.default_steps,
        guidance=guidance if guidance is not None else cfg.default_guidance,
        seed=seed,
        reference_images=refs or [],
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out)
    t = result.timings
    source = f"checkpoint {checkpoint}" if checkpoint else f"{preset} synthetic"
    print(
        f"wrote {out} ({result.width}x{result.height}, {source}"
        f", {len(refs or [])} refs): encode {t['encode_s']:.2f} s, denoise {t['denoise_s']:.2f} s, "
        f"decode {t['decode_s']:.2f} s"
    )
    return result
