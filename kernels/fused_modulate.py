"""Fused LayerNorm + modulate and SwiGLU (+ concat), each optionally writing FP8 for the next GEMM.

What
----
FLUX.2's blocks run a chain of memory-bound elementwise passes between GEMMs. Two kernels replace
them, one pass over the row each:

- ``norm_modulate(x, shift, scale)``: ``nn.LayerNorm`` without affine (eps 1e-6), then
  ``y * (1 + scale) + shift`` (``_modulate`` in ``flux2_bench/model.py``). Feeds ``qkv``,
  ``mlp.0``, ``linear1`` and the final layer.
- ``swiglu(x, prefix=...)``: ``silu(gate) * value`` over ``x = [gate | value]``, optionally written
  after a ``prefix`` (the single-stream block's ``cat((attn, mlp_act(mlp)), -1)``, the input of
  ``linear2``) without materializing the concatenation; ``prefix`` may be the attention output's
  (B, L, H, D) transpose view, so its ``flatten(2)`` copy goes away too.

With ``quant="row"`` / ``"block"`` the kernels write saturated e4m3 plus fp32 scales instead of the
x.dtype output, in exactly ``quantize_fp8``'s convention (``kernels/fp8_matmul.py``), which removes
the separate activation-quantize pass of the FP8 linear that follows.

Layouts and dtypes
------------------
- ``norm_modulate``: x (B, L, C) bf16/fp16/fp32, last dim contiguous (other strides free);
  shift, scale (B, 1, C), (1, 1, C) or (C,), any float dtype, any strides.
- ``swiglu``: x (..., 2F), last dim contiguous; prefix (B, L, P) or (B, L, H, D) with x (B, L, 2F),
  last dim contiguous, x's dtype.
- outputs are contiguous: (B, L, N) in x.dtype, or q (B, L, N) float8_e4m3fn with scales
  (B, L, 1) ("row") or (B, L, ceil(N/128)) ("block"), N = C or P + F.

Numerics (the model's unfused path, same roundings)
-----------------------------------------------------
Statistics and arithmetic in fp32, rounded to x.dtype where the unfused eager ops round: the
LayerNorm output; ``shift`` and ``scale`` cast to x.dtype; ``1 + scale``; the fma
``shift + y * (1 + scale)``; ``silu(gate)`` (``g / (1 + exp(-g))``, IEEE division, accurate exp as
torch's CUDA kernel); ``silu(gate) * value``. The quantized variants quantize those x.dtype-rounded
values, so ``norm_modulate(..., quant="row") == quantize_fp8(norm_modulate(...), "row")`` bit for
bit. Remaining differences from the eager ops are fp32 reduction-order ulps in the LayerNorm
statistics, which rarely move a bf16 rounding by one ulp.

Design and limits
-----------------
``norm_modulate``: one program per row; the whole (padded) row stays in registers as a (NB, 128)
tile, so the LayerNorm statistics and the row / 1x128 block amaxes come from one read. Rows longer
than 32768 elements (``MAX_ROW``) are refused with a ValueError (FLUX.2's longest LayerNorm row is
6144).

``swiglu`` processes each row in BLOCK-wide chunks (``SwigluConfig``; no padding to a power of two
beyond the last chunk, no SiLU evaluated on prefix chunks), so rows of any length are accepted:
quant=None and "block" (no reduction across 128-blocks) run one program per (row, chunk);
quant="row" runs persistent programs that make two passes over each row, the first for the row
amax, the second recomputing the values from the L2-resident inputs (or reloading them from a
per-program scratch row, ``use_tmp``) to quantize and store. The values are computed by the same
operations in every variant, so all of them give the same bits.

Triton's interpreter (CPU CI) mis-rounds fp32 -> bf16 and fp32 -> fp8 casts and has no libdevice;
under it (``EXACT_CAST``) the kernels round in integer / fp32 arithmetic and use ``tl.exp``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flux2_bench.kernels.fp8_matmul import _INTERPRET, QBLOCK, _check_device, _to_e4m3, quantize_fp8_ref

try:  # accurate expf (= torch's CUDA silu); Triton's tl.exp is ex2.approx-based
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old Triton
    libdevice = None

MAX_ROW = 32768  # longest output row kept in registers (== fp8_matmul's _ROW_SINGLE_PASS_MAX_K)
QUANT_MODES = (None, "row", "block")
_QUANT = {None: 0, "row": 1, "block": 2}
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACCURATE_EXP = libdevice is not None and not _INTERPRET


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_to(x, ROUND: tl.constexpr, EXACT_CAST: tl.constexpr):
    """Round fp32 ``x`` to the activation dtype and back to fp32 (what a store + reload gives).
    ROUND: 0 fp32 (no-op), 1 bf16, 2 fp16."""
    if ROUND == 1:
        if EXACT_CAST:  # interpreter: its fp32 -> bf16 cast truncates; round to nearest even by hand
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = x.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _store_row(
    v,  # (NB, QB) fp32 row values, already rounded to the activation dtype, 0 outside the row
    offs,
    mask,
    row,
    out_ptr,
    s_ptr,
    N,
    stride_sm,
    QUANT: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    NB: tl.constexpr,
):
    """Write one finished row: as is (QUANT 0), or as e4m3 + one scale (1) / one scale per 128 (2),
    with quantize_fp8's convention scale = max(amax, 1e-12) / 448, q = e4m3(clamp(v * (1/scale)))."""
    out_ptrs = out_ptr + row.to(tl.int64) * N + offs
    if QUANT == 0:
        tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)
    elif QUANT == 1:
        amax = tl.max(tl.max(tl.abs(v), axis=1), axis=0)
        scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
        tl.store(s_ptr + row.to(tl.int64) * stride_sm, scale)
        inv_scale = tl.math.div_rn(1.0, scale)
        tl.store(out_ptrs, _to_e4m3(v, inv_scale, EXACT_CAST), mask=mask)
    else:
        scale = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12) * (1.0 / 448.0)  # (NB,): one per 1x128
        offs_b = tl.arange(0, NB)
        tl.store(s_ptr + row.to(tl.int64) * stride_sm + offs_b, scale, mask=offs_b < tl.cdiv(N, 128))
        inv_scale = tl.math.div_rn(1.0, scale)[:, None]
        tl.store(out_ptrs, _to_e4m3(v, inv_scale, EXACT_CAST), mask=mask)


