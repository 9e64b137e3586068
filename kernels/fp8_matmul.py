"""FP8 (e4m3) GEMM with fused activation quantization, and a weight-only FP8 path.

What
----
``fp8_gemm(a, b, a_scale, b_scale)`` computes ``out = (a_scale * a) @ (b_scale * b).T`` with
fp32 accumulation, optionally followed by FLUX.2's gated residual ``out = residual + gate * out``.
``quantize_fp8`` turns bf16 activations into saturated e4m3 plus fp32 scales in one kernel;
``fp8_linear`` is quantize + GEMM on a bf16 input (what ``QuantLinear`` calls);
``fp8_weight_only_linear`` keeps bf16 activations and decodes e4m3 weights in registers for GPUs
without FP8 tensor cores (sm_80/86).

Layouts and dtypes
------------------
- ``a``: (M, K) ``torch.float8_e4m3fn`` activations, K contiguous.
- ``b``: (N, K) ``torch.float8_e4m3fn`` weights, K contiguous (``nn.Linear.weight`` layout).
- ``out``: (M, N) bf16 (or fp16 / fp32); ``residual``: (M, N); ``gate``: (N,) or (1, N).

Scale granularity (decided from the scale shapes; all scales fp32, "dequantized = fp8 * scale")
----------------------------------------------------------------------------------------------
==========  =======================================  ========================================
name        a_scale                                  b_scale
==========  =======================================  ========================================
tensor      scalar (shape () or (1,))                scalar
row         (M,) or (M, 1) (or scalar: static)       (N,), (N, 1) or (1, N) (or scalar)
block       (M, ceil(K/128)): 1x128 per row          (ceil(N/128), ceil(K/128)): 128x128
==========  =======================================  ========================================

Quantization convention (bit-exact between kernel and ``*_ref`` on GPU):
``scale = max(amax, 1e-12) * fp32(1/448)``, ``q = e4m3(clamp(x * (1 / scale), -448, 448))`` with
round-to-nearest-even. A multiply, not ``amax / 448``: on the H100 torch's ``t / 448.0`` differed from
IEEE division in the last bit for some rows, while a multiply by an fp32 constant is the same
everywhere (CPU, CUDA, Triton). Saturating *before* the cast matters: e4m3fn has no infinity, and an
unclamped 500 becomes NaN.

Notes
-----
- Block scaling multiplies each 128-wide K slice's partial product by its scales inside the K
  loop ("promotion" in DeepGEMM's words), so BLOCK_K must divide 128.
- Triton's interpreter (CPU CI) mis-rounds fp32 -> fp8 casts; under it the kernels round to e4m3
  in fp32 arithmetic first (``EXACT_CAST``), which the cast then keeps exactly. On GPU the cast
  instruction (cvt.rn.satfinite) does the rounding.
- The weight-only kernel loads weights as uint8 and decodes e4m3 bits arithmetically, so it needs
  no fp8 support from Triton or the GPU.

Dispatch (measured on the H100, reports/fp8_matmul)
---------------------------------------------------
- fp8 A (``fp8_gemm``, unfused ``fp8_linear``) on sm_90 with 16-byte-aligned rows: a persistent TMA
  kernel (one program per SM walking the tiles; block scales with BLOCK_N = 128). Elsewhere (sm_89,
  sm_120, unaligned rows) and for quantization fused into the A load: the classic tiled kernel.
  ``PERSISTENT`` (env ``FLUX2_FP8_PERSISTENT``, default 1) switches the persistent kernel; it is never
  autotuned with the CUDA-graph timer, the pair that left output columns unwritten inside the
  FLUX.2-dev forward (reports/quant_runtime, run 3 and diag_persistent_bisect).
- Block scales with fast accumulation on sm_90 (fp8 A, TMA-aligned rows, bf16 / fp16 output): the Gluon
  kernel of ``fp8_block_rescale_sm90``, which keeps the wgmma chain across K in units of the current K block's
  scale and rescales the accumulator between blocks (128 x 256 tiles, 4 stages). ``BLOCK_RESCALE``, env
  ``FLUX2_FP8_BLOCK_RESCALE``, default 1.
- Other block scales on sm_90 (``fast_accum=False``, fp32 output): the Gluon warp-specialized kernel of
  ``fp8_block_gemm_sm90`` (promotion of each K block in fp32; ``BLOCK_GLUON``, env ``FLUX2_FP8_BLOCK_GLUON``,
  default 1), except on fewer than two waves of 128 x 128 tiles with K >= 12288, where stream-K below wins.
- Row scales with fast accumulation and a 2-byte output on sm_90: the Gluon warp-specialized kernel of
  ``fp8_row_gemm_sm90``, same bits as the persistent kernel (``_row_gluon_options``). From 1024 rows:
  cooperative 128 x 256 tiles, 4 stages, subtiled epilogue, prefetched scales (1.010x the persistent kernel
  on M >= 4096, reports/fp8_matmul/probe_row_epilogue.py); below 1024 rows with N >= 16384 (FLUX.2's txt.qkv
  and txt.mlp_in): 128 x 128 tiles, 6 stages (1.05-1.13x, probe_row_ws.md). ``ROW_GLUON``, env
  ``FLUX2_FP8_ROW_GLUON``, default 1. Other shapes below 1024 rows keep the persistent kernel (as fast).
- Stream-K (persistent kernel, ``STREAM_K`` configs): for block scales and promoted accumulation
  on tile counts that leave a partial last wave (FLUX.2's M = 512 text GEMMs), lanes of programs per
  row of tiles share that row's N x K iterations and fix up split tiles through an fp32 workspace
  (``_streamk_buffers``, 17.3 MB per device and stream on an H100). Row/tensor scales with fast
  accumulation keep whole tiles: their output bits do not depend on the autotuner's tile choice.
- Autotuning times GPU time alone (``_queued_gpu_time``: launches queued behind a sleep kernel);
  ``FLUX2_AUTOTUNE_QUEUED=0`` selects Triton's eager timer.
- Launches: after the first launch of a specialization, the compiled kernel's launcher is called
  directly (``FAST_LAUNCH``, env ``FLUX2_FAST_LAUNCH``, default 1), skipping Triton's autotuner and
  binder in Python.
- ``fp8_weight_only_linear``: on sm_90 with bf16 activations, the Gluon kernel ``fp8_weight_only_sm90`` for
  every M (e4m3 decoded in registers, bf16 MMA; 0.96-1.02x bf16 cuBLAS at M >= 4096 and 0.82-0.98x at
  M = 512, reports/fp8_weight_only run 6). Elsewhere M < ``WO_DEQUANT_MIN_M`` (1024) runs the Triton fused
  kernel, and M >= 1024 ``dequantize_fp8_weight`` (one Triton pass, e4m3 * scale -> x's dtype, rounded once)
  then cuBLAS (``F.linear``), with the gate and residual applied in torch. That path rounds w * scale to
  bf16 once per weight (relative 2^-9) where the fused kernels apply per-tensor / per-channel scales
  in fp32 after the MMA, and it holds a bf16 copy of the weight during the call.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

FP8_MAX = 448.0
AMAX_EPS = 1e-12  # all-zero rows get a tiny positive scale instead of 0/0
QBLOCK = 128  # block-scaling granularity along K (and N for weights)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ROW_SINGLE_PASS_MAX_K = 32768  # rows up to this (padded) length are quantized from registers in one pass
WO_DEQUANT_MIN_M = 1024  # weight-only: from this many rows on, dequantize to bf16 + cuBLAS (measured)
# weight-only, bf16 activations on the GPU: decode e4m3 with 4-byte PTX (``_e4m3_bits_to_bf16``) rather
# than Triton's 16-bit integer ops; a module global so benchmarks can A/B both in one process
WO_ASM_DECODE = os.environ.get("FLUX2_WO_ASM_DECODE", "1") == "1"
# weight-only on sm_90 with bf16 activations: the Gluon warp-specialized kernel (fp8_weight_only_sm90) below
# WO_SM90_MAX_M rows, i.e. every M (FLUX2_WO_SM90=0: the Triton fused kernel / dequantize + cuBLAS as on other
# GPUs). Measured on the H100, bf16 cuBLAS time / ours by A/B (reports/fp8_weight_only): run 1 (uint8 decode)
# 0.69-0.75x at M = 512 against the Triton fused kernel's 0.57-0.63x, and 0.77-0.85x at M >= 4096 against
# dequantize + cuBLAS's 0.91-0.93x, hence a limit of 1024 rows until run 6; run 6 (the uint16-pair decode)
# 0.96-1.02x at M >= 4096 (dequantize + cuBLAS: 0.90-0.95x) and, with stream-K where it pays
# (fp8_weight_only_sm90.use_stream_k), 0.82-0.98x at M = 512.
WO_SM90 = os.environ.get("FLUX2_WO_SM90", "1") == "1"
WO_SM90_MAX_M = 1 << 62
# fp8 A on sm_90: the persistent TMA kernel. Off by default: inside the FLUX.2-dev forward (run 3 of
# reports/quant_runtime) the model's output fell to 24 dB / 13 dB SQNR (fp8-row unfused / fp8-tensor)
# against 37 dB with the classic kernel, while every config pinned alone was exact. Reproduced by
# reports/quant_runtime/diag_persistent_pattern.py: after other shapes were autotuned (graph timer),
# 4096x36864x6144 leaves the last third of the output columns unwritten, as if N were 24576. Bisected
# (reports/quant_runtime/diag_persistent_bisect): it needs this kernel AND the CUDA-graph autotune timer;
# with the eager timer the same sequence is exact. Cause not found (stale TMA descriptor suspected), so
# the graph timer is refused while this kernel is on. Default on since session 4: with the eager timer,
# the FLUX.2-dev fp8-row forward gives the classic kernel's bits exactly, at the same step time within
# noise (reports/quant_runtime/fp8_launch_ab_run*.json), and the GEMM alone is 1.01-1.04x the classic
# kernel (reports/fp8_matmul, runs 5 and 6). FLUX2_FP8_PERSISTENT=0 turns it off.
PERSISTENT = os.environ.get("FLUX2_FP8_PERSISTENT", "1") == "1"
# Block scales on sm_90: the Gluon warp-specialized kernel (kernels/fp8_block_gemm_sm90.py, ordered
# consumers, promotion after the wait); env FLUX2_FP8_BLOCK_GLUON=0 keeps the Triton kernels.
BLOCK_GLUON = os.environ.get("FLUX2_FP8_BLOCK_GLUON", "1") == "1"
# Block scales with fast accumulation on sm_90 (2-byte outputs): the Gluon kernel with a rescaled accumulator
# (kernels/fp8_block_rescale_sm90.py, 128 x 256 tiles); env FLUX2_FP8_BLOCK_RESCALE=0 keeps the promotion kernel
# for them too.
BLOCK_RESCALE = os.environ.get("FLUX2_FP8_BLOCK_RESCALE", "1") == "1"
# Row scales on sm_90 for M < 1024 and N >= 16384: the Gluon warp-specialized kernel
# (kernels/fp8_row_gemm_sm90.py); env FLUX2_FP8_ROW_GLUON=0 keeps the Triton kernels.
ROW_GLUON = os.environ.get("FLUX2_FP8_ROW_GLUON", "1") == "1"
# Autotuning timer: eager do_bench (what the model-level runs verified) unless FLUX2_AUTOTUNE_GRAPH=1,
# which `_autotune_bench` ignores while PERSISTENT is on (that pair gives wrong outputs: see above).
_AUTOTUNE_GRAPH = os.environ.get("FLUX2_AUTOTUNE_GRAPH", "0") == "1"
_AUTOTUNE_QUEUED = os.environ.get("FLUX2_AUTOTUNE_QUEUED", "1") == "1"  # see _queued_gpu_time
if _AUTOTUNE_GRAPH and PERSISTENT:
    warnings.warn(
        "FLUX2_AUTOTUNE_GRAPH=1 is ignored while the persistent FP8 GEMM is on (the default; "
        "FLUX2_FP8_PERSISTENT=0 turns it off): autotuning it with the CUDA-graph timer gave wrong outputs "
        "(reports/quant_runtime/README.md); using the eager timer",
        RuntimeWarning,
        stacklevel=2,
    )

SCALE_TENSOR, SCALE_ROW, SCALE_BLOCK = 0, 1, 2
_GRANULARITY = {"tensor": SCALE_TENSOR, "row": SCALE_ROW, "block": SCALE_BLOCK}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3(x):
    """Round fp32 ``x`` (already within +-448) to the nearest e4m3 value, ties to even, in fp32.

    Adding then subtracting c = 1.5 * 2^(e-3+23) rounds |x| to a multiple of 2^(e-3), the e4m3
    spacing of x's binade (e = exponent of x, at least -6: subnormals share the spacing 2^-9)."""
    bits = x.to(tl.int32, bitcast=True)
    exp = tl.maximum((bits >> 23) & 0xFF, 127 - 6)
    c = (((exp - 3 + 23) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = ((tl.abs(x) + c) - c).to(tl.int32, bitcast=True)
    return (r | (bits & -0x80000000)).to(tl.float32, bitcast=True)  # copy the sign bit, -0 included


@triton.jit
def _to_e4m3(x, inv_scale, EXACT_CAST: tl.constexpr):
    """fp32 -> saturated e4m3: x * (1/scale), clamp to +-448, round to nearest even."""
    y = tl.minimum(tl.maximum(x * inv_scale, -448.0), 448.0)
    if EXACT_CAST:
        y = _round_to_e4m3(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _quantize_fp8_kernel(
    # pointers
    x_ptr,
    q_ptr,
    s_ptr,
    # sizes
    M,
    K,
    # strides
    stride_xm,
    stride_qm,
    stride_sm,
    # meta-parameters
    GRANULARITY: tl.constexpr,  # 0 tensor (s_ptr holds the given scale), 1 row, 2 block (1x128)
    STORE_Q: tl.constexpr,  # False: only write the row scales (dynamic per-tensor, fused GEMM path)
    SINGLE_PASS: tl.constexpr,  # row: BLOCK_K >= K, the whole row stays in registers
    EXACT_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,  # == 128 for block granularity
):
    """Row granularity: program = BLOCK_M rows. Tensor / block: program = one BLOCK_M x BLOCK_K tile
    of a 2-D grid (no reduction along K, so every tile is independent: more loads in flight)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm

    if GRANULARITY == 1:
        if SINGLE_PASS:
            offs_k = tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (offs_k[None, :] < K)
            x = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) * (1.0 / 448.0)
            tl.store(s_ptr + offs_m * stride_sm, scale, mask=mask_m)
            if STORE_Q:
                inv_scale = tl.math.div_rn(1.0, scale)[:, None]
                tl.store(q_rows + offs_k[None, :], _to_e4m3(x, inv_scale, EXACT_CAST), mask=mask)
        else:
            # pass 1: row amax; pass 2 re-reads the rows (from L2) to quantize them
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask = mask_m[:, None] & (offs_k[None, :] < K)
                x = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
            tl.store(s_ptr + offs_m * stride_sm, scale, mask=mask_m)
            if STORE_Q:
                inv_scale = tl.math.div_rn(1.0, scale)[:, None]
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    mask = mask_m[:, None] & (offs_k[None, :] < K)
                    x = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
                    tl.store(q_rows + offs_k[None, :], _to_e4m3(x, inv_scale, EXACT_CAST), mask=mask)
    else:
        pid_k = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (offs_k[None, :] < K)
        x = tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        if GRANULARITY == 2:
            scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) * (1.0 / 448.0)
            tl.store(s_ptr + offs_m * stride_sm + pid_k, scale, mask=mask_m)
            inv_scale = tl.math.div_rn(1.0, scale)[:, None]
        else:
            inv_scale = tl.math.div_rn(1.0, tl.load(s_ptr))
        tl.store(q_rows + offs_k[None, :], _to_e4m3(x, inv_scale, EXACT_CAST), mask=mask)


@triton.jit
def _tile_pids(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-tiles share each B column-tile while it sits in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fp8_gemm_kernel(
    # pointers
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    res_ptr,
    gate_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_rm,
    stride_rn,
    stride_gn,
    stride_asm,  # 0 when a per-tensor scale is broadcast over rows
    stride_ask,
    stride_bsn,  # 0 when a per-tensor scale is broadcast over columns
    stride_bsk,
    # meta-parameters
    SCALE_MODE: tl.constexpr,  # 0 tensor, 1 row x channel, 2 block (1x128 act, 128x128 weight)
    A_BF16: tl.constexpr,  # A is bf16/fp16/fp32: quantized to e4m3 in registers with a_scale
    PROMOTE: tl.constexpr,  # tensor/row: add each BLOCK_K partial product to acc in fp32 (precise)
    HAS_RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_pids(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows/columns wrap around instead of being masked: loads stay in bounds and unmasked,
    # the store below drops them.
    offs_am = offs_m % M
    offs_bn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_bn.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk

    if SCALE_MODE != 2:
        a_s = tl.load(a_scale_ptr + offs_am * stride_asm)
        b_s = tl.load(b_scale_ptr + offs_bn * stride_bsn)
    if A_BF16:  # noqa: SIM102 (nested constexpr ifs: no BoolOp in the kernel language needed)
        if SCALE_MODE != 2:
            inv_a = tl.math.div_rn(1.0, a_s)[:, None]

    if SCALE_MODE == 2:
        tl.static_assert(128 % BLOCK_K == 0)
        if A_BF16:  # fused block quantization takes each 1x128 activation scale from one tile
            tl.static_assert(BLOCK_K == 128)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if A_BF16:
            a = a.to(tl.float32)
            if SCALE_MODE == 2:
                # the 1x128 activation scale of this K slice comes from the tile itself: no pre-pass
                a_amax = tl.max(tl.abs(a), axis=1)
                a_sb = tl.maximum(a_amax, 1e-12) * (1.0 / 448.0)
                inv_a = tl.math.div_rn(1.0, a_sb)[:, None]
            a = _to_e4m3(a, inv_a, EXACT_CAST)
        if SCALE_MODE == 2:
            kb = (k * BLOCK_K) // 128
            if not A_BF16:
                a_sb = tl.load(a_scale_ptr + offs_am * stride_asm + kb * stride_ask)
            b_sb = tl.load(b_scale_ptr + (offs_bn // 128) * stride_bsn + kb * stride_bsk)
            acc += tl.dot(a, b) * (a_sb[:, None] * b_sb[None, :])
        elif PROMOTE:
            # Hopper's FP8 MMA accumulates with reduced precision (Triton's default on sm_90, like
            # `_scaled_mm(use_fast_accum=True)`); a fresh MMA per K step added in fp32 avoids it.
            acc += tl.dot(a, b)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue: scales, FLUX.2 gated residual, cast, masked store.
    if SCALE_MODE != 2:
        acc = acc * (a_s[:, None] * b_s[None, :])
    mask_n = offs_n < N
    if HAS_GATE:
        g = tl.load(gate_ptr + offs_n * stride_gn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * g[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _persistent_k_range(acc, a_desc, b_desc, off_m, off_n, pid_n, k_lo, k_hi, sa_ptrs, b_scale_ptr,
                        stride_ask, stride_bsn, stride_bsk,
                        SCALE_MODE: tl.constexpr, PROMOTE: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """``acc`` plus the tile's product over K steps [k_lo, k_hi) (TMA loads, fp8 wgmma)."""
    for ki in range(k_lo, k_hi):
        a = a_desc.load([off_m, ki * BLOCK_K])
        b = b_desc.load([off_n, ki * BLOCK_K])
        if SCALE_MODE == 2:
            # promotion: this 128-wide K slice's product scaled by its 1x128 and 128x128 scales
            a_sb = tl.load(sa_ptrs + ki * stride_ask)
            b_sb = tl.load(b_scale_ptr + pid_n * stride_bsn + ki * stride_bsk)
            acc += tl.dot(a, b.T) * (a_sb * b_sb)[:, None]
        elif PROMOTE:
            acc += tl.dot(a, b.T)
        else:
            acc = tl.dot(a, b.T, acc)
    return acc


@triton.jit
def _epilogue_math(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr,
                   stride_rm, stride_rn, stride_gn, stride_asm, stride_bsn,
                   SCALE_MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr):  # fmt: skip
    """``residual + gate * (a_scale * b_scale * acc)`` for output rows ``offs_m`` and columns ``offs_n``
    (tensor / row scales; block scales were applied in the K loop)."""
    mask_m = offs_m < M
    mask_n = offs_n < N
    if SCALE_MODE != 2:
        a_s = tl.load(a_scale_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)
        b_s = tl.load(b_scale_ptr + offs_n * stride_bsn, mask=mask_n, other=0.0)
        acc = acc * (a_s[:, None] * b_s[None, :])
    if HAS_GATE:
        g = tl.load(gate_ptr + offs_n * stride_gn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * g[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    return acc


@triton.jit
def _persistent_epilogue(acc, c_desc, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr, pid_m, pid_n, M, N,
                         stride_rm, stride_rn, stride_gn, stride_asm, stride_bsn,
                         SCALE_MODE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
                         EPILOGUE_SUBTILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Scales, FLUX.2 gated residual, cast and TMA store of one finished output tile."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _epilogue_math(acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr,
                         stride_rm, stride_rn, stride_gn, stride_asm, stride_bsn, SCALE_MODE, HAS_RESIDUAL, HAS_GATE)  # fmt: skip
    out_ty = c_desc.dtype
    if EPILOGUE_SUBTILE:
        # two half-width stores: half the shared-memory staging buffer, one more pipeline stage
        acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc0.to(out_ty))
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], acc1.to(out_ty))
    else:
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(out_ty))


@triton.jit
def _tile_offsets(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets of a row-major BLOCK_M x BLOCK_N tile (a stream-K workspace slot)."""
    return tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]


@triton.jit
def _streamk_first_cta(it, W, n):
    """The program (of ``n`` sharing W stream-K iterations) whose share holds iteration ``it``;
    program j owns [j * W // n, (j + 1) * W // n)."""
    return ((it + 1) * n + W - 1) // W - 1


@triton.jit
def _fp8_gemm_persistent_kernel(
    # tensor descriptors (TMA on sm_90) and pointers
    a_desc,  # (M, K) e4m3, block [BLOCK_M, BLOCK_K]
    b_desc,  # (N, K) e4m3, block [BLOCK_N, BLOCK_K]
    c_desc,  # (M, N) out, block [BLOCK_M, BLOCK_N // (2 if EPILOGUE_SUBTILE else 1)]
    a_scale_ptr,
    b_scale_ptr,
    res_ptr,
    gate_ptr,
    c_ptr,  # the output again, for the stream-K fixup's row-chunk stores
    ws_ptr,  # stream-K: fp32 partial tiles, 2 * NUM_SMS slots of BLOCK_M * BLOCK_N
    cnt_ptr,  # stream-K: int32 arrival counters, one per tile, zero between launches
    # sizes
    M,
    N,
    K,
    # strides
    stride_cm,
    stride_rm,
    stride_rn,
    stride_gn,
    stride_asm,
    stride_ask,
    stride_bsn,
    stride_bsk,
    # meta-parameters
    SCALE_MODE: tl.constexpr,  # 0 tensor, 1 row x channel, 2 block (needs BLOCK_N == BLOCK_K == 128)
    PROMOTE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    C_BYTES: tl.constexpr,  # output element size: autotune key (the staging tile's shared memory)
    NUM_SMS: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
    STREAM_K: tl.constexpr,
    FIX_ROWS: tl.constexpr,  # stream-K fixup chunk height
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Same maths as ``_fp8_gemm_kernel`` for fp8 A, as a persistent kernel (one program per SM
    walking the tiles, Triton tutorial 09): TMA loads (no address arithmetic, out-of-bounds rows and
    K columns read as zeros), the flattened tile loop lets the next tile's loads start during this
    tile's epilogue, and the output goes out through a TMA store (clipped at the edges).

    STREAM_K (stream-K, Osama et al. 2023, along N x K within each row of tiles): for tile counts that
    leave a partial last wave (txt.qkv at M = 512: 576 tiles of 128x128 on 132 SMs run as 5 waves for
    4.4 waves of work), every program gets an equal share of its row's K iterations instead of whole
    tiles. A program that ends inside a tile stores its fp32 partial tile in ``ws_ptr`` and counts
    itself in that tile's counter; the last to arrive adds the partials, runs the epilogue and zeroes
    the counter for the next launch. No program waits for another. The autotuner offers it to the
    two-accumulator kernels only (``_prune_persistent``)."""
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    if SCALE_MODE == 2:
        tl.static_assert(BLOCK_N == 128 and BLOCK_K == 128)
    if not STREAM_K:  # data-parallel: whole tiles, one per program and wave
        tile_id_c = start_pid - NUM_SMS  # the epilogue recomputes its tile: shorter live ranges
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_pids(tile_id, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            sa_ptrs = a_scale_ptr + ((off_m + tl.arange(0, BLOCK_M)) % M) * stride_asm  # block scales
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _persistent_k_range(acc, a_desc, b_desc, off_m, pid_n * BLOCK_N, pid_n, 0, k_tiles, sa_ptrs,
                                      b_scale_ptr, stride_ask, stride_bsn, stride_bsk, SCALE_MODE, PROMOTE, BLOCK_K)  # fmt: skip
            tile_id_c += NUM_SMS
            pid_m, pid_n = _tile_pids(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
            _persistent_epilogue(acc, c_desc, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr, pid_m, pid_n, M, N,
                                 stride_rm, stride_rn, stride_gn, stride_asm, stride_bsn,
                                 SCALE_MODE, HAS_RESIDUAL, HAS_GATE, EPILOGUE_SUBTILE, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        # One lane of NUM_SMS // num_pid_m programs per row of tiles (the autotuner's pruning keeps
        # stream-K where the rows divide the SMs; otherwise the leftover programs idle), each lane
        # sharing its row's num_pid_n * k_tiles iterations out evenly, N-tile major.
        # Program j of every lane covers the same (pid_n, K) range at the same time, so the weight
        # slices, the big operand at M = 512, are read from HBM once and from L2 by the other lanes
        # (a tile-major split over all programs read them once per row of tiles: 2x slower, run 8).
        lane_size = NUM_SMS // num_pid_m
        pid_m = start_pid % num_pid_m
        j = start_pid // num_pid_m
        W = num_pid_n * k_tiles
        first = (j * W) // lane_size
        it = first
        end = ((j + 1) * W) // lane_size
        off_m = pid_m * BLOCK_M
        sa_ptrs = a_scale_ptr + ((off_m + tl.arange(0, BLOCK_M)) % M) * stride_asm
        while (it < end) & (j < lane_size):
            pid_n = it // k_tiles
            k_lo = it - pid_n * k_tiles
            k_hi = tl.minimum(k_tiles, k_lo + end - it)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _persistent_k_range(acc, a_desc, b_desc, off_m, pid_n * BLOCK_N, pid_n, k_lo, k_hi, sa_ptrs,
                                      b_scale_ptr, stride_ask, stride_bsn, stride_bsk, SCALE_MODE, PROMOTE, BLOCK_K)  # fmt: skip
            whole = (k_lo == 0) & (k_hi == k_tiles)
            if not whole:
                # slot 2p holds program p's first share, 2p + 1 its last (a program has at most two partials)
                slot = 2 * start_pid + (it != first).to(tl.int32)
                tl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + _tile_offsets(BLOCK_M, BLOCK_N), acc)
                tl.debug_barrier()  # every thread's partial is written before the counter says so
                j_lo = _streamk_first_cta(pid_n * k_tiles, W, lane_size)
                j_hi = _streamk_first_cta(pid_n * k_tiles + k_tiles - 1, W, lane_size)
                t = pid_m * num_pid_n + pid_n
                arrived = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel", scope="gpu")
                if arrived == j_hi - j_lo:
                    # the last share of this tile to arrive adds all partials (its own included) in
                    # FIX_ROWS-row chunks: loading whole partials into the MMA layout spilled registers
                    for r0 in tl.static_range(0, BLOCK_M, FIX_ROWS):
                        tot = tl.zeros((FIX_ROWS, BLOCK_N), dtype=tl.float32)
                        chunk = r0 * BLOCK_N + _tile_offsets(FIX_ROWS, BLOCK_N)
                        for jj in range(j_lo, j_hi + 1):
                            p_slot = 2 * (jj * num_pid_m + pid_m) + ((jj * W) // lane_size < pid_n * k_tiles).to(
                                tl.int32
                            )
                            tot += tl.load(ws_ptr + p_slot * (BLOCK_M * BLOCK_N) + chunk, cache_modifier=".cg")
                        offs_m = off_m + r0 + tl.arange(0, FIX_ROWS)
                        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                        tot = _epilogue_math(tot, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr,
                                             stride_rm, stride_rn, stride_gn, stride_asm, stride_bsn,
                                             SCALE_MODE, HAS_RESIDUAL, HAS_GATE)  # fmt: skip
                        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
                        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
                        tl.store(c_ptrs, tot.to(c_ptr.dtype.element_ty), mask=mask)
                    tl.atomic_xchg(cnt_ptr + t, 0)
            else:
                _persistent_epilogue(acc, c_desc, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr, pid_m, pid_n, M, N,
                                     stride_rm, stride_rn, stride_gn, stride_asm, stride_bsn,
                                     SCALE_MODE, HAS_RESIDUAL, HAS_GATE, EPILOGUE_SUBTILE, BLOCK_M, BLOCK_N)  # fmt: skip
            it += k_hi - k_lo


@triton.jit
def _dequant_fp8_kernel(
    w_ptr,  # uint8 view of the e4m3 weights (N, K)
    s_ptr,
    out_ptr,  # (N, K) bf16 / fp16
    N,
    K,
    stride_wn,
    stride_on,
    stride_sn,  # 0 for a per-tensor scale
    stride_sk,
    SCALE_MODE: tl.constexpr,  # 0 tensor, 1 channel, 2 block (128x128)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out = e4m3(w) * scale, rounded once to out's dtype. The decode is integer arithmetic (no fp8
    instruction), as an sm_80 GPU runs it."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    wi = tl.load(w_ptr + rows * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.int16)
    w = (((wi & 0x7F) << 7) | ((wi & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if SCALE_MODE == 2:
        s = tl.load(s_ptr + (offs_n // 128)[:, None] * stride_sn + (offs_k // 128)[None, :] * stride_sk, mask=mask)
    else:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=offs_n < N)[:, None]
    tl.store(out_ptr + rows * stride_on + offs_k[None, :], (w * (s * 256.0)).to(out_ptr.dtype.element_ty), mask=mask)


# e4m3 bits -> bf16, four bytes in one 32-bit register to two bf16x2 (see ``_e4m3_bits_to_bf16``); shared with
# the Gluon kernel fp8_weight_only_sm90
E4M3_TO_BF16_PTX = tl.constexpr(
    """
        {
        .reg .b32 t0, t1, u0, u1, two120, negzero;
        mov.b32 two120, 0x7B807B80;
        mov.b32 negzero, 0x80008000;
        prmt.b32 t0, $2, 0, 0x1404;
        prmt.b32 t1, $2, 0, 0x3424;
        and.b32 u0, t0, 0x7FFF7FFF;
        and.b32 u1, t1, 0x7FFF7FFF;
        shr.b32 u0, u0, 4;
        shr.b32 u1, u1, 4;
        and.b32 t0, t0, 0x80008000;
        and.b32 t1, t1, 0x80008000;
        or.b32 u0, u0, t0;
        or.b32 u1, u1, t1;
        fma.rn.bf16x2 $0, u0, two120, negzero;
        fma.rn.bf16x2 $1, u1, two120, negzero;
        }
        """
)


@triton.jit
def _e4m3_bits_to_bf16(wb):
    """uint8 e4m3 bit patterns -> exact bf16 values, four at a time in PTX (GPU only: the interpreter
    runs no inline assembly).

    PRMT spreads two bytes into the high halves of two 16-bit lanes, s.eeee.mmm.00000000; the sign
    stays at bit 15 and the magnitude moves to bits 10..4, which reads as bf16 value * 2^-120 for
    normals and subnormals alike (bf16's exponent field 0000.eeee, bias 127 against e4m3's 7); one
    packed FMA by 2^120 (0x7B80) restores the value exactly. About 2.5 instructions per weight, where
    the 16-bit integer path Triton generates for the generic decode below takes about 7 (SASS of the
    weight-only loop on sm_90, triton 3.6)."""
    return tl.inline_asm_elementwise(
        asm=E4M3_TO_BF16_PTX,
        constraints="=r,=r,r",
        args=[wb],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _fp8_weight_only_kernel(
    # pointers
    x_ptr,
    w_ptr,  # uint8 view of the e4m3 weights
    c_ptr,
    w_scale_ptr,
    res_ptr,
    gate_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_cm,
    stride_cn,
    stride_rm,
    stride_rn,
    stride_gn,
    stride_wsn,  # 0 for a per-tensor scale
    stride_wsk,
    # meta-parameters
    SCALE_MODE: tl.constexpr,  # 0 tensor, 1 channel, 2 block (128x128)
    HAS_RESIDUAL: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_FP32: tl.constexpr,  # interpreter only: its bf16 arithmetic is broken
    ASM_DECODE: tl.constexpr,  # GPU, bf16 x: decode with _e4m3_bits_to_bf16 (PTX) instead of integer ops
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # The tile is computed transposed, C^T = W X^T ("swap AB"): the decoded weights are the MMA's
    # first operand, which Hopper's wgmma can take straight from registers.
    # grouped order with the roles swapped: GROUP_N weight row-tiles share each x tile in L2
    pid_n, pid_m = _tile_pids(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_wn = offs_n % N
    offs_xm = offs_m % M
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_wn.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    x_ptrs = x_ptr + offs_xm.to(tl.int64)[None, :] * stride_xm + offs_k[:, None] * stride_xk

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            wb = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_left = K - k * BLOCK_K
            wb = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0)
            x = tl.load(x_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if ASM_DECODE:
            w = _e4m3_bits_to_bf16(wb)  # exact values (no 2^-8 factor)
            w_unit = 1.0
        else:
            # e4m3 bits s.eeee.mmm -> fp16 bits s.0eeee.mmm0000000 = value / 2^8, exact for normals and
            # subnormals alike (both formats' subnormal spacing scales by the same 2^8).
            wi = wb.to(tl.int16)
            w = (((wi & 0x7F) << 7) | ((wi & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)
            w_unit = 256.0
        if SCALE_MODE == 2:
            kb = (k * BLOCK_K) // 128
            s = tl.load(w_scale_ptr + (offs_wn // 128) * stride_wsn + kb * stride_wsk) * w_unit
            w = w.to(tl.float32) * s[:, None]
        if DOT_FP32:
            # round the weights to the MMA dtype as the GPU path does (matters for block scales); the
            # interpreter's fp32 -> bf16 cast truncates, so bf16 rounding is done on the bits
            w = w.to(tl.float32)
            if x_ptr.dtype.element_ty == tl.bfloat16:
                wb32 = w.to(tl.int32, bitcast=True)
                wb32 = (wb32 + 0x7FFF + ((wb32 >> 16) & 1)) & -0x10000
                w = wb32.to(tl.float32, bitcast=True)
            else:
                w = w.to(tl.float16).to(tl.float32)
            acc = tl.dot(w, x.to(tl.float32), acc)
        else:
            acc = tl.dot(w.to(x.dtype), x, acc)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk

    if SCALE_MODE != 2:
        s = tl.load(w_scale_ptr + offs_wn * stride_wsn) * (1.0 if ASM_DECODE else 256.0)
        acc = acc * s[:, None]
    acc = tl.trans(acc)  # (BLOCK_M, BLOCK_N): coalesced stores along N
    mask_n = offs_n < N
    if HAS_GATE:
        g = tl.load(gate_ptr + offs_n * stride_gn, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * g[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_ptrs = res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Autotune configs and shared-memory pruning
# ----------------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, stages, warps, group=8, names=("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")):
    return triton.Config(
        {names[0]: bm, names[1]: bn, names[2]: bk, names[3]: group}, num_stages=stages, num_warps=warps
    )


def _pcfg(bm, bn, stages, warps, subtile, group=8, stream_k=False, bk=128):
    return triton.Config(
        {
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "GROUP_M": group,
            "EPILOGUE_SUBTILE": subtile,
            "STREAM_K": stream_k,
            "FIX_ROWS": 32 if bm >= 32 else bm,
        },  # fmt: skip
        num_stages=stages,
        num_warps=warps,
        pre_hook=_set_desc_blocks,
    )


def _set_desc_blocks(nargs):
    """TMA descriptors carry their block shape: set it from the config being tried."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    nargs["c_desc"].block_shape = [bm, bn // 2 if nargs["EPILOGUE_SUBTILE"] else bn]


if _INTERPRET:
    # The interpreter costs a few ms per program x loop iteration and checks no GPU constraint:
    # one small config keeps CPU tests fast (and skips benchmarking).
    _GEMM_CONFIGS = [_cfg(32, 32, 128, 1, 4, group=4)]
    # [0] for tensor/row scales (subtiled epilogue exercised), [1] for block scales (BLOCK_N = 128)
    _PERSISTENT_CONFIGS = [_pcfg(32, 64, 1, 4, True, group=2), _pcfg(32, 128, 1, 4, False, group=2)]
    _WO_CONFIGS = [_cfg(32, 32, 64, 1, 4, group=4, names=("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_N"))]
else:
    # BLOCK_K = 128 everywhere: 128 bytes of fp8 per row is one full swizzle line, and block scaling
    # needs BLOCK_K to divide 128. 128x256x128 with 3-4 stages is the H100 baseline; the smaller tiles
    # are for sm_89/sm_120 (about 99 KB of shared memory) and for small M or N.
    _GEMM_CONFIGS = [
        _cfg(128, 256, 128, 3, 8),
        _cfg(128, 256, 128, 4, 8),
        _cfg(256, 128, 128, 3, 8),
        _cfg(128, 128, 128, 4, 8),
        _cfg(128, 128, 128, 3, 8),
        _cfg(128, 128, 128, 3, 4),
        _cfg(64, 128, 128, 4, 4),
        _cfg(128, 64, 128, 3, 4),
    ]
    # Persistent TMA kernel (sm_90). 128x256 is the H100 workhorse; 64-row and 128x128 tiles give the
    # M = 512 text GEMMs 2-3 full waves on 132 SMs instead of 96-288 tiles of 128x256; the subtiled
    # epilogue halves the output staging buffer so a 4th stage fits in 227 KB.
    _PERSISTENT_CONFIGS = [
        _pcfg(128, 256, 3, 8, True),
        _pcfg(128, 256, 4, 8, True),
        _pcfg(128, 256, 3, 8, False),
        _pcfg(256, 128, 3, 8, True),
        _pcfg(128, 128, 4, 8, False),
        _pcfg(128, 128, 5, 8, False),
        _pcfg(128, 128, 4, 4, False),
        _pcfg(64, 256, 4, 4, True),
        _pcfg(64, 128, 5, 4, False),
        # stream-K, for the two-accumulator kernels where the tile count is not a multiple of the SM
        # count (pruned otherwise; reports/fp8_matmul run 10 and probe_stream_k_run2)
        _pcfg(128, 128, 4, 8, False, stream_k=True),
        _pcfg(128, 128, 3, 8, False, stream_k=True),
    ]
    _wo = ("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_N")
    _WO_CONFIGS = [
        _cfg(128, 128, 64, 4, 8, names=_wo),
        _cfg(128, 256, 64, 3, 8, names=_wo),
        _cfg(128, 256, 64, 4, 8, names=_wo),
        _cfg(128, 256, 128, 3, 8, names=_wo),
        _cfg(256, 128, 64, 3, 8, names=_wo),
        _cfg(128, 128, 128, 3, 8, names=_wo),
        _cfg(128, 128, 64, 4, 4, names=_wo),
        _cfg(64, 128, 64, 4, 4, names=_wo),
        # 64-row weight tiles: 2x the programs for the M = 512 text GEMMs (96 tiles of 128x256 on 132 SMs)
        _cfg(64, 256, 64, 4, 4, names=_wo),
        _cfg(64, 256, 64, 3, 8, names=_wo),
    ]


@functools.cache
def _props(index: int):
    return torch.cuda.get_device_properties(index)


def _smem_limit(device: torch.device) -> int:
    """Opt-in shared memory per block: ~227 KB on sm_90, ~99 KB on sm_89 / sm_120."""
    return _props(
        device.index if device.index is not None else torch.cuda.current_device()
    ).shared_memory_per_block_optin


def _prune_gemm(configs, named_args, **kwargs):
    """Keep configs whose pipelined A and B tiles fit the device's shared memory and, for kernels
    that hold two accumulators (block scaling, PROMOTE), whose accumulators fit the registers."""
    a = named_args["a_ptr"]
    if _INTERPRET or a.device.type != "cuda":
        return configs
    limit = _smem_limit(a.device)
    a_bytes = a.element_size()  # 1 for e4m3, 2 when A is bf16 (fused quantization)
    two_acc = kwargs.get("SCALE_MODE") == SCALE_BLOCK or bool(kwargs.get("PROMOTE"))
    kept = []
    for c in configs:
        kw = c.kwargs
        smem = c.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] * a_bytes + kw["BLOCK_N"])
        # fp32 accumulator registers per thread; two sets of 128 spill (measured: 128x256 block
        # scaling ran at ~330 TFLOP/s against ~1200 for one accumulator)
        acc_regs = kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * c.num_warps)
        if smem <= limit and (not two_acc or acc_regs <= 64):
            kept.append(c)
    return kept or configs[-1:]


def _prune_persistent(configs, named_args, **kwargs):
    """Shared memory (stages of A and B tiles + the output staging tile), the two-accumulator register
    limit of ``_prune_gemm``, and BLOCK_N = 128 for block scales (one weight scale per K step)."""
    block = kwargs.get("SCALE_MODE") == SCALE_BLOCK
    two_acc = block or bool(kwargs.get("PROMOTE"))
    c_bytes = kwargs.get("C_BYTES", 2)
    a = named_args["a_desc"].base
    limit = None if (_INTERPRET or a.device.type != "cuda") else _smem_limit(a.device)
    num_sms = kwargs.get("NUM_SMS", 1)
    kept = []
    for c in configs:
        kw = c.kwargs
        if block and kw["BLOCK_N"] != 128:
            continue
        rows = triton.cdiv(named_args["M"], kw["BLOCK_M"])
        tiles = rows * triton.cdiv(named_args["N"], kw["BLOCK_N"])
        # stream-K: a lane of programs per row of tiles (at most one row per SM; with rows dividing the SMs
        # none idles), a counter per tile, and only where whole waves would leave SMs idle. Only for the
        # two-accumulator kernels (block scales, promoted accumulation): there it is up to 1.28x faster at
        # M = 512 and changes only the fp32 order of K-step sums; with one fast-accumulated accumulator it
        # measured no faster and would make the output bits depend on the autotuner's pick (a split K
        # restarts Hopper's reduced-precision accumulation; reports/quant_runtime/fp8_launch_ab_run4).
        if kw["STREAM_K"] and (not two_acc or num_sms % rows or tiles > _STREAMK_MAX_TILES or tiles % num_sms == 0):
            continue
        if limit is None:
            kept.append(c)
            break  # interpreter: one config, no benchmarking
        smem = c.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] + kw["BLOCK_N"])
        smem += kw["BLOCK_M"] * kw["BLOCK_N"] * c_bytes // (2 if kw["EPILOGUE_SUBTILE"] else 1)
        if kwargs.get("HAS_RESIDUAL"):  # measured: the residual tile is staged in shared memory too
            smem += kw["BLOCK_M"] * kw["BLOCK_N"] * named_args["res_ptr"].element_size()
        acc_regs = kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * c.num_warps)
        if smem + 1024 <= limit and (not two_acc or acc_regs <= 64):  # + barriers
            kept.append(c)
    return kept or [c for c in configs if (not block or c.kwargs["BLOCK_N"] == 128) and not c.kwargs["STREAM_K"]][-1:]


