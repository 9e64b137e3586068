"""Quantization primitives: pure functions, each `quantize_*` with its exact inverse `dequantize_*`.

Every function takes a 2-D weight [N, K] (out, in) in any float dtype, computes in fp32 and returns
the stored tensors exactly as a checkpoint holds them, so `dequantize_*(*quantize_*(w))` is the
weight a loader sees. Layouts (see `reference/quant-formats.md`):

- fp8 e4m3, per tensor / per output row / per 128x128 block: `q = saturate(w / s)`, `w ~ q * s`,
  `s = amax / 448` (1.0 where amax is 0, so zero rows stay exact and nothing divides by zero).
- int4-g128 (this project's kernel format): uint8 [N, K/2], byte j of row n holds element 2j in the
  HIGH nibble and 2j+1 in the LOW nibble; nibble = q + 8, q = clamp(round(w / s), -8, 7),
  s = amax_group / 7 stored as bf16 [N, K/128]; `w ~ (nibble - 8) * s`.
- nf4 (bitsandbytes, as diffusers stores it): the flattened weight in blocks of 64, absmax per block,
  codes = nearest entry of the NF4 codebook after dividing by absmax; packed two per byte, the even
  element in the high nibble, shape (numel/2, 1). Optional double quantization of absmax (bnb's
  8-bit dynamic map in blocks of 256, after subtracting the mean).
- nvfp4 (ComfyUI / comfy-kitchen): e2m1 codes packed two per byte (even element high), e4m3 scales
  per 16 elements along K stored in cuBLAS `to_blocked` (128x4 tile) layout, fp32 global scale
  amax / (448 * 6).

The converter feeds row chunks of a large weight through these functions; the per-tensor statistic
(`amax`) can therefore be passed in, computed once over the whole tensor.
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_BLOCK = 128
INT4_GROUP = 128
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
NVFP4_BLOCK = 16
E2M1_MAX = 6.0

# bitsandbytes' NF4 codebook, exactly as `bitsandbytes.functional.get_4bit_type("nf4")` holds it (fp32).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# e2m1 magnitudes by 3-bit code; bit 3 of a nibble is the sign.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# Yardstick and helpers


def sqnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `y` against the reference `x`, in dB (inf when equal)."""
    x = x.detach().double()
    noise = (x - y.detach().double()).pow(2).sum().item()
    signal = x.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def saturate_to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Clamp to +-448 then cast: a plain cast turns out-of-range values into NaN."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def amax(w: torch.Tensor) -> torch.Tensor:
    """max |w| as an fp32 scalar without materializing |w| (no copy of a multi-GB weight)."""
    if w.numel() == 0:
        return torch.zeros((), dtype=torch.float32)
    return torch.maximum(w.max().float(), -w.min().float())


def _check_2d(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{what} expects a 2-D weight [N, K], got shape {list(w.shape)}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"{what} expects a float weight, got {w.dtype}")


def _safe_scale(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))


# ---------------------------------------------------------------------------------------------------
# FP8 e4m3


