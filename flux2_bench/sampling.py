"""Position ids, the shifted schedule and the Euler sampler of FLUX.2 (spec §1.5, §5)."""

from __future__ import annotations

import torch
from torch import Tensor


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