def _prune_weight_only(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    if _INTERPRET or x.device.type != "cuda":
        return configs
    limit = _smem_limit(x.device)
    kept = []
    for c in configs:
        kw = c.kwargs
        # raw uint8 weights + x tiles per stage, plus one decoded 16-bit weight tile
        smem = c.num_stages * kw["BLOCK_K"] * (kw["BLOCK_N"] + 2 * kw["BLOCK_M"]) + 2 * kw["BLOCK_N"] * kw["BLOCK_K"]
        if smem <= limit:
            kept.append(c)
    return kept or configs[-1:]


def _queued_gpu_time(fn, quantiles=None, reps: int = 20):
    """Median GPU time (ms) of ``fn``, L2 flushed before each call, with every launch queued behind a
    sleep kernel: the events then bracket the kernel alone, however slow the host launch is.

    Triton's eager ``do_bench`` records an event, launches, records again; when the Python launch
    (~200 us through the autotuner) outlasts the kernel (40-110 us for the M = 512 GEMMs), the GPU
    idles between the events and every config measures the host: on the H100 (reports/fp8_matmul
    run 7) the M = 512 configs then tied and the first listed won. Checked against a CUDA-graph replay
    by tests/test_fp8_matmul.py::test_gpu_queued_timer_measures_the_kernel_not_the_launch."""
    fn()  # compile, warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / 3  # host + GPU: an upper bound on the host's share
    # 256 MB > L2, allocated per call: a module-level buffer held 0.25 GiB for the life of every process that
    # autotuned once (reports/h100, session 18); the caching allocator serves the next call's from its pool
    flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    # long enough for the host to queue every call (2 GHz bounds the H100's clock: a longer sleep is harmless)
    torch.cuda._sleep(int(min(reps * (1.5 * per_call + 50e-6), 0.5) * 2e9))
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in events])
    if quantiles is None:
        return times.median().item()
    return torch.quantile(times, torch.tensor(quantiles)).tolist()