def quantize_fp8_tensor(w: torch.Tensor, w_amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor: (fp8 [N, K], fp32 scalar scale of shape [])."""
    _check_2d(w, "quantize_fp8_tensor")
    a = amax(w) if w_amax is None else w_amax.float().reshape(())
    scale = _safe_scale(a / FP8_MAX)
    # in place on one fp32 copy: this runs over every byte of a 64 GB checkpoint
    x = w.to(torch.float32, copy=True).div_(scale).clamp_(-FP8_MAX, FP8_MAX)
    return x.to(FP8_DTYPE), scale


def dequantize_fp8_tensor(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def quantize_fp8_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel: (fp8 [N, K], fp32 scale [N, 1])."""
    _check_2d(w, "quantize_fp8_row")
    wf = w.to(torch.float32, copy=True)
    scale = _safe_scale(wf.abs().amax(dim=1, keepdim=True) / FP8_MAX)
    return wf.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_fp8_row(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    n, k = x.shape
    if (n, k) == (rows, cols):
        return x
    return torch.nn.functional.pad(x, (0, cols - k, 0, rows - n))


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """128x128 blocks: (fp8 [N, K], fp32 scale [ceil(N/128), ceil(K/128)]); edge blocks are partial."""
    _check_2d(w, "quantize_fp8_block")
    n, k = w.shape
    bn, bk = -(-n // block), -(-k // block)
    wf = _pad_to(w.float(), bn * block, bk * block).view(bn, block, bk, block)
    scale = _safe_scale(wf.abs().amax(dim=(1, 3)) / FP8_MAX)
    q = saturate_to_fp8(wf / scale[:, None, :, None]).view(bn * block, bk * block)[:n, :k]
    return q.contiguous(), scale


def dequantize_fp8_block(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = FP8_BLOCK
) -> torch.Tensor:
    n, k = q.shape
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    return (q.float() * s).to(dtype)


# ---------------------------------------------------------------------------------------------------
# 4-bit packing (two codes per byte, the even-indexed element in the HIGH nibble)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15, last dim even -> uint8 with half the last dim: (c[2j] << 4) | c[2j+1]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got shape {list(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`."""
    p = packed.to(torch.uint8)
    return torch.stack([p >> 4, p & 0x0F], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ---------------------------------------------------------------------------------------------------
# int4, group 128 along K (this project's kernel format)


def quantize_int4_g128(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, K/2] packed nibbles q+8, bf16 scale [N, K/group])."""
    _check_2d(w, "quantize_int4_g128")
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4-g128 needs K divisible by {group}, got K={k} (shape {list(w.shape)})")
    wf = w.float().view(n, k // group, group)
    # the scale is stored as bf16: quantize against the rounded scale so dequantization is consistent
    scale = (wf.abs().amax(dim=-1) / 7.0).to(torch.bfloat16)
    s = _safe_scale(scale.float())
    q = torch.round(wf / s[..., None]).clamp_(-8, 7)
    codes = (q + 8).to(torch.uint8).view(n, k)
    return pack_nibbles(codes), scale


def dequantize_int4_g128(
    packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, group: int = INT4_GROUP
) -> torch.Tensor:
    n = packed.shape[0]
    q = unpack_nibbles(packed).float() - 8.0
    k = q.shape[1]
    return (q.view(n, k // group, group) * scale.float()[..., None]).view(n, k).to(dtype)


# ---------------------------------------------------------------------------------------------------
# NF4 (bitsandbytes)


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted codebook (ties to the lower entry, as bitsandbytes)."""
    code = code.to(x.device)
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, bounds).to(torch.uint8)


def nf4_absmax(w: torch.Tensor, block: int = NF4_BLOCK) -> torch.Tensor:
    flat = w.reshape(-1)
    if flat.numel() % block:
        raise ValueError(f"nf4 needs numel divisible by {block}, got {flat.numel()} (shape {list(w.shape)})")
    return flat.view(-1, block).float().abs().amax(dim=-1)


def quantize_nf4(w: torch.Tensor, block: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 packed (numel/2, 1), fp32 absmax [numel/block]) as `bitsandbytes.functional.quantize_4bit`."""
    absmax = nf4_absmax(w, block)
    # multiply by the reciprocal, as bitsandbytes does, so codes match it bit for bit
    scaled = (w.reshape(-1, block).float() * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
    codes = _nearest_code(scaled.view(-1), NF4_CODE)
    return pack_nibbles(codes).unsqueeze(1), absmax


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    block: int = NF4_BLOCK,
) -> torch.Tensor:
    codes = unpack_nibbles(packed.reshape(-1)).long()
    vals = NF4_CODE.to(codes.device)[codes].view(-1, block) * absmax.float()[:, None]
    return vals.view(shape).to(dtype)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), 256 sorted fp32."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        items = 2 ** (i + non_sign - max_exp) + 1
        b = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0  # products in fp32, as bitsandbytes computes them
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def quantize_absmax_nested(
    absmax: torch.Tensor, block: int = NF4_NESTED_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Double quantization: (uint8 codes, fp32 nested_absmax, fp32 nested_quant_map[256], offset)."""
    offset = absmax.mean().item()
    x = absmax.float() - offset
    n = x.numel()
    nb = -(-n // block)
    padded = torch.nn.functional.pad(x, (0, nb * block - n)).view(nb, block)
    nested_absmax = padded.abs().amax(dim=-1)
    scaled = (padded * (1.0 / nested_absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).view(-1)[:n]
    code = dynamic_map()
    return _nearest_code(scaled, code), nested_absmax, code, offset


def dequantize_absmax_nested(
    codes: torch.Tensor, nested_absmax: torch.Tensor, code: torch.Tensor, offset: float, block: int = NF4_NESTED_BLOCK
) -> torch.Tensor:
    vals = code.float()[codes.long()]
    n = vals.numel()
    scale = nested_absmax.float().repeat_interleave(block)[:n]
    return vals * scale + offset


# ---------------------------------------------------------------------------------------------------
# NVFP4 (ComfyUI / comfy-kitchen layout)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """cuBLAS block-scaling layout: pad to (128*ceil(R/128), 4*ceil(C/4)); each 128x4 tile is stored
    as 32x16 with tile element (i*32 + j, c) at (j, i*4 + c); tiles row-block major."""
    r, c = scales.shape
    rb, cb = -(-r // 128), -(-c // 4)
    p = _pad_to(scales, rb * 128, cb * 4)
    tiles = p.view(rb, 4, 32, cb, 4).permute(0, 3, 2, 1, 4)  # (rb, cb, j, i, c)
    return tiles.reshape(rb * 128, cb * 4).contiguous()


def from_blocked(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `to_blocked`, cropped to the unpadded (rows, cols)."""
    pr, pc = blocked.shape
    rb, cb = pr // 128, pc // 4
    tiles = blocked.reshape(rb, cb, 32, 4, 4).permute(0, 3, 2, 1, 4)  # (rb, i, j, cb, c)
    return tiles.reshape(pr, pc)[:rows, :cols].contiguous()


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    mag = _nearest_code(x.abs().clamp(max=E2M1_MAX), E2M1_VALUES)
    return mag | ((x < 0).to(torch.uint8) << 3)


def quantize_nvfp4(
    w: torch.Tensor, w_amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 [N, K/2] e2m1 pairs, e4m3 block scales in to_blocked layout, fp32 scalar weight_scale_2)."""
    _check_2d(w, "quantize_nvfp4")
    n, k = w.shape
    if k % NVFP4_BLOCK or n % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 needs N and K divisible by {NVFP4_BLOCK}, got shape {list(w.shape)}")
    a = amax(w) if w_amax is None else w_amax.float().reshape(())
    scale_2 = a / (FP8_MAX * E2M1_MAX)
    scale_2 = _safe_scale(scale_2)
    wf = w.float().view(n, k // NVFP4_BLOCK, NVFP4_BLOCK)
    block_scale = saturate_to_fp8(wf.abs().amax(dim=-1) / E2M1_MAX / scale_2)
    total = block_scale.float() * scale_2
    scaled = wf / _safe_scale(total)[..., None]
    codes = _e2m1_codes(scaled).view(n, k)
    return pack_nibbles(codes), to_blocked(block_scale), scale_2


def dequantize_nvfp4(
    packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    codes = unpack_nibbles(packed).long()
    n, k = codes.shape
    vals = E2M1_VALUES.to(codes.device)[codes & 7] * (1.0 - 2.0 * (codes >> 3).float())
    bs = from_blocked(block_scale, n, k // NVFP4_BLOCK).float() * scale_2.float()
    return (vals.view(n, k // NVFP4_BLOCK, NVFP4_BLOCK) * bs[..., None]).view(n, k).to(dtype)