@triton.jit
def _norm_modulate_kernel(
    # pointers
    x_ptr,
    shift_ptr,
    scale_ptr,
    out_ptr,  # (M, C) x.dtype, or e4m3 when QUANT
    s_ptr,  # (M, 1) / (M, ceil(C/128)) fp32 scales when QUANT
    # sizes
    L,
    C,
    eps,
    # strides
    stride_xb,
    stride_xl,
    stride_shb,  # 0 when shift is shared by the batch
    stride_shc,
    stride_scb,
    stride_scc,
    stride_sm,
    # meta-parameters
    QUANT: tl.constexpr,  # 0 none, 1 row, 2 block (1x128)
    ROUND: tl.constexpr,  # activation dtype: 0 fp32, 1 bf16, 2 fp16
    EXACT_CAST: tl.constexpr,
    NB: tl.constexpr,  # the row is an (NB, QB) tile, NB * QB >= C
    QB: tl.constexpr,
):
    row = tl.program_id(0)  # = b * L + l
    b = (row // L).to(tl.int64)
    l_idx = (row % L).to(tl.int64)
    offs = tl.arange(0, NB)[:, None] * QB + tl.arange(0, QB)[None, :]
    mask = offs < C

    x = tl.load(x_ptr + b * stride_xb + l_idx * stride_xl + offs, mask=mask, other=0.0).to(tl.float32)
    # IEEE division (Triton's fp32 `/` is div.full, ~2 ulp): a constant row's mean is then exact, so its
    # LayerNorm output is exactly 0 (GPU run 2: `/` left y ~ 3e-5 there)
    mean = tl.math.div_rn(tl.sum(tl.sum(x, axis=1), axis=0), C * 1.0)
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.math.div_rn(tl.sum(tl.sum(xc * xc, axis=1), axis=0), C * 1.0)
    y = _round_to(xc * tl.math.rsqrt(var + eps), ROUND, EXACT_CAST)  # nn.LayerNorm's output

    shift = tl.load(shift_ptr + b * stride_shb + offs * stride_shc, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scb + offs * stride_scc, mask=mask, other=0.0).to(tl.float32)
    shift = _round_to(shift, ROUND, EXACT_CAST)
    scale1 = _round_to(1.0 + _round_to(scale, ROUND, EXACT_CAST), ROUND, EXACT_CAST)  # `1 + scale` in x.dtype
    v = _round_to(tl.fma(y, scale1, shift), ROUND, EXACT_CAST)  # torch.addcmul(shift, y, 1 + scale)
    v = tl.where(mask, v, 0.0)
    _store_row(v, offs, mask, row, out_ptr, s_ptr, C, stride_sm, QUANT, EXACT_CAST, NB)


@triton.jit
def _silu_mul(x_row, j, mask, F, ROUND: tl.constexpr, EXACT_CAST: tl.constexpr, ACCURATE_EXP: tl.constexpr):
    """silu(gate) * value at SwiGLU columns j (fp32, rounded where the eager ops round; 0 off mask)."""
    gate = tl.load(x_row + j, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(x_row + F + j, mask=mask, other=0.0).to(tl.float32)
    if ACCURATE_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    act = _round_to(tl.math.div_rn(gate, 1.0 + e), ROUND, EXACT_CAST)  # F.silu in x.dtype
    v = _round_to(act * value, ROUND, EXACT_CAST)
    return tl.where(mask, v, 0.0)


@triton.jit
def _swiglu_chunk(
    x_row,
    p_row,
    cols,  # (NB, QB) output columns c0 .. c0 + BLOCK - 1
    c0,
    F,
    P,
    stride_ph,
    HAS_PREFIX: tl.constexpr,
    PREFIX_D: tl.constexpr,
    ROUND: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    ACCURATE_EXP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Values of one chunk of the output row cat([prefix, silu(gate) * value]) in fp32, 0 past the
    row end. Chunks wholly inside the prefix skip the SiLU, chunks wholly past it skip the prefix."""
    if HAS_PREFIX:
        if c0 >= P:
            j = cols - P
            v = _silu_mul(x_row, j, j < F, F, ROUND, EXACT_CAST, ACCURATE_EXP)
        else:
            mask_p = cols < P
            p_offs = (cols // PREFIX_D).to(tl.int64) * stride_ph + cols % PREFIX_D
            v = tl.load(p_row + p_offs, mask=mask_p, other=0.0).to(tl.float32)
            if c0 + BLOCK > P:  # the chunk straddles the prefix end
                j = cols - P
                act = _silu_mul(x_row, j, (j >= 0) & (j < F), F, ROUND, EXACT_CAST, ACCURATE_EXP)
                v = tl.where(mask_p, v, act)
    else:
        v = _silu_mul(x_row, cols, cols < F, F, ROUND, EXACT_CAST, ACCURATE_EXP)
    return v


@triton.jit
def _swiglu_chunk_kernel(
    # pointers
    x_ptr,  # (B, L, 2F): [gate | value]
    p_ptr,  # prefix (B, L, H, D) (3-D: H = 1, D = P); unused without HAS_PREFIX
    out_ptr,  # (M, P + F) x.dtype, or e4m3 with QUANT 2
    s_ptr,  # (M, ceil((P + F) / 128)) fp32 block scales with QUANT 2
    # sizes
    L,
    F,
    P,  # prefix length per row (0 without prefix)
    n_chunks,  # cdiv(P + F, BLOCK)
    # strides
    stride_xb,
    stride_xl,
    stride_pb,
    stride_pl,
    stride_ph,
    stride_sm,
    # meta-parameters
    HAS_PREFIX: tl.constexpr,
    PREFIX_D: tl.constexpr,  # prefix's contiguous last dim (column j of the row is head j // D)
    QUANT: tl.constexpr,  # 0 none, 2 block (1x128); the row amax needs _swiglu_row_kernel
    ROUND: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    ACCURATE_EXP: tl.constexpr,
    NB: tl.constexpr,  # the chunk is an (NB, QB) tile, QB = 128 (one quantization block per tile row)
    QB: tl.constexpr,
):
    """One program per (row, BLOCK-wide chunk), chunks of a row adjacent in launch order: no
    reduction along the row, so every chunk is independent."""
    pid = tl.program_id(0)
    row = pid // n_chunks
    c0 = (pid % n_chunks) * (NB * QB)
    b = (row // L).to(tl.int64)
    l_idx = (row % L).to(tl.int64)
    N = P + F
    cols = c0 + tl.arange(0, NB)[:, None] * QB + tl.arange(0, QB)[None, :]
    x_row = x_ptr + b * stride_xb + l_idx * stride_xl
    p_row = p_ptr + b * stride_pb + l_idx * stride_pl
    v = _swiglu_chunk(
        x_row, p_row, cols, c0, F, P, stride_ph, HAS_PREFIX, PREFIX_D, ROUND, EXACT_CAST, ACCURATE_EXP, NB * QB
    )
    mask = cols < N
    out_ptrs = out_ptr + row.to(tl.int64) * N + cols
    if QUANT == 0:
        tl.store(out_ptrs, v.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        scale = tl.maximum(tl.max(tl.abs(v), axis=1), 1e-12) * (1.0 / 448.0)  # (NB,): one per 1x128
        offs_b = c0 // QB + tl.arange(0, NB)
        tl.store(s_ptr + row.to(tl.int64) * stride_sm + offs_b, scale, mask=offs_b < tl.cdiv(N, QB))
        inv_scale = tl.math.div_rn(1.0, scale)[:, None]
        tl.store(out_ptrs, _to_e4m3(v, inv_scale, EXACT_CAST), mask=mask)


@triton.jit
def _swiglu_row_kernel(
    # pointers
    x_ptr,
    p_ptr,
    out_ptr,  # (M, P + F) e4m3
    s_ptr,  # (M, 1) fp32 row scales
    tmp_ptr,  # (programs, P + F) x.dtype scratch, one row per program (USE_TMP)
    # sizes
    M,
    L,
    F,
    P,
    # strides
    stride_xb,
    stride_xl,
    stride_pb,
    stride_pl,
    stride_ph,
    # meta-parameters
    HAS_PREFIX: tl.constexpr,
    PREFIX_D: tl.constexpr,
    ROUND: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    ACCURATE_EXP: tl.constexpr,
    USE_TMP: tl.constexpr,  # pass 2 reloads pass 1's rounded values instead of recomputing them
    NB: tl.constexpr,
    QB: tl.constexpr,
):
    """quant="row": persistent programs, each loops over rows; per row, pass 1 runs over the chunks
    for the row amax, pass 2 recomputes each chunk from the (L2-resident) inputs, or reloads it from
    the program's scratch row, and stores e4m3."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    N = P + F
    offs = tl.arange(0, NB)[:, None] * QB + tl.arange(0, QB)[None, :]
    tmp_row = tmp_ptr + pid.to(tl.int64) * N
    for i in range(0, tl.cdiv(M - pid, n_prog)):
        row = pid + i * n_prog  # a tensor in compiled and interpreted code alike
        b = (row // L).to(tl.int64)
        l_idx = (row % L).to(tl.int64)
        x_row = x_ptr + b * stride_xb + l_idx * stride_xl
        p_row = p_ptr + b * stride_pb + l_idx * stride_pl
        m = tl.zeros((NB, QB), dtype=tl.float32)  # running elementwise |v| max: exact, order-free
        for c0 in range(0, N, NB * QB):
            cols = c0 + offs
            v = _swiglu_chunk(
                x_row, p_row, cols, c0, F, P, stride_ph, HAS_PREFIX, PREFIX_D, ROUND, EXACT_CAST, ACCURATE_EXP,
                NB * QB,
            )  # fmt: skip
            m = tl.maximum(m, tl.abs(v))
            if USE_TMP:
                tl.store(tmp_row + cols, v.to(tmp_ptr.dtype.element_ty), mask=cols < N)
        amax = tl.max(tl.max(m, axis=1), axis=0)
        scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
        tl.store(s_ptr + row.to(tl.int64), scale)
        inv_scale = tl.math.div_rn(1.0, scale)
        out_row = out_ptr + row.to(tl.int64) * N
        for c0 in range(0, N, NB * QB):
            cols = c0 + offs
            if USE_TMP:  # each thread reloads what it stored (same layout): no barrier needed
                v = tl.load(tmp_row + cols, mask=cols < N, other=0.0).to(tl.float32)
            else:
                v = _swiglu_chunk(
                    x_row, p_row, cols, c0, F, P, stride_ph, HAS_PREFIX, PREFIX_D, ROUND, EXACT_CAST, ACCURATE_EXP,
                    NB * QB,
                )  # fmt: skip
            tl.store(out_row + cols, _to_e4m3(v, inv_scale, EXACT_CAST), mask=cols < N)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _check_act(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _ROUND:
        raise TypeError(f"{name} must be bf16, fp16 or fp32, got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got shape {tuple(t.shape)} strides {t.stride()}")


def _check_quant(quant) -> None:
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")


def _check_fp8_store(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(
            f"quant= writes e4m3, which Triton supports on sm_89 or newer; "
            f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}. Use quant=None there."
        )


def _row_tile(n: int, what: str) -> tuple[int, int, int]:
    """(NB, QB, num_warps) for a row of n elements kept in registers as an (NB, QB) tile."""
    if n > MAX_ROW:
        raise ValueError(
            f"{what} rows of {n} elements exceed {MAX_ROW}, the longest row these kernels keep in registers"
        )
    nb = triton.next_power_of_2(math.ceil(n / QBLOCK))
    warps = 4 if nb * QBLOCK <= 4096 else (8 if nb * QBLOCK <= 16384 else 16)
    return nb, QBLOCK, warps


def _outputs(lead: tuple, n: int, dtype, device, quant):
    if quant is None:
        return torch.empty(*lead, n, device=device, dtype=dtype), None
    q = torch.empty(*lead, n, device=device, dtype=torch.float8_e4m3fn)
    s = torch.empty(*lead, 1 if quant == "row" else math.ceil(n / QBLOCK), device=device, dtype=torch.float32)
    return q, s


def _mod_view(t, name: str, B: int, C: int):
    """(batch stride, channel stride) of shift/scale broadcast to (B, 1, C)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point or t.dtype.itemsize < 2 or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"{name} must be a float tensor (bf16/fp16/fp32/fp64), got {t.dtype}")
    shape = (1,) * (3 - t.ndim) + tuple(t.shape) if 1 <= t.ndim <= 3 else None
    if shape is None or shape[2] != C or shape[1] != 1 or shape[0] not in (1, B):
        raise ValueError(f"{name} must have shape ({B}, 1, {C}), (1, 1, {C}) or ({C},), got {tuple(t.shape)}")
    stride_b = t.stride(0) if t.ndim == 3 and t.shape[0] > 1 else 0
    return stride_b, t.stride(-1)


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6, quant: str | None = None
):
    """LayerNorm over the last dim without affine (fp32 statistics), then y * (1 + scale) + shift.

    x: (B, L, C) bf16/fp16/fp32, last dim contiguous (other strides free).
    shift, scale: broadcastable to x as (B, 1, C) (also (1, 1, C) and (C,)), any float dtype.
    quant=None -> (B, L, C) tensor in x.dtype; "row" -> (q, s): q float8_e4m3fn (B, L, C)
    contiguous, s fp32 (B, L, 1), exactly ``quantize_fp8(out, "row")``'s convention; "block" ->
    s fp32 (B, L, ceil(C/128)), as ``quantize_fp8(out, "block")``."""
    _check_act(x, "x")
    _check_quant(quant)
    if x.ndim != 3 or x.shape[-1] == 0:
        raise ValueError(f"x must be (B, L, C) with C > 0, got shape {tuple(x.shape)}")
    B, L, C = x.shape
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    sh_b, sh_c = _mod_view(shift, "shift", B, C)
    sc_b, sc_c = _mod_view(scale, "scale", B, C)
    nb, qb, warps = _row_tile(C, "norm_modulate")
    _check_device(x, shift, scale)
    if quant is not None:
        _check_fp8_store(x.device)
    out, s = _outputs((B, L), C, x.dtype, x.device, quant)
    if B * L > 0:
        _norm_modulate_kernel[(B * L,)](
            x, shift, scale, out, out if s is None else s,
            L, C, float(eps),
            x.stride(0), x.stride(1), sh_b, sh_c, sc_b, sc_c, 0 if s is None else s.shape[-1],
            QUANT=_QUANT[quant], ROUND=_ROUND[x.dtype], EXACT_CAST=_INTERPRET, NB=nb, QB=qb, num_warps=warps,
        )  # fmt: skip
    return out if quant is None else (out, s)


class SwigluConfig(NamedTuple):
    """Launch parameters of swiglu (performance only: every choice gives the same bits).

    block: chunk width (a multiple of 128, power of two); warps: num_warps; programs_per_sm:
    persistent programs per SM of the quant="row" kernel (bounds the rows in flight, hence the
    L2 footprint between its two passes); use_tmp: pass 2 of "row" reloads pass 1's values from a
    per-program scratch row instead of recomputing the SiLU."""

    block: int = 2048
    warps: int = 4
    programs_per_sm: int = 4
    use_tmp: bool = False


# Defaults per quant mode: the fastest swept configs on the >= 4096-row FLUX.2-dev cases (H100 run 2,
# reports/fused_modulate/README.md): "row" reloads pass 1's values (0.31 vs 0.36 ms recomputing).
SWIGLU_CONFIGS = {
    None: SwigluConfig(block=2048, warps=4),
    "row": SwigluConfig(block=4096, warps=8, programs_per_sm=4, use_tmp=True),
    "block": SwigluConfig(block=2048, warps=4),
}
_INTERPRET_CONFIG = SwigluConfig(block=128, warps=4, programs_per_sm=1, use_tmp=False)
_SM_COUNT: dict = {}


def _num_programs(device: torch.device, per_sm: int) -> int:
    if device.type != "cuda":
        return 3 * per_sm  # interpreter: a few programs, each looping over several rows
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx] * per_sm


def swiglu(x: torch.Tensor, *, prefix: torch.Tensor | None = None, quant: str | None = None):
    """SwiGLU on the last dim: x (..., 2F) = [gate | value] -> silu(gate) * value, (..., F).

    prefix: optional (B, L, P) or (B, L, H, D) tensor (any strides, last dim contiguous, x's dtype;
    e.g. ``o.transpose(1, 2)`` of an SDPA (B, H, L, D) result) with x (B, L, 2F), written first:
    out = cat([prefix.flatten(2), silu(gate) * value], -1), (B, L, P + F), without materializing
    the cat. quant None / "row" / "block": as ``norm_modulate`` (the row amax covers the whole
    concatenated row). Rows of any length (processed in chunks)."""
    return _swiglu(x, prefix=prefix, quant=quant)


def _swiglu(x, *, prefix=None, quant=None, config: SwigluConfig | None = None):
    """swiglu with explicit launch parameters (benchmarks and tests sweep them)."""
    _check_act(x, "x")
    _check_quant(quant)
    if x.ndim < 1 or x.shape[-1] == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even, non-empty last dim [gate | value], got shape {tuple(x.shape)}")
    F2 = x.shape[-1]
    Fh = F2 // 2
    if prefix is None:
        lead = tuple(x.shape[:-1])
        x3 = x.reshape(1, -1, F2) if x.ndim != 3 else x
        P, D, p_strides = 0, 1, (0, 0, 0)
    else:
        _check_act(prefix, "prefix")
        if x.ndim != 3:
            raise ValueError(f"with a prefix, x must be (B, L, 2F), got shape {tuple(x.shape)}")
        if prefix.ndim not in (3, 4) or tuple(prefix.shape[:2]) != tuple(x.shape[:2]):
            raise ValueError(
                f"prefix must be (B, L, P) or (B, L, H, D) with (B, L) = {tuple(x.shape[:2])}, "
                f"got shape {tuple(prefix.shape)}"
            )
        if prefix.dtype != x.dtype:
            raise TypeError(f"prefix dtype {prefix.dtype} differs from x dtype {x.dtype}")
        lead, x3 = tuple(x.shape[:2]), x
        D = prefix.shape[-1]
        P = D * (prefix.shape[2] if prefix.ndim == 4 else 1)
        p_strides = (prefix.stride(0), prefix.stride(1), prefix.stride(2) if prefix.ndim == 4 else 0)
    N = P + Fh
    _check_device(x, prefix)
    if config is None:
        config = _INTERPRET_CONFIG if _INTERPRET else SWIGLU_CONFIGS[quant]
    block = config.block
    if block < QBLOCK or block & (block - 1):
        raise ValueError(f"config.block must be a power of two >= {QBLOCK}, got {block}")
    block = min(block, max(QBLOCK, triton.next_power_of_2(N)))  # short rows: one chunk, no idle lanes
    if quant is not None:
        _check_fp8_store(x.device)
    out, s = _outputs(lead, N, x.dtype, x.device, quant)
    B, L = x3.shape[0], x3.shape[1]
    M = B * L
    if M == 0 or N == 0:
        return out if quant is None else (out, s)
    p = x3 if prefix is None else prefix
    meta = dict(
        HAS_PREFIX=prefix is not None, PREFIX_D=D, ROUND=_ROUND[x.dtype], EXACT_CAST=_INTERPRET,
        ACCURATE_EXP=_ACCURATE_EXP, NB=block // QBLOCK, QB=QBLOCK, num_warps=config.warps,
    )  # fmt: skip
    if quant == "row":
        n_prog = min(M, _num_programs(x.device, config.programs_per_sm))
        tmp = torch.empty(n_prog, N, device=x.device, dtype=x.dtype) if config.use_tmp else out
        _swiglu_row_kernel[(n_prog,)](
            x3, p, out, s, tmp, M, L, Fh, P, x3.stride(0), x3.stride(1), *p_strides,
            USE_TMP=config.use_tmp, **meta,
        )  # fmt: skip
    else:
        n_chunks = triton.cdiv(N, block)
        _swiglu_chunk_kernel[(M * n_chunks,)](
            x3, p, out, out if s is None else s, L, Fh, P, n_chunks,
            x3.stride(0), x3.stride(1), *p_strides, 0 if s is None else s.shape[-1],
            QUANT=_QUANT[quant], **meta,
        )  # fmt: skip
    return out if quant is None else (out, s)


# ----------------------------------------------------------------------------------------------
# Pure-torch references (same signatures): the model's unfused eager ops
# ----------------------------------------------------------------------------------------------


def _quant_ref(out, quant):
    if quant is None:
        return out
    q, s = quantize_fp8_ref(out, quant)
    return q.contiguous(), s


def norm_modulate_ref(x, shift, scale, *, eps=1e-6, quant=None):
    """``_modulate(nn.LayerNorm(x), shift, scale)`` as the model runs it (shift/scale cast to
    x.dtype), then ``quantize_fp8_ref``."""
    _check_quant(quant)
    y = F.layer_norm(x, (x.shape[-1],), eps=eps)
    out = torch.addcmul(shift.to(x.dtype), y, 1 + scale.to(x.dtype))
    return _quant_ref(out, quant)


def swiglu_ref(x, *, prefix=None, quant=None):
    """``SiLUActivation`` (``F.silu(gate) * value``), ``torch.cat`` after ``prefix.flatten(2)``,
    then ``quantize_fp8_ref``."""
    _check_quant(quant)
    gate, value = x.chunk(2, dim=-1)
    out = F.silu(gate) * value
    if prefix is not None:
        out = torch.cat((prefix.flatten(2), out), dim=-1)
    return _quant_ref(out, quant)