def _autotune_bench(fn, quantiles=None):
    """Autotuning timer: GPU time of launches queued behind a sleep (``_queued_gpu_time``) by default;
    FLUX2_AUTOTUNE_QUEUED=0 selects Triton's eager ``do_bench`` (25 ms per config). With
    FLUX2_AUTOTUNE_GRAPH=1, kernel time from a CUDA graph replay, refused while the persistent kernel
    is on: that pair returned wrong outputs (reports/quant_runtime, diag_persistent_bisect). Measured
    on the H100 (run 3): with the eager timer the M = 512 GEMMs (40-200 us) were timed with their Python
    launch overhead and jitter (p90 up to 3x the median), and 1.45-wave tile shapes won at random."""
    if _AUTOTUNE_GRAPH and not PERSISTENT:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=25, quantiles=quantiles)
        except Exception:  # noqa: BLE001 (capture refused: fall back to the eager timer)
            pass
    if _AUTOTUNE_QUEUED and torch.cuda.is_available():
        return _queued_gpu_time(fn, quantiles)
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_fp8_gemm = triton.autotune(
    configs=_GEMM_CONFIGS,
    do_bench=_autotune_bench,
    key=["M", "N", "K", "SCALE_MODE", "A_BF16", "PROMOTE"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_fp8_gemm_kernel))

