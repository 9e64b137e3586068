"""4-bit weight GEMM (W4A16): ``out = x @ W^T`` with bf16 activations and 4-bit weights.

The weights stay packed in global memory; each program loads a ``BLOCK_N x BLOCK_K/2`` tile of bytes,
turns it into bf16 in registers inside the K loop and feeds ``tl.dot`` (bf16 MMA, fp32 accumulation).
Nothing of W is ever written back to memory in 16 bits.

Formats (layouts fixed, shared with ``quantize/``):

``int4-g128``
    ``qweight`` uint8 ``[N, K/2]``: byte ``j`` of row ``n`` holds element ``2j`` in the HIGH nibble and
    ``2j+1`` in the LOW nibble; nibble = ``q + 8`` with ``q`` in ``[-8, 7]``.
    ``scales`` bf16 ``[N, K/group_size]`` (group_size 128);  ``w[n, k] = (nibble - 8) * scales[n, k // 128]``.
``nf4`` (bitsandbytes layout as diffusers stores it, ``blocksize`` 64)
    The ``[N, K]`` weight flattened row-major in blocks of 64 consecutive elements, two codes per byte with
    the even element in the HIGH nibble: viewed as uint8 ``[N, K/2]`` it is the same packing as above.
    ``absmax`` fp32 ``[N*K/64]`` (or ``[N, K/64]``), ``code`` fp32[16] = bitsandbytes' NF4 codebook
    (``NF4_CODE``); ``w[n, k] = code[nibble] * absmax[n, k // 64]``.  A double-quantized absmax
    (uint8 + nested absmax/offset) must be dequantized to fp32 by the caller before the GEMM.

Dequantization, constexpr modes (autotuned; measurements in ``reports/int4_matmul``):

* ``LUT_MODE=0``: per nibble.  int4 uses the float magic-number trick (``bits(0x4B000000 | v) - (2^23 + 8)``
  is ``v - 8`` exactly, no slow int->float convert); nf4 gathers ``code[nibble]`` with ``tl.load`` (slow on
  sm_90: the pipeliner turns those gathers into per-element cp.async copies).  High and low halves are
  interleaved back to K order with ``tl.join``.
* ``LUT_MODE=1`` (nf4): a 256-entry table of (code[hi], code[lo]) fp32 pairs; one 8-byte ``ld.global.nc``
  gather per byte, issued as inline PTX with bf16 activations so the pipeliner leaves it alone.
* ``LUT_MODE=2`` (int4, bf16 activations and scales): PTX bf16x2 (prmt/lop3/fma.rn.bf16x2), ~2
  instructions per element, results bit-identical to the fp32 path.

``SWAP_AB`` computes ``out^T = W x^T`` so the dequantized weight is the register (A) operand of the MMA
and x the shared-memory operand; otherwise x is A and the dequantized weight goes through shared memory.

Epilogue (optional, fused): ``residual + gate * out`` with ``gate`` of shape ``(N,)``; either may be given
alone.  The ``*_ref`` beside the kernel has the same signature and semantics.

Interpreter note (TRITON_INTERPRET=1): bf16 arithmetic is broken there, so every load is converted to
fp32 right away and tests feed fp16/fp32 activations; the dot then runs in the activation dtype.  On a GPU
with fp32 activations ``tl.dot`` uses TF32.

``dequantize_4bit`` writes the bf16 weight into a (reusable) buffer for "dequantize, then cuBLAS" on
large-M GEMMs, where the fused kernel does not hide its dequantization (see the report).

The pack/unpack helpers at the end are small torch references with exact inverses used by the tests;
``quantize/formats.py`` owns the canonical converters.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from flux2_bench.quantize.formats import NF4_CODE as _NF4_CODE_TENSOR

# bitsandbytes' NF4 codebook (fp32 values), kept once in quantize/formats.py: the converter writes it
# and this kernel reads it as a tuple of Python floats (a hashable key for the cached device table).
NF4_CODE = tuple(_NF4_CODE_TENSOR.tolist())

FORMATS = ("int4-g128", "nf4")
_DEFAULT_GROUP = {"int4-g128": 128, "nf4": 64}


# LUT_MODE=2 int4 dequantization, 4 packed bytes per instance (Triton's pack=4): $4 holds bytes b0..b3 (b0 in
# the low byte), $5/$6 the row scale as bf16x2.  prmt spreads bytes to [b, 0, b', 0]; masking a nibble into
# each 16-bit half and OR-ing 0x4300 gives the bf16 value 128 + v exactly; fma(t, 1, -136) = v - 8 (exact);
# fma(t, scale, -0) rounds the product once, like the fp32 reference's single cast to bf16.
# Outputs: $0/$1 = high-nibble elements (of bytes 0,1 / 2,3), $2/$3 = low-nibble elements.  fma.rn.bf16x2 is
# sm_80+, so the path also runs on sm_89 / sm_120.
_INT4_BF16X2_ASM = tl.constexpr("""
{
.reg .b32 z, m, c, one, n136, nz, d0, d1, t;
mov.b32 z, 0;
mov.b32 m, 0x000F000F;
mov.b32 c, 0x43004300;
mov.b32 one, 0x3F803F80;
mov.b32 n136, 0xC308C308;
mov.b32 nz, 0x80008000;
prmt.b32 d0, $4, z, 0x4140;
prmt.b32 d1, $4, z, 0x4342;
shr.b32 t, d0, 4;
lop3.b32 t, t, m, c, 0xEA;
fma.rn.bf16x2 t, t, one, n136;
fma.rn.bf16x2 $0, t, $5, nz;
shr.b32 t, d1, 4;
lop3.b32 t, t, m, c, 0xEA;
fma.rn.bf16x2 t, t, one, n136;
fma.rn.bf16x2 $1, t, $6, nz;
lop3.b32 t, d0, m, c, 0xEA;
fma.rn.bf16x2 t, t, one, n136;
fma.rn.bf16x2 $2, t, $5, nz;
lop3.b32 t, d1, m, c, 0xEA;
fma.rn.bf16x2 t, t, one, n136;
fma.rn.bf16x2 $3, t, $6, nz;
}
""")


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _int4_matmul_kernel(
    # pointers
    x_ptr,
    w_ptr,
    s_ptr,
    lut_ptr,
    out_ptr,
    res_ptr,
    gate_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    stride_rm,
    # meta-parameters
    IS_NF4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    LUT_MODE: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ("swizzled") program order: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows/columns wrap around instead of masking, so the K loop's loads stay unmasked and vectorized;
    # the store is masked.  K is a multiple of BLOCK_K (BLOCK_K divides the group size, K a multiple of it).
    offs_xm = tl.max_contiguous(tl.multiple_of(offs_m % M, BLOCK_M), BLOCK_M).to(tl.int64)
    offs_wn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2)

    x_ptrs = x_ptr + offs_xm[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_wn[:, None] * stride_wn + offs_kb[None, :]
    s_ptrs = s_ptr + offs_wn * stride_sn
    dot_dtype = x_ptr.dtype.element_ty

    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k in range(0, K // BLOCK_K):
        x = tl.load(x_ptrs)
        packed = tl.load(w_ptrs)  # uint8 [BLOCK_N, BLOCK_K/2]
        # One scale per row for the whole tile: BLOCK_K divides GROUP_SIZE (checked by the launcher).
        scale_raw = tl.load(s_ptrs + (k * BLOCK_K) // GROUP_SIZE)
        # LUT_MODE=2 (PTX) only for int4 with bf16 activations and bf16 scales; anything else takes LUT_MODE=0.
        if (LUT_MODE == 2) and (not IS_NF4) and (dot_dtype == tl.bfloat16) and (s_ptr.dtype.element_ty == tl.bfloat16):
            # int4 in packed bf16x2 PTX: 2 instructions per element instead of ~7 (scaled, bf16 out).
            scale_b = tl.broadcast_to(scale_raw[:, None], (BLOCK_N, BLOCK_K // 2))
            hi_b, lo_b = tl.inline_asm_elementwise(
                _INT4_BF16X2_ASM,
                "=r,=r,=r,=r,r,r,r",
                [packed, scale_b],
                dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=4,
            )
            w = tl.join(hi_b, lo_b).reshape(BLOCK_N, BLOCK_K)
        else:
            scale = scale_raw.to(tl.float32)
            if LUT_MODE == 1:
                # Byte -> (code[hi], code[lo]) fp32 pair table (2 KB, L1-resident): one 8-byte gather per byte.
                pair_ptrs = lut_ptr + packed.to(tl.int32) * 2
                if dot_dtype == tl.bfloat16:
                    # Through PTX so the software pipeliner does not turn the gather into per-element cp.async
                    # copies to shared memory (what it does with a tl.load here).
                    hi_f, lo_f = tl.inline_asm_elementwise(
                        "ld.global.nc.v2.f32 {$0, $1}, [$2];",
                        "=r,=r,l",
                        [pair_ptrs.to(tl.int64, bitcast=True)],
                        dtype=(tl.float32, tl.float32),
                        is_pure=True,
                        pack=1,
                    )
                else:
                    hi_f = tl.load(pair_ptrs)
                    lo_f = tl.load(pair_ptrs + 1)
            else:
                hi = (packed >> 4).to(tl.int32)
                lo = (packed & 0xF).to(tl.int32)
                if IS_NF4:
                    # The 16-entry codebook sits after the 256 x 2 pair table in the same buffer.
                    hi_f = tl.load(lut_ptr + 512 + hi)
                    lo_f = tl.load(lut_ptr + 512 + lo)
                else:
                    # 0x4B000000 is 2^23 as fp32: OR-ing a 4-bit v into its mantissa gives 2^23 + v exactly.
                    hi_f = (hi | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                    lo_f = (lo | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            w = tl.join(hi_f * scale[:, None], lo_f * scale[:, None]).reshape(BLOCK_N, BLOCK_K).to(dot_dtype)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // 2

    if SWAP_AB:
        acc = tl.trans(acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_GATE:
        gate = tl.load(gate_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc * gate[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Autotune configs and pruning
# ----------------------------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages, lut, swap, group_m=8):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "LUT_MODE": lut, "SWAP_AB": swap},
        num_warps=warps,
        num_stages=stages,
    )


# Hopper-class shared memory (~227 KB): BLOCK_M is the reuse factor of each dequantized weight tile, so 256
# halves the dequantization work per FLOP relative to 128 (run 1: 256x128 beat 128x256 by 1.4x); the 4-warp
# 128x128 tile leaves room for two CTAs per SM, whose dequantization can overlap each other's MMA.
_TILES_LARGE_SMEM = [(256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 4, 3)]
# Ada / consumer Blackwell (~99 KB): smaller tiles and fewer stages.
_TILES_SMALL_SMEM = [(128, 128, 64, 8, 2), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4)]
# LUT_MODE 0 for both formats; 1 (pair table) is the nf4 alternative, 2 (PTX bf16x2) the int4 one.
CONFIGS = [_cfg(*t, lut, swap) for t in _TILES_LARGE_SMEM + _TILES_SMALL_SMEM for lut in (0, 1, 2) for swap in (0, 1)]


def _smem_bytes(meta: dict, num_stages: int) -> int:
    """Shared memory estimate: pipelined x and packed-W tiles, plus the dequantized W tile when it is the
    shared-memory MMA operand (SWAP_AB=0)."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    per_stage = bm * bk * 2 + bn * bk // 2
    extra = 0 if meta["SWAP_AB"] else bn * bk * 2
    return num_stages * per_stage + extra


