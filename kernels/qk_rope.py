"""Fused QK-RMSNorm + RoPE for FLUX.2 attention (and the double-stream block's Q/K/V concatenation).

What
----
Every FLUX.2 block runs, on Q and K, ``F.rms_norm`` (fp32 inside, rounded to the activation dtype),
``* scale`` (the QKNorm weight) and ``attention.apply_rope`` (upcast to fp32, rotate adjacent pairs by
the EmbedND tables, round back). Unfused that is about 9 passes over Q and K with fp32 temporaries
(~0.8 GB per tensor at FLUX.2-dev 1024²); ``qk_norm_rope`` reads Q and K once and writes them once.
The double-stream block then concatenates text and image Q/K/V along the sequence: with ``out`` the
kernel writes straight into slices of one joint buffer and copies V in the same launch.

Per (b, h, l) row ``x`` of length D (math identical to the model, roundings included)::

    y   = round(round(x * rsqrt(mean(x²) + eps)) * round(weight))      # F.rms_norm(x) * weight
    out = round((y0*cos - y1*sin, y0*sin + y1*cos))  for pairs (y0, y1) = (y[2j], y[2j+1]), in fp32

where ``round`` is to ``x.dtype`` (a no-op for fp32) and cos, sin are the fp32 tables of EmbedND.

Layouts and dtypes
------------------
- ``q``, ``k`` (and ``v``): (B, H, L, D) bf16 / fp16 / fp32 views with any strides and a contiguous
  last dim: ``_split_heads`` of the (B, L, 3*H*D) QKV output (strides (3LHD, D, 3HD, 1)) or a column
  slice of the single blocks' linear1 output. D even, at most 256.
- ``cos``, ``sin``: (B|1, L, D/2) fp32 from ``rope_cos_sin`` (last dim contiguous; a slice ``[:, a:b]``
  of the joint table is fine).
- outputs: (B, H, L, D) of the input dtype. Allocated with physical layout (B, L, H, D): cuDNN SDPA
  gives its output q's layout, which makes the attention output's ``transpose(1, 2).flatten(2)`` free.

Grid: one program per (b, l) row and block of BLOCK_H heads. For a fixed (b, l) the heads of a QKV
projection row are contiguous (H*D elements), so a program reads BLOCK_H*D contiguous elements of each
tensor and one D/2 row of cos and sin (shared by its heads). Pairs are split in registers
(reshape to (BLOCK_H, D/2, 2) then ``tl.split``), so loads and stores stay full-width.

Notes
-----
- Triton's interpreter (CPU CI) truncates fp32 -> bf16 in casts and in stores; under it the kernel
  rounds to bf16 in fp32 arithmetic first (``EXACT_BF16``), which the store then keeps exactly.
- In-place use (``out=(q, k)``) is safe: each program reads its whole tile before writing it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, ROUND: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Round fp32 ``x`` to the I/O dtype and back to fp32 (ROUND: 0 fp32, 1 bf16, 2 fp16)."""
    if ROUND == 1:
        if EXACT_BF16:
            # round-to-nearest-even to the top 16 bits (finite values; the interpreter truncates casts)
            bits = x.to(tl.int32, bitcast=True)
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _norm_rope_rows(x, w, cos, sin, D, eps, ROUND: tl.constexpr, EXACT_BF16: tl.constexpr):
    """RMSNorm * weight, then RoPE, of each row of ``x`` (R, BLOCK_D) fp32 (zeros past D), with the
    model's roundings (module docstring). ``w``: (BLOCK_D,) fp32, already rounded; ``cos``, ``sin``:
    (R or 1, BLOCK_D // 2). Returns (R, BLOCK_D) fp32 on the ``ROUND`` dtype's grid. Also used by the FP8
    attention pre-pass (kernels/fp8_attention.py) to normalize and rotate Q and K as it loads them."""
    R: tl.constexpr = x.shape[0]
    BLOCK_D: tl.constexpr = x.shape[1]
    rrms = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    y = _round_to(_round_to(x * rrms[:, None], ROUND, EXACT_BF16) * w[None, :], ROUND, EXACT_BF16)
    y0, y1 = tl.split(tl.reshape(y, (R, BLOCK_D // 2, 2)))
    o = tl.reshape(tl.join(y0 * cos - y1 * sin, y0 * sin + y1 * cos), (R, BLOCK_D))
    return _round_to(o, ROUND, EXACT_BF16)


@triton.jit
def _qk_norm_rope_kernel(
    # pointers
    q_ptr,
    k_ptr,
    v_ptr,
    qo_ptr,
    ko_ptr,
    vo_ptr,
    qw_ptr,
    kw_ptr,
    cos_ptr,
    sin_ptr,
    # sizes
    L,
    H,
    D,
    eps,
    # strides (b, h, l); the last dim is contiguous everywhere
    stride_qb,
    stride_qh,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_vb,
    stride_vh,
    stride_vl,
    stride_qob,
    stride_qoh,
    stride_qol,
    stride_kob,
    stride_koh,
    stride_kol,
    stride_vob,
    stride_voh,
    stride_vol,
    stride_cb,  # 0 when one table serves the whole batch
    stride_cl,
    # meta-parameters
    HAS_V: tl.constexpr,
    ROUND: tl.constexpr,
    EXACT_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_bl = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = pid_bl // L
    pid_l = pid_bl % L
    b64 = pid_b.to(tl.int64)
    l64 = pid_l.to(tl.int64)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D)
    h64 = offs_h.to(tl.int64)[:, None]

    # cos/sin row of this (b, l), shared by every head of the tile; padded pairs rotate by 0
    offs_j = tl.arange(0, BLOCK_D // 2)
    c_off = b64 * stride_cb + l64 * stride_cl + offs_j
    cos = tl.load(cos_ptr + c_off, mask=offs_j < D // 2, other=1.0)[None, :]
    sin = tl.load(sin_ptr + c_off, mask=offs_j < D // 2, other=0.0)[None, :]
    qw = _round_to(tl.load(qw_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32), ROUND, EXACT_BF16)
    kw = _round_to(tl.load(kw_ptr + offs_d, mask=offs_d < D, other=0.0).to(tl.float32), ROUND, EXACT_BF16)

    for which in tl.static_range(2):
        if which == 0:
            src = q_ptr + b64 * stride_qb + l64 * stride_ql + h64 * stride_qh + offs_d[None, :]
            dst = qo_ptr + b64 * stride_qob + l64 * stride_qol + h64 * stride_qoh + offs_d[None, :]
            w = qw
        else:
            src = k_ptr + b64 * stride_kb + l64 * stride_kl + h64 * stride_kh + offs_d[None, :]
            dst = ko_ptr + b64 * stride_kob + l64 * stride_kol + h64 * stride_koh + offs_d[None, :]
            w = kw
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        o = _norm_rope_rows(x, w, cos, sin, D, eps, ROUND, EXACT_BF16)
        tl.store(dst, o.to(dst.dtype.element_ty), mask=mask)

    if HAS_V:
        src = v_ptr + b64 * stride_vb + l64 * stride_vl + h64 * stride_vh + offs_d[None, :]
        dst = vo_ptr + b64 * stride_vob + l64 * stride_vol + h64 * stride_voh + offs_d[None, :]
        tl.store(dst, tl.load(src, mask=mask), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def rope_cos_sin(pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EmbedND's table pe (B|1, 1, L, D/2, 2, 2) fp32 -> (cos, sin), each (B|1, L, D/2) fp32 contiguous
    (cos = pe[..., 0, 0], sin = pe[..., 1, 0]). Computed once per forward, shared by all blocks."""
    if pe.ndim != 6 or pe.shape[1] != 1 or pe.shape[-2:] != (2, 2):
        raise ValueError(f"pe must be EmbedND's (B, 1, L, D/2, 2, 2) table, got shape {tuple(pe.shape)}")
    if pe.dtype != torch.float32:
        raise TypeError(f"pe must be float32 (EmbedND's dtype), got {pe.dtype}")
    return pe[:, 0, :, :, 0, 0].contiguous(), pe[:, 0, :, :, 1, 0].contiguous()


def joint_buffers(
    B: int, H: int, L: int, D: int, *, dtype: torch.dtype, device, with_v: bool = True
) -> tuple[torch.Tensor, ...]:
    """Allocate joint-sequence q/k(/v) buffers with physical layout (B, L, H, D), returned as (B, H, L, D) views."""
    n = 3 if with_v else 2
    return tuple(torch.empty(B, L, H, D, dtype=dtype, device=device).transpose(1, 2) for _ in range(n))


def _config(H: int, D: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps): tiles of about 2048 elements (16 heads of 128), 4 warps = 16 per thread."""
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(H), max(1, 2048 // block_d))
    return block_h, 4


def _check(q, k, q_weight, k_weight, cos, sin, v, out):
    """Validate the inputs; returns the normalized `out` tuple (or None)."""
    for name, t in (("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.ndim != 4:
        raise ValueError(f"q must be (B, H, L, D), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != q shape {tuple(q.shape)}")
    B, H, L, D = q.shape
    if q.dtype not in _DTYPES:
        raise TypeError(f"q dtype must be one of {_DTYPES}, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k dtype {k.dtype} != q dtype {q.dtype}")
    if D % 2 or D > MAX_HEAD_DIM or D == 0:
        raise ValueError(f"head dim D must be even and at most {MAX_HEAD_DIM}, got {D}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.shape != (D,):
            raise ValueError(f"{name} must be ({D},), got shape {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {w.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.ndim != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (L, D // 2):
            raise ValueError(f"{name} must be ({B} or 1, {L}, {D // 2}) for q {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32 (from rope_cos_sin), got {t.dtype}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(
            f"cos and sin must share shape and strides, got {tuple(cos.shape)}/{cos.stride()} "
            f"and {tuple(sin.shape)}/{sin.stride()}"
        )
    if v is not None:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a torch.Tensor or None, got {type(v).__name__}")
        if v.shape != q.shape or v.dtype != q.dtype:
            raise ValueError(f"v must match q {tuple(q.shape)} {q.dtype}, got {tuple(v.shape)} {v.dtype}")
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise ValueError(f"out must be a tuple (q_out, k_out) or (q_out, k_out, v_out), got {out!r:.80}")
        if len(out) == 3 and v is None:
            raise ValueError("out has a v_out entry but v is None: pass v to copy it")
        if len(out) == 2 and v is not None:
            raise ValueError("v is given but out has no v_out entry: pass out=(q_out, k_out, v_out)")
        for name, o in zip(("q_out", "k_out", "v_out"), out, strict=False):
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(o).__name__}")
            if o.shape != q.shape or o.dtype != q.dtype:
                raise ValueError(f"{name} must be {tuple(q.shape)} {q.dtype}, got {tuple(o.shape)} {o.dtype}")
        out = tuple(out)
    named = [("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight), ("cos", cos), ("sin", sin)]
    if v is not None:
        named.append(("v", v))
    if out is not None:
        named += list(zip(("q_out", "k_out", "v_out"), out, strict=False))
    for name, t in named:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    return out


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, *, eps=1e-6, v=None, out=None):
    """q, k: (B, H, L, D) bf16/fp16/fp32 views, any strides with the last dim contiguous (e.g. from
    _split_heads of the (B, L, 3*H*D) QKV output, or a column slice of single_blocks' linear1 output).
    q_weight, k_weight: (D,) RMSNorm scales. cos, sin: from rope_cos_sin, (B|1, L, D/2).
    Per (b, h, l) row: x = rms_norm(x) * weight (as the model: F.rms_norm result rounded to x.dtype,
    times weight rounded to x.dtype), then RoPE on adjacent pairs (2j, 2j+1) in fp32:
    (x0*cos - x1*sin, x0*sin + x1*cos), rounded once to x.dtype.
    out: optional tuple (q_out, k_out) or (q_out, k_out, v_out) of (B, H, L, D) tensors (any strides,
    last dim contiguous; e.g. slices [:, :, a:b] of a joint-sequence buffer) to write into; when v is
    given and out has 3 entries, v is copied into v_out in the same launch (the double-stream block's
    torch.cat of txt and img Q/K/V becomes two calls writing into one buffer).
    Without out, allocate q_out/k_out (and v_out when v is given) with physical layout (B, L, H, D)
    (returned as (B, H, L, D) views via .transpose(1, 2)): cuDNN SDPA allocates its output with q's
    layout, so the attention output's transpose(1, 2).flatten(2) becomes free.
    Returns (q_out, k_out) or (q_out, k_out, v_out)."""
    return _launch(q, k, q_weight, k_weight, cos, sin, eps=eps, v=v, out=out)


def _launch(q, k, q_weight, k_weight, cos, sin, *, eps=1e-6, v=None, out=None, block_h=None, num_warps=None):
    """qk_norm_rope with the tile (BLOCK_H heads per program) and warp count exposed for benchmarks."""
    out = _check(q, k, q_weight, k_weight, cos, sin, v, out)
    B, H, L, D = q.shape
    if out is None:
        out = joint_buffers(B, H, L, D, dtype=q.dtype, device=q.device, with_v=v is not None)
        if v is None:
            out = out[:2]
    if q.numel() == 0:
        return out
    default_h, default_w = _config(H, D)
    block_h = block_h or default_h
    num_warps = num_warps or default_w
    qo, ko = out[0], out[1]
    vv, vo = (v, out[2]) if v is not None else (q, qo)  # placeholders, never read without HAS_V
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    grid = (B * L, triton.cdiv(H, block_h))
    _qk_norm_rope_kernel[grid](
        q,
        k,
        vv,
        qo,
        ko,
        vo,
        q_weight,
        k_weight,
        cos,
        sin,
        L,
        H,
        D,
        float(eps),
        *(q.stride(0), q.stride(1), q.stride(2)),
        *(k.stride(0), k.stride(1), k.stride(2)),
        *(vv.stride(0), vv.stride(1), vv.stride(2)),
        *(qo.stride(0), qo.stride(1), qo.stride(2)),
        *(ko.stride(0), ko.stride(1), ko.stride(2)),
        *(vo.stride(0), vo.stride(1), vo.stride(2)),
        cb,
        cos.stride(1),
        HAS_V=v is not None,
        ROUND=_ROUND[q.dtype],
        EXACT_BF16=_INTERPRET,
        BLOCK_H=block_h,
        BLOCK_D=triton.next_power_of_2(D),
        num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------


def _pe_from_cos_sin(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B|1, L, D/2) cos, sin -> EmbedND's (B|1, 1, L, D/2, 2, 2) rotation matrices [[c, -s], [s, c]]."""
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).unsqueeze(1)


def _write(results, out):
    if out is None:
        return tuple(results)
    for o, r in zip(out, results, strict=True):
        o.copy_(r)
    return tuple(out)


def qk_norm_rope_ref(q, k, q_weight, k_weight, cos, sin, *, eps=1e-6, v=None, out=None):
    """The model's exact unfused ops: ``F.rms_norm(x, (D,), eps) * weight.to(x.dtype)`` (model.RMSNorm)
    then ``attention.apply_rope`` on the EmbedND table rebuilt from cos/sin. Same signature as
    ``qk_norm_rope``; writes into ``out`` when given (v copied into its third entry)."""
    from flux2_bench.attention import apply_rope

    out = _check(q, k, q_weight, k_weight, cos, sin, v, out)
    D = q.shape[-1]
    qn = F.rms_norm(q, (D,), eps=eps) * q_weight.to(q.dtype)
    kn = F.rms_norm(k, (D,), eps=eps) * k_weight.to(k.dtype)
    qr, kr = apply_rope(qn, kn, _pe_from_cos_sin(cos, sin))
    return _write((qr, kr) if v is None else (qr, kr, v), out)


def qk_norm_rope_fp32_ref(q, k, q_weight, k_weight, cos, sin, *, eps=1e-6, v=None, out=None):
    """Near-exact math for judging accuracy: norm, weight and rotation without intermediate roundings
    (computed in fp64, which is at least as exact as fp32; weight taken as given), one rounding to
    x.dtype at the end. Same signature as ``qk_norm_rope``."""
    out = _check(q, k, q_weight, k_weight, cos, sin, v, out)
    c, s = cos[:, None].double(), sin[:, None].double()  # (B|1, 1, L, D/2)

    def one(x, w):
        x64 = x.double()
        y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()
        y0, y1 = y[..., 0::2], y[..., 1::2]
        return torch.stack([y0 * c - y1 * s, y0 * s + y1 * c], dim=-1).flatten(-2).to(x.dtype)

    results = (one(q, q_weight), one(k, k_weight))
    return _write(results if v is None else (*results, v), out)