_fp8_gemm_persistent = triton.autotune(
    configs=_PERSISTENT_CONFIGS,
    do_bench=_autotune_bench,
    key=["M", "N", "K", "SCALE_MODE", "PROMOTE", "C_BYTES", "HAS_RESIDUAL"],
    prune_configs_by={"early_config_prune": _prune_persistent},
)(_fp8_gemm_persistent_kernel)

_fp8_weight_only = triton.autotune(
    configs=_WO_CONFIGS,
    do_bench=_autotune_bench,
    key=["M", "N", "K", "ASM_DECODE"],
    prune_configs_by={"early_config_prune": _prune_weight_only},
)(triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_fp8_weight_only_kernel))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# Cached launches. Triton's launch path (autotuner key and pre-hook, the JIT binder's specialization
# of every argument, the cache-key hash) costs tens of microseconds of Python per call, which the
# M = 512 text GEMMs (40-110 us of GPU time) cannot hide (reports/fp8_matmul: 88-118 us of host time
# per call). After the first launch of a specialization, ``_launch`` calls the compiled kernel's
# launcher directly. The key holds everything Triton specializes on (dtypes, 16-byte alignment of
# every pointer, the exact integer arguments, the constexpr keywords), so the cached kernel is the
# one Triton itself would pick. FLUX2_FAST_LAUNCH=0 turns it off.
FAST_LAUNCH = os.environ.get("FLUX2_FAST_LAUNCH", "1") == "1"
_FAST_LAUNCHERS: dict[tuple, object] = {}
_DESC_TEMPLATES: dict[tuple, tuple] = {}  # persistent kernel: the first launch's TMA descriptors, re-pointed later