@functools.cache
def _max_smem(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _prune(configs: list, group_size: int, smem_limit: int, is_nf4: bool | None = None) -> list:
    """Keep configs whose BLOCK_K divides the quantization group and whose shared memory fits; on large-smem
    GPUs (sm_90/sm_100, >= 200 KB) only the large tiles are tried, the small ones are the sm_89/sm_120 set.
    LUT_MODE 1 is kept for nf4 only and 2 for int4 only (elsewhere they would repeat LUT_MODE 0)."""
    tiles = set(_TILES_LARGE_SMEM if smem_limit >= 200 * 1024 else _TILES_SMALL_SMEM)
    kept = []
    for c in configs:
        m = c.kwargs
        tile = (m["BLOCK_M"], m["BLOCK_N"], m["BLOCK_K"], c.num_warps, c.num_stages)
        if is_nf4 is not None and m["LUT_MODE"] == (2 if is_nf4 else 1):
            continue
        if tile in tiles and group_size % m["BLOCK_K"] == 0 and _smem_bytes(m, c.num_stages) <= smem_limit:
            kept.append(c)
    return kept or [_cfg(64, 64, 64, 4, 2, 0, 0)]  # never leave the autotuner empty; fits everywhere


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` hook: reads the format, the group size and the device's shared-memory limit."""
    group = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    is_nf4 = bool(kwargs.get("IS_NF4", named_args.get("IS_NF4")))
    return _prune(configs, group, _max_smem(named_args["x_ptr"].device.index or 0), is_nf4)


_int4_matmul_autotuned = triton.autotune(
    configs=CONFIGS,
    key=["M", "N", "K", "IS_NF4", "GROUP_SIZE", "HAS_RESIDUAL", "HAS_GATE"],
    prune_configs_by={"early_config_prune": prune_configs},
)(_int4_matmul_kernel)

# Interpreter runs are per program x iteration: one small config (dot shapes >= 16) keeps CPU tests fast.
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4, "LUT_MODE": 0, "SWAP_AB": 0}


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _lut(code_key: tuple[float, ...], device: str) -> torch.Tensor:
    """fp32[528]: the byte -> (code[hi], code[lo]) pair table (256 x 2, LUT_MODE=1) followed by code[16]
    (LUT_MODE=0).  One buffer serves both modes, so LUT_MODE can be an autotuned meta-parameter."""
    code = torch.tensor(code_key, dtype=torch.float32)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1).flatten()
    return torch.cat([pairs, code]).to(device)


_INT4_CODE = tuple(float(v) for v in range(-8, 8))  # nibble - 8


def _lut_from_code(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`_lut` for a caller-supplied codebook, built on `device` with tensor ops: no host sync (reading a GPU
    codebook with .tolist() stalls the stream on every call). Pass code=None for the standard NF4 table."""
    c = code.to(device=device, dtype=torch.float32).flatten()
    byte = torch.arange(256, device=device)
    return torch.cat([torch.stack([c[byte >> 4], c[byte & 0xF]], dim=1).flatten(), c])


def _check_inputs(x, qweight, scales, fmt, code, group_size, residual, gate, out_dtype):
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if group_size is None:
        group_size = _DEFAULT_GROUP[fmt]
    if group_size != _DEFAULT_GROUP[fmt]:
        raise ValueError(f"fmt={fmt!r} needs group_size={_DEFAULT_GROUP[fmt]}, got {group_size}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be bf16/fp16/fp32, got {x.dtype}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight must be a 2-D uint8 [N, K/2] tensor, got {qweight.dtype} {tuple(qweight.shape)}")
    n, k_half = qweight.shape
    k = x.shape[-1]
    if k != 2 * k_half:
        raise ValueError(f"x has K={k} but qweight {tuple(qweight.shape)} packs K={2 * k_half}")
    if k % group_size:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size} for fmt={fmt!r}")
    groups = k // group_size
    if fmt == "nf4":
        if scales.dtype not in (torch.float32, torch.float16):
            raise TypeError(
                f"nf4 absmax must be fp32 or fp16 (dequantize double-quantized absmax first), got {scales.dtype}"
            )
        if scales.numel() != n * groups:
            raise ValueError(f"nf4 absmax has {scales.numel()} elements, expected N*K/64 = {n * groups}")
        scales = scales.reshape(n, groups)
        if code is not None and code.numel() != 16:
            raise ValueError(f"code must have 16 entries, got {code.numel()}")
    else:
        if scales.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"int4 scales must be bf16/fp16/fp32, got {scales.dtype}")
        if tuple(scales.shape) != (n, groups):
            raise ValueError(f"int4 scales have shape {tuple(scales.shape)}, expected (N, K/128) = {(n, groups)}")
        if code is not None:
            raise ValueError("code is only used with fmt='nf4'")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")
    out_shape = (*x.shape[:-1], n)
    if residual is not None:
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)}, expected {out_shape}")
        if not residual.is_contiguous() or residual.device != x.device:
            raise ValueError(f"residual must be contiguous on {x.device}")
    if gate is not None and (tuple(gate.shape) != (n,) or not gate.is_contiguous() or gate.device != x.device):
        raise ValueError(f"gate must be a contiguous ({n},) tensor on {x.device}, got {tuple(gate.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out_dtype must be bf16/fp16/fp32, got {out_dtype}")
    return scales, code, group_size


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    fmt: str = "int4-g128",
    code: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``out = x @ W^T`` (optionally ``residual + gate * out``) with W 4-bit packed as described above.

    x: ``(..., K)`` bf16 (fp16/fp32 accepted); qweight uint8 ``[N, K/2]``; scales: int4 bf16 ``[N, K/128]``
    or nf4 fp32 absmax ``[N*K/64]``; code: nf4 codebook fp32[16] (default ``NF4_CODE``).
    group_size defaults to 128 (int4-g128) / 64 (nf4).  ``config`` forces the meta-parameters
    (BLOCK_M/N/K, GROUP_M, LUT_MODE, SWAP_AB, optional num_warps/num_stages) instead of autotuning.
    """
    scales, code, group_size = _check_inputs(x, qweight, scales, fmt, code, group_size, residual, gate, out_dtype)
    n, k = qweight.shape[0], x.shape[-1]
    out_shape = (*x.shape[:-1], n)
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        raise ValueError(f"x must be contiguous in its last dim, got stride {x.stride()}")
    m = x2.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out.reshape(out_shape)
    res2 = residual.reshape(m, n) if residual is not None else out
    if fmt != "nf4":
        lut = _lut(_INT4_CODE, str(x.device))
    elif code is None:
        lut = _lut(NF4_CODE, str(x.device))
    else:
        lut = _lut_from_code(code, x.device)
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" or x.device.type != "cuda"
    if config is None and interpret:
        config = _INTERPRET_CONFIG
    meta = dict(config) if config is not None else {}
    if meta and group_size % meta["BLOCK_K"]:
        raise ValueError(f"BLOCK_K={meta['BLOCK_K']} must divide group_size={group_size}")
    args = (x2, qweight, scales, lut, out, res2, gate if gate is not None else out, m, n, k)
    args += (x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), res2.stride(0))
    flags = dict(
        IS_NF4=fmt == "nf4",
        GROUP_SIZE=group_size,
        HAS_RESIDUAL=residual is not None,
        HAS_GATE=gate is not None,
    )
    if meta:
        grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _int4_matmul_kernel[grid](*args, **flags, **meta)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _int4_matmul_autotuned[grid](*args, **flags)
    return out.reshape(out_shape)


# ----------------------------------------------------------------------------------------------------------
# Stand-alone dequantization (for "dequantize into a reused bf16 scratch, then cuBLAS" on large-M GEMMs)
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dequantize_4bit_kernel(
    w_ptr,
    s_ptr,
    lut_ptr,
    out_ptr,
    N,
    stride_wn,
    stride_sn,
    stride_on,
    IS_NF4: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Memory-bound: reads 0.5 byte and writes 2 bytes per element; one (BLOCK_N, BLOCK_K) tile per program.
    # BLOCK_K may span several scale groups (GROUPS > 1): wider tiles write longer contiguous row segments.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    offs_kb = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(w_ptr + offs_n64[:, None] * stride_wn + offs_kb[None, :], mask=mask_n[:, None], other=0)
    hi = (packed >> 4).to(tl.int32)
    lo = (packed & 0xF).to(tl.int32)
    if IS_NF4:
        hi_f = tl.load(lut_ptr + 512 + hi)
        lo_f = tl.load(lut_ptr + 512 + lo)
    else:
        hi_f = (hi | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        lo_f = (lo | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    if GROUPS > 1:  # a scale per (row, group): the packed tile viewed as (BLOCK_N, GROUPS, GROUP_SIZE / 2) bytes
        offs_g = pid_k * GROUPS + tl.arange(0, GROUPS)
        scale = tl.load(s_ptr + offs_n64[:, None] * stride_sn + offs_g[None, :], mask=mask_n[:, None], other=0.0)
        scale = scale.to(tl.float32)[:, :, None]
        hi_f = (hi_f.reshape(BLOCK_N, GROUPS, GROUP_SIZE // 2) * scale).reshape(BLOCK_N, BLOCK_K // 2)
        lo_f = (lo_f.reshape(BLOCK_N, GROUPS, GROUP_SIZE // 2) * scale).reshape(BLOCK_N, BLOCK_K // 2)
    else:  # the tile lies in one group
        scale = tl.load(s_ptr + offs_n64 * stride_sn + (pid_k * BLOCK_K) // GROUP_SIZE, mask=mask_n, other=0.0)
        scale = scale.to(tl.float32)[:, None]
        hi_f = hi_f * scale
        lo_f = lo_f * scale
    w = tl.join(hi_f, lo_f).reshape(BLOCK_N, BLOCK_K)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    o_ptrs = out_ptr + offs_n64[:, None] * stride_on + offs_k[None, :]
    tl.store(o_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask_n[:, None])


def _check_weight(qweight, scales, fmt, code, group_size):
    """Validation shared by dequantize_4bit / dequantize_4bit_ref: reuses the GEMM checks with a 1-row x."""
    x = torch.empty(1, 2 * qweight.shape[-1] if qweight.dim() == 2 else 0, device=qweight.device)
    return _check_inputs(x, qweight, scales, fmt, code, group_size, None, None, torch.bfloat16)


def _dequant_tile(k: int, group: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of ``_dequantize_4bit_kernel`` on the GPU: the widest BLOCK_K up to 512 that divides K and
    holds whole scale groups (or lies in one), 16 KB of bf16 output per program. Wider rows of output per program
    moved more bytes per second (reports/int4_matmul/probe_dequant_tiles.md); 64 x 64 was the tile until session 19."""
    for bk in (512, 256, 128, 64, 32):
        if k % bk == 0 and (bk % group == 0 or group % bk == 0):
            return 8192 // bk, bk
    return 64, 64  # unreachable for valid weights: K is a multiple of the group (checked), and groups are >= 32


def dequantize_4bit(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    fmt: str = "int4-g128",
    code: torch.Tensor | None = None,
    group_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed 4-bit weight -> ``[N, K]`` bf16 (or ``out``'s dtype), same formats as ``int4_matmul``.  Pass
    ``out`` (a reused scratch buffer) to avoid an allocation per call; then ``F.linear(x, out)``."""
    scales, code, group_size = _check_weight(qweight, scales, fmt, code, group_size)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if out is None:
        out = torch.empty(n, k, device=qweight.device, dtype=torch.bfloat16)
    elif tuple(out.shape) != (n, k) or not out.is_contiguous() or out.device != qweight.device:
        raise ValueError(f"out must be a contiguous ({n}, {k}) tensor on {qweight.device}, got {tuple(out.shape)}")
    if fmt == "nf4":
        lut = _lut(NF4_CODE, str(qweight.device)) if code is None else _lut_from_code(code, qweight.device)
    else:
        lut = out  # unused by the int4 path
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1" or qweight.device.type != "cuda"
    block_n, block_k = (32, 64) if interpret else _dequant_tile(k, group_size)
    grid = (triton.cdiv(n, block_n), k // block_k)
    _dequantize_4bit_kernel[grid](
        qweight, scales, lut, out, n, qweight.stride(0), scales.stride(0), out.stride(0),
        IS_NF4=fmt == "nf4", GROUP_SIZE=group_size, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def dequantize_4bit_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    fmt: str = "int4-g128",
    code: torch.Tensor | None = None,
    group_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch ``dequantize_4bit``: fp32 dequantization, one cast."""
    scales, code, group_size = _check_weight(qweight, scales, fmt, code, group_size)
    w = unpack_nf4(qweight, scales, code) if fmt == "nf4" else unpack_int4_g128(qweight, scales, group_size)
    if out is None:
        return w.to(torch.bfloat16)
    return out.copy_(w)


# ----------------------------------------------------------------------------------------------------------
# Pure-torch reference and pack/unpack helpers (exact inverses; quantize/formats.py owns the canonical ones)
# ----------------------------------------------------------------------------------------------------------
def _unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int64 nibbles [N, K], even element from the high nibble."""
    q = qweight.to(torch.int64)
    return torch.stack([q >> 4, q & 0xF], dim=-1).flatten(-2)


def _pack_nibbles(nib: torch.Tensor) -> torch.Tensor:
    """int nibbles [N, K] in [0, 15] -> uint8 [N, K/2], even element in the high nibble."""
    nib = nib.to(torch.uint8)
    return (nib[:, 0::2] << 4) | nib[:, 1::2]


def unpack_int4_g128(qweight: torch.Tensor, scales: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """Dequantize int4-g128 to fp32 [N, K]: ``(nibble - 8) * scales[n, k // group_size]``."""
    q = (_unpack_nibbles(qweight) - 8).to(torch.float32)
    return q * scales.to(torch.float32).repeat_interleave(group_size, dim=1)


def pack_int4_g128(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per (row, group of 128): scale = absmax / 7 rounded to bf16, q = clamp(round(w / scale),
    -8, 7).  Returns (qweight uint8 [N, K/2], scales bf16 [N, K/group_size])."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} must be a multiple of group_size={group_size}")
    wg = w.to(torch.float32).reshape(n, k // group_size, group_size)
    scales = (wg.abs().amax(dim=-1) / 7.0).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.round(wg / scales.to(torch.float32)[..., None]).clamp(-8, 7).reshape(n, k)
    return _pack_nibbles(q.to(torch.int64) + 8), scales


def unpack_nf4(qweight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize nf4 (bitsandbytes layout, blocksize 64) to fp32 [N, K]: ``code[nibble] * absmax[block]``."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    code = torch.tensor(NF4_CODE) if code is None else code.to(torch.float32)
    vals = code.to(qweight.device)[_unpack_nibbles(qweight)]
    blocks = absmax.numel() // n
    return (vals.reshape(n, blocks, k // blocks) * absmax.reshape(n, blocks, 1).to(torch.float32)).reshape(n, k)


def pack_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bitsandbytes-style NF4: absmax per block of ``blocksize`` consecutive row-major elements, nearest code of
    ``w / absmax``.  Returns (qweight uint8 [N, K/2], absmax fp32 [N*K/blocksize], code fp32[16])."""
    n, k = w.shape
    if k % blocksize:
        raise ValueError(f"K={k} must be a multiple of blocksize={blocksize}")
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    wb = w.to(torch.float32).reshape(-1, blocksize)
    absmax = wb.abs().amax(dim=-1)
    normed = wb / absmax.clamp_min(1e-12)[:, None]
    # Nearest code by midpoints (as bitsandbytes' kernel does); O(numel) memory, fine for 55296 x 6144 on a GPU.
    nib = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).reshape(n, k)
    return _pack_nibbles(nib), absmax, code


def int4_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    fmt: str = "int4-g128",
    code: torch.Tensor | None = None,
    group_size: int | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Pure-torch ``int4_matmul``: dequantize to fp32, fp32 matmul, epilogue in fp32, cast.  ``config`` is
    accepted for signature parity and ignored."""
    scales, code, group_size = _check_inputs(x, qweight, scales, fmt, code, group_size, residual, gate, out_dtype)
    if fmt == "nf4":
        w = unpack_nf4(qweight, scales, code)
    else:
        w = unpack_int4_g128(qweight, scales, group_size)
    out = x.to(torch.float32) @ w.T
    if gate is not None:
        out = out * gate.to(torch.float32)
    if residual is not None:
        out = out + residual.to(torch.float32)
    return out.to(out_dtype)
