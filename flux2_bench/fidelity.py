"""Image fidelity of a quantized run against the bf16 run: latent SQNR, PSNR, SSIM, optional LPIPS.

Both runs use the same prompt, seed and initial noise, so any difference comes from precision.

    row = fidelity_row(images, ref_images, latents, ref_latents, synthetic_weights=False)
    # {"latent_sqnr_db": 31.2, "psnr_db": 28.4, "ssim": 0.93, "lpips": "not available (...)", "n_images": 4}

Image convention (one rule, converted by `as_batch`):
- PIL images and numpy arrays are HWC (the image-file layout); torch tensors are CHW / NCHW (the
  model layout, e.g. `Flux2Pipeline.generate(output_type="pt")`).
- uint8 is divided by 255; floating point must already be in [0, 1] (values are not clamped or
  rescaled, so `data_range` stays 1.0).
- Everything is computed in float64 on the CPU, on all channels (RGB, not luma).

Metric definitions:
- `latent_sqnr`: 10·log10(Σref² / Σ(x − ref)²) over the final latent tokens, in dB (inf when equal).
- `psnr`: 10·log10(data_range² / MSE) per image, averaged over images (inf when identical).
- `ssim`: Wang et al. 2004 with an 11×11 Gaussian window (σ = 1.5, truncated at 3.5σ), K1 = 0.01,
  K2 = 0.03, population covariances, computed per channel on the "valid" region (no padding) and
  averaged over channels and pixels, then over images. This equals scikit-image's
  `structural_similarity(..., channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1.0)`.
- `lpips`: only from a user-supplied TorchScript module (`torch.jit.load`), called as
  `module(x, ref)` on (N, 3, H, W) float32 tensors in [-1, 1] and returning one distance per image
  (any shape with N elements). Without one, LPIPS is reported as `LPIPS_NOT_AVAILABLE`: the usual
  LPIPS packages need torchvision and a hub download, neither of which we depend on.

Values that are not numbers are strings that say why; a report prints them as they are.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

METRICS = ("latent_sqnr_db", "psnr_db", "ssim", "lpips")
SKIPPED_SYNTHETIC = "skipped: synthetic weights make fidelity meaningless"
LPIPS_NOT_AVAILABLE = "not available (no LPIPS weights supplied)"
NO_LATENTS = "not available (no latents supplied)"

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

ImageLike = Image.Image | np.ndarray | Tensor


# ---------------------------------------------------------------------------------------------------
# Converters


def as_batch(images: ImageLike | Sequence[ImageLike]) -> Tensor:
    """One image or a sequence of them → (N, C, H, W) float64 in [0, 1] (see the module docstring)."""
    if isinstance(images, Image.Image):
        return _one(images).unsqueeze(0)
    if isinstance(images, np.ndarray):
        if images.ndim == 4:  # NHWC
            return torch.stack([_one(a) for a in images])
        return _one(images).unsqueeze(0)
    if isinstance(images, Tensor):
        if images.dim() == 4:  # NCHW
            return torch.stack([_one(a) for a in images])
        return _one(images).unsqueeze(0)
    if isinstance(images, Sequence) and len(images) > 0:
        out = [_one(im) for im in images]
        shapes = {tuple(t.shape) for t in out}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a shape (C, H, W), got {sorted(shapes)}")
        return torch.stack(out)
    raise TypeError(f"expected a PIL image, numpy array, torch tensor or a non-empty sequence of them, got {images!r}")


def _one(image: ImageLike) -> Tensor:
    """One image → (C, H, W) float64."""
    if isinstance(image, Image.Image):
        image = np.array(image.convert("RGB") if image.mode not in ("RGB", "L") else image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3:
            raise ValueError(f"a numpy image must be HW or HWC, got shape {image.shape}")
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3:
            raise ValueError(f"a tensor image must be HW or CHW, got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"expected a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if t.dtype == torch.uint8:
        return t.double() / 255.0
    if not t.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point in [0, 1], got {t.dtype}")
    return t.double()


def _pair(img: ImageLike | Sequence[ImageLike], ref: ImageLike | Sequence[ImageLike]) -> tuple[Tensor, Tensor]:
    a, b = as_batch(img), as_batch(ref)
    if a.shape != b.shape:
        raise ValueError(f"image and reference shapes differ: {tuple(a.shape)} vs {tuple(b.shape)} (N, C, H, W)")
    return a, b


# ---------------------------------------------------------------------------------------------------
# Metrics


def latent_sqnr(x: Tensor, ref: Tensor) -> float:
    """SQNR of latents `x` against `ref` in dB: 10·log10(Σref² / Σ(x−ref)²); inf when equal."""
    if x.shape != ref.shape:
        raise ValueError(f"latent shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    ref64, x64 = ref.detach().cpu().double(), x.detach().cpu().double()
    noise = (x64 - ref64).pow(2).sum().item()
    signal = ref64.pow(2).sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def psnr_per_image(img, ref, data_range: float = 1.0) -> list[float]:
    """PSNR in dB of each image against its reference (inf where identical)."""
    a, b = _pair(img, ref)
    mse = (a - b).pow(2).flatten(1).mean(1)
    return [math.inf if m == 0 else 10.0 * math.log10(data_range**2 / m) for m in mse.tolist()]


def psnr(img, ref, data_range: float = 1.0) -> float:
    """Mean over images of the per-image PSNR in dB (inf if any image is identical to its reference)."""
    return float(np.mean(psnr_per_image(img, ref, data_range)))


@functools.cache
def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g


def ssim_per_image(img, ref, data_range: float = 1.0) -> list[float]:
    """SSIM of each image against its reference (11×11 Gaussian window σ=1.5, mean over RGB channels)."""
    a, b = _pair(img, ref)
    n, c, h, w = a.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    g = _gaussian_window()
    # Separable Gaussian filter, "valid" region only: the same pixels scikit-image keeps after
    # cropping its reflect-padded borders, so padding never enters the result.
    gx = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    gy = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, gx, groups=c), gy, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1).tolist()


def ssim(img, ref, data_range: float = 1.0) -> float:
    """Mean over images of the per-image SSIM (1.0 for identical images)."""
    return float(np.mean(ssim_per_image(img, ref, data_range)))


@functools.cache
def load_lpips(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """Load (once per path) a TorchScript LPIPS module; see the module docstring for its contract."""
    if not os.path.isfile(path):
        raise ValueError(f"LPIPS module {path}: no such file (expected a TorchScript file for torch.jit.load)")
    module = torch.jit.load(os.fspath(path), map_location="cpu")
    module.eval()
    return module


def lpips(img, ref, model: str | os.PathLike | torch.nn.Module) -> float:
    """Mean LPIPS distance of images against references with a user-supplied module (or its path)."""
    module = load_lpips(model) if isinstance(model, str | os.PathLike) else model
    a, b = _pair(img, ref)
    if a.shape[1] != 3:
        raise ValueError(f"LPIPS needs RGB images, got {a.shape[1]} channels")
    with torch.no_grad():
        d = module((a * 2 - 1).float(), (b * 2 - 1).float())
    d = torch.as_tensor(d).detach().double().flatten()
    if d.numel() != a.shape[0]:
        raise ValueError(f"LPIPS module returned {d.numel()} values for {a.shape[0]} images; expected one per image")
    return float(d.mean())


# ---------------------------------------------------------------------------------------------------
# One row of a report


def compare(
    images,
    ref_images,
    latents: Tensor | None = None,
    ref_latents: Tensor | None = None,
    lpips_model: str | os.PathLike | torch.nn.Module | None = None,
) -> dict:
    """All fidelity metrics of `images` against `ref_images` (the bf16 run), keyed by `METRICS`.

    Numbers are floats (means over images); a metric that cannot be computed is a string saying why.
    `n_images` is the number of image pairs compared.
    """
    a, b = _pair(images, ref_images)
    if (latents is None) != (ref_latents is None):
        raise ValueError("pass both latents and ref_latents, or neither")
    return {
        "latent_sqnr_db": NO_LATENTS if latents is None else latent_sqnr(latents, ref_latents),
        "psnr_db": psnr(a, b),
        "ssim": ssim(a, b),
        "lpips": LPIPS_NOT_AVAILABLE if lpips_model is None else lpips(a, b, lpips_model),
        "n_images": a.shape[0],
    }


def fidelity_row(
    images=None,
    ref_images=None,
    latents: Tensor | None = None,
    ref_latents: Tensor | None = None,
    *,
    synthetic_weights: bool,
    lpips_model: str | os.PathLike | torch.nn.Module | None = None,
) -> dict:
    """`compare(...)`, or every metric labeled `SKIPPED_SYNTHETIC` when the weights are synthetic.

    Random weights produce noise images whose differences say nothing about a precision's quality,
    so with `synthetic_weights=True` nothing is computed and no number is ever returned.
    """
    if synthetic_weights:
        n = None if images is None else as_batch(images).shape[0]
        return {**dict.fromkeys(METRICS, SKIPPED_SYNTHETIC), "n_images": n}
    if images is None or ref_images is None:
        raise ValueError("images and ref_images are required when the weights are real")
    return compare(images, ref_images, latents, ref_latents, lpips_model=lpips_model)


def is_score(value) -> bool:
    """True when a metric value is a number (not a 'skipped' / 'not available' label)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