def _spec_key(v):
    if isinstance(v, torch.Tensor):
        return (v.dtype, v.device.index, v.data_ptr() % 16 == 0)
    if isinstance(v, TensorDescriptor):
        return (_spec_key(v.base), tuple(v.shape), tuple(v.strides))
    return v


def _unwrap(fn):
    """(Autotuner or None, Heuristics or None, JITFunction) of a possibly decorated kernel."""
    tuner = fn if isinstance(fn, triton.runtime.Autotuner) else None
    inner = fn.fn if tuner is not None else fn
    heur = inner if isinstance(inner, triton.runtime.Heuristics) else None
    jit = heur.fn if heur is not None else inner
    return tuner, heur, jit


def _launch_key(fn, args, meta):
    # the autotuner's config list and cache objects are in the key: code that swaps them (tests pinning
    # one config, diagnostics re-tuning) gets a fresh launch
    key = (id(fn), id(getattr(fn, "configs", None)), id(getattr(fn, "cache", None)), tuple(map(_spec_key, args)))
    return key + tuple(meta.items())


def _rebased(desc, base: torch.Tensor):
    """``desc`` (a Triton or Gluon TensorDescriptor) pointing at ``base`` (same dtype, shape and strides),
    without the constructor's checks (about 4 us each on the H100's host; the launch that built ``desc``
    ran them)."""
    new = object.__new__(type(desc))
    new.__dict__.update(desc.__dict__)
    new.base = base
    return new


def _desc_template(desc):
    """``desc`` without its tensor, for a launch cache: ``_rebased`` points it at each call's tensor. A cached
    descriptor that kept its first launch's tensor kept that activation or output alive for the life of the
    process (up to 5.8 GiB over a FLUX.2 run's cells, reports/h100 session 18)."""
    return _rebased(desc, None)


def _make_fast_launcher(fn, grid, compiled, args, meta):
    """A callable ``f(*args)`` that launches ``compiled`` with the constexprs and grid of this launch."""
    tuner, heur, jit = _unwrap(fn)
    full = dict(meta)
    if tuner is not None:
        full.update(tuner.best_config.all_kwargs())
    if heur is not None:
        named = {**dict(zip(jit.arg_names, args, strict=False)), **full}
        for name, h in heur.values.items():
            full[name] = named[name] = h(named)
    names = jit.arg_names
    # constexpr parameters come after the runtime ones in every kernel of this file
    tail = tuple(full.get(n) for n in names[len(args) :])
    g = grid({**dict(zip(names, args, strict=False)), **full}) if callable(grid) else grid
    g = tuple(g) + (1,) * (3 - len(g))
    runner = compiled[g]
    # the key names the autotuner's config list and cache by id(): holding them here keeps a freed list's id
    # from passing to a new one (a test pinning another config) while this launcher is cached
    owners = (getattr(fn, "configs", None), getattr(fn, "cache", None))
    return lambda *a, _owners=owners: runner(*a, *tail)


def _launch(fn, grid, *args, _key=None, **meta):
    """``fn[grid](*args, **meta)``; the first launch of each specialization goes through Triton
    (autotuning, compilation), later ones through the cached launcher (see FAST_LAUNCH). ``_key``: a
    caller-built key that determines Triton's specialization, instead of the generic one."""
    if _INTERPRET or not FAST_LAUNCH:
        fn[grid](*args, **meta)
        return
    key = _key if _key is not None else _launch_key(fn, args, meta)
    launcher = _FAST_LAUNCHERS.get(key)
    if launcher is not None:
        launcher(*args)
        return
    compiled = fn[grid](*args, **meta)
    if compiled is not None and hasattr(compiled, "__getitem__"):
        _FAST_LAUNCHERS[key] = _make_fast_launcher(fn, grid, compiled, args, meta)


def _check_fp8_capable(device: torch.device) -> None:
    if device.type != "cuda":
        if not _INTERPRET:
            raise ValueError(f"FP8 kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU); got {device}")
        return
    props = _props(device.index if device.index is not None else torch.cuda.current_device())
    major, minor = props.major, props.minor
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"FP8 GEMM needs FP8 tensor cores (sm_89 or newer); {torch.cuda.get_device_name(device)} is "
            f"sm_{major}{minor}. Use fp8_weight_only_linear (e4m3 weights, bf16 compute) on this GPU."
        )


def _check_device(*tensors: torch.Tensor | None) -> None:
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devs))}")
    (dev,) = devs
    if dev.type != "cuda" and not _INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); got {dev}")


def _as_fp32_scale(s: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {s.dtype}")
    return s


def _scale_layout(a_scale, b_scale, M, N, K):
    """Decide the granularity from the scale shapes.

    Returns (mode, stride_asm, stride_ask, stride_bsn, stride_bsk)."""
    kb, nb = math.ceil(K / QBLOCK), math.ceil(N / QBLOCK)
    a_shape, b_shape = tuple(a_scale.shape), tuple(b_scale.shape)
    a_row = a_scale.numel() == 1 or a_shape in ((M,), (M, 1))
    b_row = b_scale.numel() == 1 or b_shape in ((N,), (N, 1), (1, N))
    if a_scale.numel() == 1 and b_scale.numel() == 1:
        return SCALE_TENSOR, 0, 0, 0, 0
    if a_row and b_row:
        sa = 0 if a_scale.numel() == 1 else a_scale.stride(0)
        sb = 0 if b_scale.numel() == 1 else b_scale.reshape(-1).stride(0)
        return SCALE_ROW, sa, 0, sb, 0
    if a_shape == (M, kb) and b_shape == (nb, kb):
        return SCALE_BLOCK, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1)
    raise ValueError(
        f"scale shapes a_scale={a_shape}, b_scale={b_shape} match no granularity for M={M}, N={N}, K={K}: "
        f"tensor: () and (); row: ({M},)/({M}, 1) and ({N},)/({N}, 1)/(1, {N}); "
        f"block: ({M}, {kb}) and ({nb}, {kb})"
    )


def _check_epilogue(residual, gate, M, N):
    if residual is not None and tuple(residual.shape) != (M, N):
        raise ValueError(f"residual must have shape ({M}, {N}), got {tuple(residual.shape)}")
    if gate is not None and tuple(gate.shape) not in ((N,), (1, N)):
        raise ValueError(f"gate must have shape ({N},) or (1, {N}), got {tuple(gate.shape)}")


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few programs, each walking several tiles
    return _props(device.index if device.index is not None else torch.cuda.current_device()).multi_processor_count


_STREAMK_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
# the current CUDA stream as an integer, as Triton's launcher reads it (a Stream object costs microseconds)
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)
_STREAMK_MAX_TILES = 1 << 14  # arrival counters per workspace (64 KB)


