"""Position ids, the shifted schedule and the Euler sampler of FLUX.2 (spec §1.5, §5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm


def image_ids(height: int, width: int, t: int = 0, batch: int = 1, device=None) -> Tensor:
    """(batch, height*width, 4) ids (t, h, w, l=0) of a latent grid, row-major (h outer, w inner).

    Target tokens have t = 0; reference image k (0-based) has t = 10 + 10*k.
    """
    h = torch.arange(height, device=device).repeat_interleave(width)
    w = torch.arange(width, device=device).repeat(height)
    ids = torch.stack([torch.full_like(h, t), h, w, torch.zeros_like(h)], dim=-1)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def text_ids(length: int, batch: int = 1, device=None) -> Tensor:
    """(batch, length, 4) ids (0, 0, 0, i) of text tokens."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.unsqueeze(0).expand(batch, -1, -1)


def reference_ids(sizes: list[tuple[int, int]], batch: int = 1, device=None) -> Tensor:
    """(batch, sum h*w, 4) ids of reference latent grids `sizes` = [(h, w), ...]; grid k has t = 10 + 10*k."""
    if not sizes:
        return torch.zeros(batch, 0, 4, dtype=torch.long, device=device)
    return torch.cat([image_ids(h, w, t=10 + 10 * k, batch=batch, device=device) for k, (h, w) in enumerate(sizes)], 1)


def pack(x: Tensor) -> Tensor:
    """(B, C, h, w) latent grid → (B, h*w, C) tokens, row-major."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """(B, h*w, C) tokens → (B, C, h, w), inverse of `pack` (tokens ordered as `image_ids`)."""
    b, n, c = x.shape
    if n != height * width:
        raise ValueError(f"{n} tokens cannot fill a {height}x{width} grid")
    return x.transpose(1, 2).reshape(b, c, height, width)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Shift μ from the target image token count and the step count (spec §5.2, BFL constants)."""
    a1, b1 = 8.73809524e-05, 1.89833333  # fitted at 10 steps
    a2, b2 = 0.00016927, 0.45666666  # fitted at 200 steps
    mu_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(mu_200)
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * num_steps + mu_200 - 200.0 * slope)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (data): t_i = 1 - i/N, shifted by the empirical μ."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
    mu = compute_empirical_mu(image_seq_len, num_steps)
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    shifted = torch.where((t > 0) & (t < 1), time_shift(mu, 1.0, t.clamp(1e-12, 1)), t)
    return shifted.tolist()


def get_noise(
    batch: int, channels: int, height: int, width: int, *, seed: int, device=None, dtype=torch.float32
) -> Tensor:
    """Initial noise (batch, channels, height, width) on the latent token grid.

    Drawn from `seed` on the CPU in fp32 (the same numbers on every machine and GPU), then moved
    and cast: unlike sampling on the device, the image for a seed does not depend on the hardware.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=g, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


def denoise(
    model,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: list[float],
    guidance: float | None,
    ref_tokens: Tensor | None = None,
    ref_ids: Tensor | None = None,
    *,
    progress: bool = True,
) -> Tensor:
    """Euler integration of the flow from timesteps[0] (noise) to timesteps[-1] (data), spec §5.3.

    One forward per step (guidance is embedded, no CFG). Reference tokens are appended after the
    target tokens with their own ids and their outputs discarded. The state is kept in fp32 and the
    update done in fp32 (as diffusers' scheduler does); the model sees its own dtype. Returns fp32.
    """
    if ref_tokens is not None and (ref_ids is None or ref_ids.shape[:2] != ref_tokens.shape[:2]):
        raise ValueError(
            f"ref_tokens {None if ref_tokens is None else tuple(ref_tokens.shape)} need matching ref_ids, "
            f"got {None if ref_ids is None else tuple(ref_ids.shape)}"
        )
    dtype = next(model.parameters()).dtype
    x = img.float()
    n = img.shape[1]
    b = img.shape[0]
    ids = img_ids if ref_tokens is None else torch.cat([img_ids, ref_ids], dim=1)
    refs = None if ref_tokens is None else ref_tokens.to(dtype)
    txt = txt.to(dtype)
    guid = None
    if getattr(model.config, "use_guidance_embed", False):
        if guidance is None:
            raise ValueError("this model embeds guidance: pass a guidance value, e.g. 4.0")
        guid = torch.full((b,), float(guidance), device=img.device, dtype=dtype)
    steps = list(zip(timesteps[:-1], timesteps[1:], strict=True))
    with torch.no_grad():
        for t_cur, t_next in tqdm(steps, desc="denoise", disable=not progress):
            inp = x.to(dtype) if refs is None else torch.cat([x.to(dtype), refs], dim=1)
            t_vec = torch.full((b,), t_cur, device=img.device, dtype=torch.float32).to(dtype)
            pred = model(inp, ids, txt, txt_ids, t_vec, guid)[:, :n]
            x = x + (t_next - t_cur) * pred.float()
    return x