def _streamk_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The persistent kernel's stream-K workspace (fp32, 2 partial-tile slots per SM, sized for the
    largest tile) and arrival counters (int32, one per tile, zero between launches: each tile's last
    arrival resets its counter). One pair per device and stream, so that launches on
    different streams never share counters; allocated once (17.3 MB for 128x128 tiles on a 132-SM H100).

    Keyed by the tile size the current configs need, not by the config list's identity: tests and diagnostics
    swap or edit the list, and a freed list's id() is reused by the next one, which then got a workspace sized
    for another tile (an out-of-bounds write the interpreter turned into heap corruption, CI stop 24)."""
    configs = _fp8_gemm_persistent.configs
    tile = max((c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in configs if c.kwargs["STREAM_K"]), default=1)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, _current_raw_stream(index), tile)
    else:
        key = (device.type, None, tile)
    bufs = _STREAMK_BUFFERS.get(key)
    if bufs is None:
        slots = 2 * _num_sms(device)
        bufs = (torch.empty(slots * tile, device=device, dtype=torch.float32),
                torch.zeros(_STREAMK_MAX_TILES, device=device, dtype=torch.int32))  # fmt: skip
        _STREAMK_BUFFERS[key] = bufs
    return bufs


def _tma_rows(t: torch.Tensor) -> bool:
    """``t`` (2-D) can be a TMA descriptor's tensor: 16-byte aligned base address and row stride, contiguous
    rows."""
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1


_GLUON_SM90: dict[int, bool] = {}


def _block_gluon_fits(a, b, a_scale, b_scale, residual) -> bool:
    """What both Gluon block-scaled kernels need: an sm_90 GPU with Gluon, TMA-aligned operand rows, (M, K/128)
    and (N/128, K/128) scales, a residual contiguous along N."""
    if a.device.type != "cuda" or _INTERPRET:
        return False
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if _props(index).major != 9:
        return False
    if index not in _GLUON_SM90:
        from flux2_bench.kernels import fp8_block_gemm_sm90 as G

        _GLUON_SM90[index] = G.is_available(a.device)
    if not _GLUON_SM90[index]:
        return False
    (M, K), N = a.shape, b.shape[0]
    if not (_tma_rows(a) and _tma_rows(b)):
        return False
    if tuple(a_scale.shape) != (M, -(-K // QBLOCK)) or tuple(b_scale.shape) != (-(-N // QBLOCK), -(-K // QBLOCK)):
        return False
    return residual is None or residual.stride(1) == 1


def _use_block_gluon(a, b, a_scale, b_scale, residual) -> bool:
    """Block scales take the Gluon warp-specialized kernel on sm_90 (1.135x the Triton persistent
    kernel in reports/fp8_matmul/probe_ws_schedule.md), when TMA's alignment holds and the residual
    is contiguous along N, except where stream-K wins: fewer tiles than two waves with a long K
    (txt.mlp_out, M = 512, K = 18432: 0.91x; measured on that one shape)."""
    if not (BLOCK_GLUON and PERSISTENT) or not _block_gluon_fits(a, b, a_scale, b_scale, residual):
        return False
    (M, K), N = a.shape, b.shape[0]
    tiles = -(-M // 128) * -(-N // 128)  # 128 x 128 tiles
    return not (tiles < 2 * _num_sms(a.device) and K >= 12288)


def _use_block_rescale(a, b, a_scale, b_scale, out_dtype, residual, fast_accum) -> bool:
    """Block scales with fast accumulation take the rescaled-accumulator kernel on sm_90
    (``fp8_block_rescale_sm90``: 1.24x the promotion kernel, 0.89x our row-wise GEMM, 1.01x cuBLAS's block-scaled
    ``_scaled_mm`` in reports/fp8_matmul/probe_block_rescale.py run 2) at every shape, when the output is bf16 /
    fp16 with 16-byte aligned rows (its TMA store)."""
    if not (BLOCK_RESCALE and fast_accum) or out_dtype.itemsize != 2 or (b.shape[0] * out_dtype.itemsize) % 16:
        return False
    return _block_gluon_fits(a, b, a_scale, b_scale, residual)


# The rescaled kernel's tile for ``fp8_gemm`` (reports/fp8_matmul/probe_block_rescale.py, H100): one m64n256 wgmma
# per consumer and K step (``wide``: 1.13x two m64n128 in run 2), 128 x 256 tiles at every shape. Its
# 128 x 128 tiles (6 stages) were 1.07x on double.txt.qkv in run 3 (288 tiles of 128 x 256 on 132 SMs: 2.18 waves)
# but 0.98x there in run 4, and 0.66-0.92x on every other FLUX.2 shape in both runs.
# One output buffer per consumer and a 4th ring stage: 1.024x the 3-stage kernel (probe_block_rescale run 6).
BLOCK_RESCALE_OPTIONS = dict(wide=True, block_n=256, num_stages=4, share_out_buffer=True)


def _block_gluon_options(M: int, out_dtype: torch.dtype) -> dict:
    """The Gluon block kernel's schedule for ``fp8_gemm`` (reports/fp8_matmul/probe_ws_consumers.md, runs 1-2,
    H100): unlagged promotion with the scales' multiply deferred, and the TMA-store epilogue for 2-byte
    outputs (together 1.08-1.09x the previous dispatch, bit-identical). Three consumer warpgroups on 192-row
    tiles where M is a multiple of 192 from 4608 rows (single.linear1/2 at M = 4608: 1.01-1.19x two consumers;
    at M = 4096, 21.3 tiles of 192 rows, 0.92-1.0x; at M = 512, 0.72-0.81x), with 4 stages; otherwise two
    ordered consumers, 3 stages from M = 1024 and 5 below (deeper rings with the TMA store: no gain)."""
    opts = dict(tma_store=out_dtype.itemsize == 2)
    if M >= 4096 and M % 192 == 0:
        return dict(opts, consumers=3, num_stages=4)
    return dict(opts, consumers=2, ordered=True, num_stages=3 if M >= 1024 else 5)


# fp8_row_gemm_sm90's schedules where they are dispatched (``_row_gluon_options``)
ROW_GLUON_OPTIONS_TEXT = dict(block_n=128, num_stages=6)  # probe_row_ws runs 1-2: the fastest on txt.qkv
ROW_GLUON_OPTIONS = dict(block_n=256, num_stages=4, epilogue_subtile=True, prefetch_scales=True)


def _row_gluon_options(a, b, out_dtype, residual, fast_accum) -> dict | None:
    """The Gluon warp-specialized kernel's schedule for row scales on sm_90, or None for the Triton kernels.
    Measured by interleaved A/B on the H100: from 1024 rows, 128 x 256 tiles with 4 stages, the subtiled
    epilogue and prefetched scales (``ROW_GLUON_OPTIONS``; probe_row_epilogue runs 1-2: 1.010x the persistent
    kernel on the M >= 4096 FLUX.2 shapes, same bits); below 1024 rows with N >= 16384 (txt.qkv, txt.mlp_in)
    cooperative 128 x 128 tiles with 6 stages (``ROW_GLUON_OPTIONS_TEXT``; probe_row_ws: 1.05-1.13x). Other
    shapes below 1024 rows keep the persistent kernel (M = 512, N = 6144: 0.997-1.001x). Needs fast
    accumulation, a 2-byte output, TMA-aligned rows and a residual contiguous along N."""
    if not (ROW_GLUON and PERSISTENT and fast_accum) or a.device.type != "cuda" or _INTERPRET:
        return None
    M, N = a.shape[0], b.shape[0]
    if M >= 1024:
        opts = ROW_GLUON_OPTIONS
    elif N >= 16384:
        opts = ROW_GLUON_OPTIONS_TEXT
    else:
        return None
    if out_dtype.itemsize != 2:
        return None
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    if _props(index).major != 9:
        return None
    from flux2_bench.kernels import fp8_row_gemm_sm90 as R

    if not R.is_available(a.device):
        return None
    if not all(_tma_rows(t) for t in (a, b)):
        return None
    if (N * out_dtype.itemsize) % 16:  # the output's rows, for the TMA store
        return None
    if residual is not None and not (
        residual.stride(1) == 1 and (residual.stride(0) * residual.element_size()) % 16 == 0
    ):
        return None
    return opts


def _use_persistent(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
    """The persistent TMA kernel runs on sm_90 (measured there; sm_89 has no TMA, sm_100/sm_120 are
    untested) when TMA's 16-byte alignment holds for every row stride and base address. Everything
    else (and fused activation quantization) takes the classic tiled kernel."""
    if not PERSISTENT:
        return False
    if a.device.type == "cuda":
        if _props(a.device.index if a.device.index is not None else torch.cuda.current_device()).major != 9:
            return False
    elif not _INTERPRET:
        return False
    return all(_tma_rows(t) for t in (a, b, out))


def _launch_gemm(a, b, a_scale, b_scale, out_dtype, residual, gate, fast_accum, a_bf16=False, force_block=False):
    M, K = a.shape
    N = b.shape[0]
    if force_block:  # (M, 1) x (1, 1) block scales also read as row/tensor ones when K, N <= 128
        mode, s_asm, s_ask, s_bsn, s_bsk = SCALE_BLOCK, 0, 0, b_scale.stride(0), b_scale.stride(1)
    else:
        mode, s_asm, s_ask, s_bsn, s_bsk = _scale_layout(a_scale, b_scale, M, N, K)
    if (
        mode == SCALE_BLOCK
        and not a_bf16
        and _use_block_rescale(a, b, a_scale, b_scale, out_dtype, residual, fast_accum)
    ):
        from flux2_bench.kernels import fp8_block_rescale_sm90 as R

        # fp8_gemm checked the operands, scales and epilogue; _use_block_rescale what the kernel adds
        return R.run_checked(a, b, a_scale, b_scale, out_dtype, residual, gate, **BLOCK_RESCALE_OPTIONS)
    if mode == SCALE_BLOCK and not a_bf16 and _use_block_gluon(a, b, a_scale, b_scale, residual):
        from flux2_bench.kernels.fp8_block_gemm_sm90 import fp8_block_gemm_sm90

        return fp8_block_gemm_sm90(
            a,
            b,
            a_scale,
            b_scale,
            out_dtype=out_dtype,
            residual=residual,
            gate=gate,
            **_block_gluon_options(M, out_dtype),
        )
    row_gluon = mode == SCALE_ROW and not a_bf16 and _row_gluon_options(a, b, out_dtype, residual, fast_accum)
    if row_gluon:
        from flux2_bench.kernels.fp8_row_gemm_sm90 import fp8_row_gemm_sm90

        return fp8_row_gemm_sm90(a, b, a_scale, b_scale, out_dtype=out_dtype, residual=residual, gate=gate, **row_gluon)
    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    res = residual if residual is not None else out
    g = gate.reshape(-1) if gate is not None else out
    if not a_bf16 and _use_persistent(a, b, out):
        ws, cnt = _streamk_buffers(a.device)
        ints = (M, N, K, out.stride(0), res.stride(0), res.stride(1), g.stride(0), s_asm, s_ask, s_bsn, s_bsk)
        kern = _fp8_gemm_persistent
        key = None
        if FAST_LAUNCH and not _INTERPRET:
            # everything the persistent kernel specializes on: the descriptors' row strides and dtypes, the
            # integer arguments, the pointers' 16-byte alignment, the constexprs (and the autotuner's state)
            key = ("persistent", mode, id(kern.configs), id(kern.cache), a.device.index, a.stride(0), b.stride(0),
                   out.stride(0), out_dtype, res.dtype, g.dtype, *ints, fast_accum, residual is None, gate is None,
                   *(t.data_ptr() % 16 == 0 for t in (a_scale, b_scale, res, g, out)))  # fmt: skip
            hit = _FAST_LAUNCHERS.get(key)
            if hit is not None:
                a_desc, b_desc, c_desc = _DESC_TEMPLATES[key]
                hit(_rebased(a_desc, a), _rebased(b_desc, b), _rebased(c_desc, out), a_scale, b_scale, res, g, out,
                    ws, cnt, *ints)  # fmt: skip
                return out
        num_sms = _num_sms(a.device)
        # block shapes are placeholders: the autotuner's pre-hook sets them per config
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [16, 16])
        b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [16, 16])
        c_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [16, 16])
        # one program per SM, fewer for few tiles (stream-K shares iterations, not tiles: all SMs)
        grid = lambda meta: (
            num_sms
            if meta["STREAM_K"]
            else min(num_sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),
        )
        _launch(
            kern, grid,
            a_desc, b_desc, c_desc, a_scale, b_scale, res, g, out, ws, cnt, *ints,
            _key=key, SCALE_MODE=mode, PROMOTE=not fast_accum, HAS_RESIDUAL=residual is not None,
            HAS_GATE=gate is not None, C_BYTES=out.element_size(), NUM_SMS=num_sms,
        )  # fmt: skip
        if key in _FAST_LAUNCHERS:
            _DESC_TEMPLATES[key] = tuple(map(_desc_template, (a_desc, b_desc, c_desc)))
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _launch(
        _fp8_gemm, grid,
        a, b, out, a_scale, b_scale, res, g,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        res.stride(0), res.stride(1), g.stride(0),
        s_asm, s_ask, s_bsn, s_bsk,
        SCALE_MODE=mode, A_BF16=a_bf16, PROMOTE=not fast_accum, HAS_RESIDUAL=residual is not None,
        HAS_GATE=gate is not None, EXACT_CAST=_INTERPRET,
    )  # fmt: skip
    return out


def _check_fp8_operands(a, b, out_dtype) -> None:
    """e4m3 2-D operands, K contiguous (K of 1 may have any stride), matching K, a float output dtype."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float8_e4m3fn:
            raise TypeError(f"{name} must be a torch.float8_e4m3fn tensor, got {getattr(t, 'dtype', type(t))}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along K, got strides {t.stride()}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"K mismatch: a is {tuple(a.shape)}, b is {tuple(b.shape)} (b is (N, K))")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"out_dtype must be bf16, fp16 or fp32, got {out_dtype}")


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    fast_accum: bool = True,
) -> torch.Tensor:
    """``residual + gate * ((a * a_scale) @ (b * b_scale).T)`` for e4m3 ``a`` (M, K) and ``b`` (N, K).

    The scale granularity (tensor / row / block) is read from the scale shapes (module docstring).
    The result is ``out_dtype`` (M, N). Accumulation is in fp32 registers; ``fast_accum=True`` (the
    FP8-inference default of torchao, and `_scaled_mm(use_fast_accum=True)`) lets Hopper's MMA keep
    its reduced-precision internal accumulation across K, ``False`` adds every 128-wide K step to the
    accumulator in full fp32. Block scales with ``fast_accum=True`` on sm_90 (2-byte output) accumulate across K
    in the MMA too, in units of the current block's scale (``fp8_block_rescale_sm90``); elsewhere block scaling
    always promotes each 128-wide K step. On sm_90 with 16-byte-aligned rows this runs
    the persistent TMA kernel, elsewhere the classic tiled kernel (module docstring, "Dispatch")."""
    _check_fp8_operands(a, b, out_dtype)
    _as_fp32_scale(a_scale, "a_scale")
    _as_fp32_scale(b_scale, "b_scale")
    _check_epilogue(residual, gate, a.shape[0], b.shape[0])
    _check_device(a, b, a_scale, b_scale, residual, gate)
    _check_fp8_capable(a.device)
    return _launch_gemm(a, b, a_scale, b_scale, out_dtype, residual, gate, fast_accum)


def _quantize_launch(x2, granularity, scale, store_q=True):
    M, K = x2.shape
    q = torch.empty((M, K) if store_q else (0, K), device=x2.device, dtype=torch.float8_e4m3fn)
    if granularity == "tensor":
        s = scale
    elif granularity == "row":
        s = torch.empty((M, 1), device=x2.device, dtype=torch.float32)
    else:
        s = torch.empty((M, math.ceil(K / QBLOCK)), device=x2.device, dtype=torch.float32)
    if M == 0:
        return q, s
    if granularity == "row":
        block_k = triton.next_power_of_2(K)
        single = block_k <= _ROW_SINGLE_PASS_MAX_K
        if not single:
            block_k = 64 if _INTERPRET else 1024
        # one row per program: M programs keep enough loads in flight even for the 512 text tokens
        warps = 4 if block_k <= 4096 else (8 if block_k <= 16384 else 16)
        grid = (M,)
        block_m = 1
    else:
        block_m, block_k, warps, single = (16 if _INTERPRET else 32), QBLOCK, 4, False
        grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _launch(
        _quantize_fp8_kernel, grid,
        x2, q, s,
        M, K,
        x2.stride(0), q.stride(0) if store_q else 0, s.stride(0) if s.ndim else 0,
        GRANULARITY=_GRANULARITY[granularity], STORE_Q=store_q, SINGLE_PASS=single, EXACT_CAST=_INTERPRET,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps,
    )  # fmt: skip
    return q, s


def _check_activation(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be a bf16/fp16/fp32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    return x2


def _check_static_scale(scale, name="scale"):
    if scale is None:
        raise ValueError(f'granularity "tensor" needs a static {name} (a scalar fp32 tensor)')
    _as_fp32_scale(scale, name)
    if scale.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(scale.shape)}")


def quantize_fp8(
    x: torch.Tensor, granularity: str, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``x`` (..., K) to saturated e4m3 in one kernel.

    granularity: "row" (one scale per row, amax/448), "block" (one scale per 1x128 slice of a row) or
    "tensor" (``scale`` given: static activation scale). Returns ``(x_fp8, scale)`` with scale shape
    (..., 1) for "row", (..., ceil(K/128)) for "block", and the given scale for "tensor"."""
    if granularity not in _GRANULARITY:
        raise ValueError(f"granularity must be one of {sorted(_GRANULARITY)}, got {granularity!r}")
    x2 = _check_activation(x)
    if granularity == "tensor":
        _check_static_scale(scale)
    elif scale is not None:
        raise ValueError(f'scale is only taken for granularity "tensor", got one for {granularity!r}')
    _check_device(x2, scale)
    q, s = _quantize_launch(x2, granularity, scale)
    lead = tuple(x.shape[:-1])
    if granularity != "tensor":
        s = s.reshape(*lead, s.shape[-1])
    return q.reshape(x.shape), s


def _fuse_row_default(M: int, N: int, K: int) -> bool:
    """Whether the row-wise path quantizes inside the GEMM's A load by default. Measured on the H100
    (reports/fp8_matmul): slower than quantize-then-GEMM on every FLUX.2 shape (A is read as bf16 and
    re-quantized by each N tile), so never."""
    return False


def fp8_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    granularity: str,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    fuse_quant: bool | None = None,
    fast_accum: bool = True,
) -> torch.Tensor:
    """``residual + gate * (x @ dequant(w).T)`` with ``x`` quantized to e4m3 on the fly.

    x: (..., K) bf16/fp16/fp32; w: (N, K) e4m3; out: (..., N).
    granularity "tensor": w_scale scalar; activation scale static (``x_scale``) or, if None, dynamic
    per-tensor. "row": per-row activation x per-channel weight (w_scale (N,) / (N, 1)). "block": 1x128
    activation x 128x128 weight (w_scale (ceil(N/128), ceil(K/128))).
    fuse_quant: quantize inside the GEMM's A load instead of a separate kernel ("row" computes row
    scales in a pre-pass; "block" and static "tensor" need none). None picks the measured default.
    fast_accum: as in ``fp8_gemm``."""
    if granularity not in _GRANULARITY:
        raise ValueError(f"granularity must be one of {sorted(_GRANULARITY)}, got {granularity!r}")
    x2 = _check_activation(x)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.float8_e4m3fn or w.ndim != 2:
        raise TypeError(f"w must be a 2-D float8_e4m3fn tensor, got {getattr(w, 'dtype', type(w))}")
    M, K = x2.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)}, w is {tuple(w.shape)} (w is (N, K))")
    _as_fp32_scale(w_scale, "w_scale")
    expect = {
        "tensor": [()],
        "row": [(N,), (N, 1), (1, N)],
        "block": [(math.ceil(N / QBLOCK), math.ceil(K / QBLOCK))],
    }[granularity]
    if tuple(w_scale.shape) not in expect and not (granularity == "tensor" and w_scale.numel() == 1):
        raise ValueError(f"w_scale for {granularity!r} must have shape in {expect}, got {tuple(w_scale.shape)}")
    if x_scale is not None and granularity != "tensor":
        raise ValueError(f'x_scale (static activation scale) is only taken with "tensor", not {granularity!r}')
    if x_scale is not None:
        _check_static_scale(x_scale, "x_scale")
    if residual is not None:
        residual = residual.reshape(M, N) if residual.numel() == M * N else residual
    _check_epilogue(residual, gate, M, N)
    _check_device(x2, w, w_scale, x_scale, residual, gate)
    _check_fp8_capable(x2.device)
    if fuse_quant is None:
        fuse_quant = granularity == "row" and _fuse_row_default(M, N, K)

    if granularity == "tensor" and x_scale is None:
        # dynamic per-tensor: row amax kernel (no fp8 write), then the max of M scales
        _, row_s = _quantize_launch(x2, "row", None, store_q=False)
        x_scale = row_s.amax().reshape(())
    if fuse_quant:
        if granularity == "row":
            _, a_scale = _quantize_launch(x2, "row", None, store_q=False)
        elif granularity == "tensor":
            a_scale = x_scale
        else:
            a_scale = w_scale  # block: activation scales are computed per tile inside the GEMM; unused
        block = granularity == "block"
        out = _launch_gemm(
            x2, w, a_scale, w_scale, out_dtype, residual, gate, fast_accum, a_bf16=True, force_block=block
        )
    else:
        xq, a_scale = _quantize_launch(x2, granularity, x_scale)
        out = _launch_gemm(xq, w, a_scale, w_scale, out_dtype, residual, gate, fast_accum)
    return out.reshape(*x.shape[:-1], N)


def _weight_scale_mode(w_scale: torch.Tensor, N: int, K: int) -> tuple[int, int, int]:
    kb, nb = math.ceil(K / QBLOCK), math.ceil(N / QBLOCK)
    if w_scale.numel() == 1:
        return SCALE_TENSOR, 0, 0
    if tuple(w_scale.shape) in ((N,), (N, 1)):
        return SCALE_ROW, w_scale.stride(0), 0
    if tuple(w_scale.shape) == (nb, kb):
        return SCALE_BLOCK, w_scale.stride(0), w_scale.stride(1)
    raise ValueError(
        f"w_scale shape {tuple(w_scale.shape)} is none of (), ({N},), ({N}, 1), ({nb}, {kb}) for w ({N}, {K})"
    )


def _dequant_launch(w, w_scale, mode, s_n, s_k, dtype):
    N, K = w.shape
    wu = w.view(torch.uint8)
    out = torch.empty((N, K), device=w.device, dtype=dtype)
    block_n, block_k = (32, 64) if _INTERPRET else (64, 256)  # 16 KB of output per program
    grid = (triton.cdiv(N, block_n), triton.cdiv(K, block_k))
    _launch(
        _dequant_fp8_kernel, grid,
        wu, w_scale, out, N, K, wu.stride(0), out.stride(0), s_n, s_k,
        SCALE_MODE=mode, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def dequantize_fp8_weight(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(w * w_scale).to(dtype)`` for e4m3 (or uint8-viewed) weights (N, K) in one Triton pass.

    w_scale: scalar, per-channel (N,)/(N, 1) or 128x128 blocks (ceil(N/128), ceil(K/128)); dtype bf16
    or fp16. The e4m3 bits are decoded with integer arithmetic, so it runs on GPUs without FP8."""
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float8_e4m3fn, torch.uint8) or w.ndim != 2:
        raise TypeError(f"w must be a 2-D float8_e4m3fn (or uint8) tensor, got {getattr(w, 'dtype', type(w))}")
    if w.shape[1] > 1 and w.stride(1) != 1:
        raise ValueError(f"w must be contiguous along K, got strides {w.stride()}")
    if dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"dtype must be bf16 or fp16, got {dtype}")
    _as_fp32_scale(w_scale, "w_scale")
    _check_device(w, w_scale)
    mode, s_n, s_k = _weight_scale_mode(w_scale, *w.shape)
    return _dequant_launch(w, w_scale, mode, s_n, s_k, dtype)


def _use_wo_sm90(x2, w, out_dtype, residual) -> bool:
    """Weight-only takes the Gluon kernel on sm_90 (``WO_SM90``) for bf16 x and a 2-byte output, where TMA's
    16-byte alignment holds for every row and base address and a residual (if any) is in the output's dtype."""
    if not WO_SM90 or _INTERPRET or x2.device.type != "cuda" or x2.dtype != torch.bfloat16:
        return False
    if out_dtype not in (torch.bfloat16, torch.float16) or (w.shape[0] * 2) % 16:
        return False
    from flux2_bench.kernels import fp8_weight_only_sm90 as W

    if not W.is_available(x2.device):
        return False
    if not all(_tma_rows(t) for t in (x2, w)):
        return False
    if residual is None:
        return True
    return residual.dtype == out_dtype and _tma_rows(residual)


def fp8_weight_only_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + gate * (x @ (w * w_scale).T)`` with e4m3 weights, bf16/fp16 compute.

    For GPUs without FP8 tensor cores (sm_80/86; runs anywhere Triton does). x: (..., K) bf16 or fp16
    (the MMA dtype); w: (N, K) e4m3 (or its uint8 view); w_scale: scalar, per-channel (N,)/(N, 1),
    or 128x128 blocks (ceil(N/128), ceil(K/128)). out_dtype defaults to x's dtype.

    Dispatch: on sm_90 with bf16 x (and TMA-aligned rows) the Gluon warp-specialized ``fp8_weight_only_sm90``
    (``WO_SM90``) for every M: weights decoded in registers, fp32 accumulation and epilogue. Elsewhere, on
    M = x.numel() // K: below ``WO_DEQUANT_MIN_M`` (1024) the Triton fused kernel (same maths); from 1024 rows on
    (the measured crossover for that kernel on the H100: its decode ALU work per M tile costs more than one pass
    over the weights), the weights are dequantized to x's dtype by ``dequantize_fp8_weight`` into a temporary,
    multiplied by cuBLAS (``F.linear``, result in x's dtype) and the gate/residual applied in torch."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"x must be bf16 or fp16, got {getattr(x, 'dtype', type(x))}")
    x2 = _check_activation(x)
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float8_e4m3fn, torch.uint8) or w.ndim != 2:
        raise TypeError(f"w must be a 2-D float8_e4m3fn (or uint8) tensor, got {getattr(w, 'dtype', type(w))}")
    if w.shape[1] > 1 and w.stride(1) != 1:
        raise ValueError(f"w must be contiguous along K, got strides {w.stride()}")
    M, K = x2.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)}, w is {tuple(w.shape)} (w is (N, K))")
    _as_fp32_scale(w_scale, "w_scale")
    mode, s_n, s_k = _weight_scale_mode(w_scale, N, K)
    out_dtype = out_dtype or x.dtype
    if residual is not None:
        residual = residual.reshape(M, N) if residual.numel() == M * N else residual
    _check_epilogue(residual, gate, M, N)
    _check_device(x2, w, w_scale, residual, gate)
    if M < WO_SM90_MAX_M and _use_wo_sm90(x2, w, out_dtype, residual):
        from flux2_bench.kernels import fp8_weight_only_sm90 as W

        out = W.fp8_weight_only_sm90(x2, w, w_scale, out_dtype=out_dtype, residual=residual, gate=gate)
        return out.reshape(*x.shape[:-1], N)
    if M >= WO_DEQUANT_MIN_M and N > 0:
        # large M: the GEMM is compute-bound and cuBLAS's bf16 MMA beats the fused decode; the one
        # extra pass over the weights (1 byte read, 2 written per weight) is amortized over M rows
        wd = _dequant_launch(w, w_scale, mode, s_n, s_k, x2.dtype)
        out = torch.nn.functional.linear(x2, wd)
        del wd
        if gate is not None:
            g = gate.reshape(1, N).to(out.dtype)
            out = torch.addcmul(residual.to(out.dtype), out, g) if residual is not None else out.mul_(g)
        elif residual is not None:
            out = out.add_(residual.to(out.dtype))
        return out.to(out_dtype).reshape(*x.shape[:-1], N)
    out = torch.empty((M, N), device=x2.device, dtype=out_dtype)
    if M > 0 and N > 0:
        wu = w.view(torch.uint8)
        res = residual if residual is not None else out
        g = gate.reshape(-1) if gate is not None else out
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _launch(
            _fp8_weight_only, grid,
            x2, wu, out, w_scale, res, g,
            M, N, K,
            x2.stride(0), x2.stride(1), wu.stride(0), wu.stride(1), out.stride(0), out.stride(1),
            res.stride(0), res.stride(1), g.stride(0), s_n, s_k,
            SCALE_MODE=mode, HAS_RESIDUAL=residual is not None, HAS_GATE=gate is not None,
            DOT_FP32=_INTERPRET, ASM_DECODE=WO_ASM_DECODE and not _INTERPRET and x2.dtype == torch.bfloat16,
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------------------------
# Pure-torch references (same signatures)
# ----------------------------------------------------------------------------------------------


def _expand_blocks(s: torch.Tensor, rows: int, cols: int, row_block: int) -> torch.Tensor:
    """Expand a (ceil(rows/row_block), ceil(cols/128)) scale grid to (rows, cols)."""
    return s.repeat_interleave(row_block, 0)[:rows].repeat_interleave(QBLOCK, 1)[:, :cols]


def _dequant_scales(a_scale, b_scale, M, N, K):
    """Per-element scale grids (M, K) for A and (N, K) for B, for any granularity."""
    mode, *_ = _scale_layout(a_scale, b_scale, M, N, K)
    if mode == SCALE_BLOCK:
        return _expand_blocks(a_scale, M, K, 1), _expand_blocks(b_scale, N, K, QBLOCK)
    return a_scale.reshape(-1, 1).expand(M, 1), b_scale.reshape(-1, 1).expand(N, 1)


def fp8_gemm_ref(a, b, a_scale, b_scale, *, out_dtype=torch.bfloat16, residual=None, gate=None, fast_accum=True):
    """fp32 reference of ``fp8_gemm``: dequantize both operands, matmul in fp32, epilogue, cast
    (``fast_accum`` is accepted for the signature; the reference is always full fp32)."""
    M, K = a.shape
    N = b.shape[0]
    sa, sb = _dequant_scales(a_scale, b_scale, M, N, K)
    out = (a.float() * sa) @ (b.float() * sb).T
    if gate is not None:
        out = out * gate.reshape(1, N).float()
    if residual is not None:
        out = out + residual.float()
    return out.to(out_dtype)


def quantize_fp8_ref(x, granularity, scale=None):
    """Reference of ``quantize_fp8``: same scales and bit-identical e4m3 values."""
    xf = x.float()
    K = x.shape[-1]
    if granularity == "tensor":
        inv = 1.0 / scale.float().reshape(())
        s = scale
        inv_full = inv
    elif granularity == "row":
        s = xf.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_EPS) * (1.0 / FP8_MAX)
        inv_full = 1.0 / s
    elif granularity == "block":
        kb = math.ceil(K / QBLOCK)
        pad = kb * QBLOCK - K
        xb = torch.nn.functional.pad(xf, (0, pad)).reshape(*x.shape[:-1], kb, QBLOCK)
        s = xb.abs().amax(dim=-1).clamp(min=AMAX_EPS) * (1.0 / FP8_MAX)
        inv_full = (1.0 / s).repeat_interleave(QBLOCK, -1)[..., :K]
    else:
        raise ValueError(f"granularity must be one of {sorted(_GRANULARITY)}, got {granularity!r}")
    q = (xf * inv_full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s


def fp8_linear_ref(
    x,
    w,
    w_scale,
    *,
    granularity,
    out_dtype=torch.bfloat16,
    residual=None,
    gate=None,
    x_scale=None,
    fuse_quant=None,
    fast_accum=True,
):
    """Reference of ``fp8_linear``: ``quantize_fp8_ref`` then ``fp8_gemm_ref`` (fuse_quant and
    fast_accum are accepted for the signature)."""
    x2 = x.reshape(-1, x.shape[-1])
    N = w.shape[0]
    if granularity == "tensor" and x_scale is None:
        x_scale = x2.float().abs().amax().clamp(min=AMAX_EPS) * (1.0 / FP8_MAX)
    xq, s = quantize_fp8_ref(x2, granularity, x_scale)
    res = residual.reshape(x2.shape[0], N) if residual is not None else None
    out = fp8_gemm_ref(xq, w, s, w_scale, out_dtype=out_dtype, residual=res, gate=gate)
    return out.reshape(*x.shape[:-1], N)


def fp8_weight_only_linear_ref(x, w, w_scale, *, out_dtype=None, residual=None, gate=None):
    """Reference of ``fp8_weight_only_linear``: x in its own precision, weights dequantized in fp32
    (block scales: rounded to x's dtype first, as the kernel feeds them to the MMA). The dequantize +
    cuBLAS path (M >= WO_DEQUANT_MIN_M) also rounds per-tensor / per-channel ``w * scale`` to x's dtype
    and its GEMM output to x's dtype; tests bound that difference elementwise."""
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = w.shape[0]
    wf = w.view(torch.float8_e4m3fn).float()
    if w_scale.numel() == 1 or tuple(w_scale.shape) in ((N,), (N, 1)):
        out = (x2.float() @ wf.T) * w_scale.reshape(1, -1).float()
    else:
        wd = (wf * _expand_blocks(w_scale, N, K, QBLOCK)).to(x.dtype).float()
        out = x2.float() @ wd.T
    if gate is not None:
        out = out * gate.reshape(1, N).float()
    if residual is not None:
        out = out + residual.reshape(M, N).float()
    return out.to(out_dtype or x.dtype).reshape(*x.shape[:-1], N)


def dequantize_fp8_weight_ref(w, w_scale, dtype=torch.bfloat16):
    """Reference of ``dequantize_fp8_weight``: fp32 product, one rounding to ``dtype``."""
    N, K = w.shape
    wf = w.view(torch.float8_e4m3fn).float()
    if w_scale.numel() == 1 or tuple(w_scale.shape) in ((N,), (N, 1)):
        return (wf * w_scale.reshape(-1, 1).float()).to(dtype)
    return (wf * _expand_blocks(w_scale, N, K, QBLOCK)).to(dtype)
