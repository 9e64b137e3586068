"""FP8 flash attention (forward, non-causal, no mask) for FLUX.2's joint attention.

Layouts: q, k, v are (B, H, L, D) with the last dim contiguous, after QK-norm and RoPE; the output is
(B, H, L, D) in the input dtype (bf16 in the model; fp16/fp32 are accepted so the CPU interpreter,
whose bf16 arithmetic is broken, can run it). D is a power of two in [32, 128]; L is anything (tails
are masked; FLUX.2 uses 4608 at 1024², 16896 at 2048², about 45 k with ten references).

Quantization (all scales fp32, fp32 accumulation everywhere):
- K smoothing: K's per-channel mean (over a strided sample of 256 tokens, `sample_tokens`) is subtracted
  first. Softmax is invariant to any per-channel offset (it adds the same q·offset to every logit of a
  row), so this is exact, and it removes the offset that would otherwise eat the fp8 range of K.
- Q·Kᵀ in FP8 e4m3 with one scale per `scale_block` (64 or 128) tokens per head, for Q and K. The
  softmax scale and log2(e) are folded into Q's scale so the kernel uses exp2.
- P·V: `pv="fp8"` casts P to e4m3 after shifting it to [0, 256] (exp2(s - m + 8); the 256 cancels in
  the row sum and keeps small probabilities out of e4m3's subnormals) and V is scaled per channel:
  max(64 x the sample's |max|, the |max| over the sequence) / 448 (`V_HEADROOM`: one read of V). `pv="bf16"` multiplies P in the input dtype with the original V.
- `qk="int8"`: Q and K in int8 with the same block scales instead of e4m3 (same tensor-core rate on
  H100). e4m3's 3 mantissa bits give ~2.6 % RMS error per element whatever the scale; int8 over a
  block of RMS-normed values gives about a third of that (tests and reports/fp8_attention measure it).

A pre-pass that reads Q, K and V once (`_sample_kernel`: the K mean and V's channel-scale estimate from
the sample; `_quant_kernel`: per-block Q/K scales, fp8 casts, V cast and transpose to (B, H, D, Lp);
`_v_fixup_kernel`: re-casts a head's V where a token exceeded the estimate, else returns) and `_attn_fwd`. The optional
fused variant (`norm_rope=(q_weight, k_weight, cos, sin)`) takes Q and K before FLUX.2's QK-RMSNorm and
RoPE and applies them in the pre-pass as it loads them (kernels/qk_rope.py's `_norm_rope_rows`, same
bits as the separate pass; reports/fp8_attention/fused_norm_rope.md measures whether it pays). The fp8
P·V dot needs V K-major (sequence contiguous), hence the transpose. Quantized copies are padded to a
multiple of 128 tokens so the main loop loads without masks. On Hopper, `fp8_attention` runs the main loop
in kernels/fp8_attention_sm90.py instead (warp-specialized, Gluon; the pre-pass then stores Vᵀ's tokens in
that kernel's order, `v_perm16`).

The interpreter's fp32 -> fp8 cast is wrong (no rounding to nearest, no saturation, subnormals
flushed); under TRITON_INTERPRET=1 the kernels round to the e4m3 grid in fp32 before casting
(`EMULATE_CAST`), which makes the cast exact there. On a GPU the hardware cast (cvt.rn.satfinite) is used.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from flux2_bench.kernels.qk_rope import _INTERPRET, _ROUND, _norm_rope_rows, _round_to
from flux2_bench.kernels.qk_rope import _check as _check_norm_rope

FP8_MAX = 448.0  # largest finite float8_e4m3fn
P_SHIFT = 8.0  # P is computed as 2**8 * softmax numerator: max 256, smallest normal e4m3 2**-6 -> 2**-14
LOG2E = 1.4426950408889634
# quantize_qkv(v_perm16=True): token c of every 16 is stored at V_PERM16[c] (c = 8a + 2t + b -> 4t + 2a + b)
V_PERM16 = tuple(((c >> 1) & 3) * 4 + ((c >> 3) & 1) * 2 + (c & 1) for c in range(16))
# The pre-pass reads K and V once (`quantize_qkv`): K's mean (smoothing) and V's channel scale come from SAMPLE
# tokens spread over the sequence (`sample_tokens`). Any per-channel vector subtracted from K is exact (softmax),
# the sample mean only has to remove most of the offset. V's channel scale is max(V_HEADROOM x the sample's
# |max|, the |max| over all tokens) / 448: e4m3's relative precision is the same over its normal range (2**-6 to
# 448), so the headroom costs nothing but values below 2**-6 / 448 * V_HEADROOM of the sample's largest (which
# go subnormal), and a channel whose tokens exceed the estimate is re-cast by `_v_fixup_kernel` (rare; exact).
SAMPLE = 256
SAMPLE_BLOCK = 64  # sampled tokens per _sample_kernel program
V_HEADROOM = 64.0
_V_CHECK = True  # timing probes only: False skips the quant kernel's V block maxima (the fixup then reads garbage)
PAD = 128  # quantized copies are padded to a multiple of this many tokens (>= every block size)
# fp8 P·V: half of each tile's exp2 on the FMA pipe (`_exp2_fma`); FLUX2_ATTN_EXP2_SPLIT=1 turns it on.
# Off: measured slower on the H100 (reports/fp8_attention/exp2_split.md) because this kernel is
# issue-bound, not MUFU-bound; kept for a warp-specialized kernel, where the MUFU becomes the limit (FA4).
# (FA4's lazy rescaling was measured there too, slower still, and removed: see the same report.)
EXP2_SPLIT = os.environ.get("FLUX2_ATTN_EXP2_SPLIT", "0") == "1"


@triton.jit
def _to_fp8(x, SATURATE: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """fp32 -> float8e4nv with round-to-nearest-even (and clamp to ±448 when SATURATE)."""
    if SATURATE:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMULATE_CAST:
        # round to 3 mantissa bits in fp32 (normals), or to the 2**-9 grid (subnormals), so the
        # interpreter's cast only ever sees representable values
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        xr = bits.to(tl.float32, bitcast=True)
        x = tl.where(tl.abs(x) < 0.015625, tl.floor(x * 512.0 + 0.5) * 0.001953125, xr)
    return x.to(tl.float8e4nv)


@triton.jit
def _to_qk(x, QK_INT8: tl.constexpr, EMULATE_CAST: tl.constexpr):
    """x already scaled to the format's range (±127 or ±448) -> int8 (round half up) or e4m3."""
    if QK_INT8:
        y = tl.floor(x + 0.5).to(tl.int8)
    else:
        y = _to_fp8(x, True, EMULATE_CAST)
    return y


@triton.jit
def _norm_rope_tile(x, offs_l, L, off_b, w_ptr, cos_ptr, sin_ptr, stride_cb, stride_cl, eps,
                    D: tl.constexpr, ROUND: tl.constexpr, EXACT_BF16: tl.constexpr):  # fmt: skip
    """QK-RMSNorm * weight and RoPE (kernels/qk_rope.py's maths and roundings) of a (tokens, D) tile of
    one head, rows ``offs_l`` (rows past L are zeros and stay zeros)."""
    offs_j = tl.arange(0, D // 2)
    c_off = off_b * stride_cb + offs_l[:, None].to(tl.int64) * stride_cl + offs_j[None, :]
    row_ok = (offs_l < L)[:, None]
    cos = tl.load(cos_ptr + c_off, mask=row_ok, other=1.0)
    sin = tl.load(sin_ptr + c_off, mask=row_ok, other=0.0)
    w = _round_to(tl.load(w_ptr + tl.arange(0, D)).to(tl.float32), ROUND, EXACT_BF16)
    return _norm_rope_rows(x, w, cos, sin, D, eps, ROUND, EXACT_BF16)


@triton.jit
def _sample_kernel(
    k_ptr, v_ptr, kpart_ptr, vpart_ptr,
    kw_ptr, cos_ptr, sin_ptr, eps,
    L, S,
    H,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_cb, stride_cl,
    D: tl.constexpr, BLOCK_L: tl.constexpr, WITH_V: tl.constexpr,
    NORM_ROPE: tl.constexpr, ROUND: tl.constexpr, EXACT_BF16: tl.constexpr,
):  # fmt: skip
    """BLOCK_L of one head's S sampled tokens (token i * L // S for i < S, ``sample_tokens``): their K column sum
    and V column |max| into part [(b*H+h), program, D] (``_estimates`` combines the parts). NORM_ROPE: K is
    taken before QK-norm and RoPE, applied here."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, D)
    i = pid_p * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_l = tl.where(i < S, (i * L) // S, L)  # L: a row past the end (masked)
    mask = (offs_l < L)[:, None]
    k = tl.load(k_ptr + off_b * stride_kb + off_h * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)  # fmt: skip
    if NORM_ROPE:
        k = _norm_rope_tile(k, offs_l, L, off_b, kw_ptr, cos_ptr, sin_ptr, stride_cb, stride_cl, eps,
                            D, ROUND, EXACT_BF16)  # fmt: skip
    part = (pid_bh * tl.num_programs(0) + pid_p) * D + offs_d
    tl.store(kpart_ptr + part, tl.sum(k, axis=0))
    if WITH_V:
        v = tl.load(v_ptr + off_b * stride_vb + off_h * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :],
                    mask=mask, other=0.0)  # fmt: skip
        tl.store(vpart_ptr + part, tl.max(tl.abs(v.to(tl.float32)), axis=0))


@triton.jit
def _estimates(kpart_ptr, vpart_ptr, bh, S, offs_d, NP: tl.constexpr, D: tl.constexpr, V_HEADROOM: tl.constexpr,
               WITH_V: tl.constexpr):  # fmt: skip
    """One head's K mean over the sample and V's channel |max| estimate (V_HEADROOM x the sample's, at least
    1e-30) from ``_sample_kernel``'s NP parts."""
    parts = (bh * NP + tl.arange(0, NP))[:, None] * D + offs_d[None, :]
    kmean = tl.sum(tl.load(kpart_ptr + parts), axis=0) / S
    vest = kmean
    if WITH_V:
        vest = tl.maximum(tl.max(tl.load(vpart_ptr + parts), axis=0) * V_HEADROOM, 1e-30)
    return kmean, vest


@triton.jit
def _store_v_block(v, v_amax, vt8_ptr, bh, Lp, offs_l, offs_d,
                   SCALE_BLOCK: tl.constexpr, D: tl.constexpr, EMULATE_CAST: tl.constexpr, V_PERM16: tl.constexpr):  # fmt: skip
    """V rows ``offs_l`` (SCALE_BLOCK, D) in fp32 -> e4m3 with the channel scale v_amax / 448, stored transposed
    at (bh, D, Lp)."""
    v8 = _to_fp8(v * (448.0 / v_amax)[None, :], True, EMULATE_CAST)
    if V_PERM16:  # token 16 g + 8 a + 2 t + b stored at 16 g + 4 t + 2 a + b (fp8_attention_sm90's P order),
        # permuted in registers so that the store stays contiguous (an index permutation made it 1.2x slower)
        v8 = tl.reshape(tl.permute(tl.reshape(v8, (SCALE_BLOCK // 16, 2, 4, 2, D)), (0, 2, 1, 3, 4)), (SCALE_BLOCK, D))
    tl.store(vt8_ptr + bh * D * Lp + offs_d[None, :] * Lp + offs_l[:, None], v8)


@triton.jit
def _quant_kernel(
    q_ptr, k_ptr, v_ptr, kpart_ptr, vpart_ptr, vblk_ptr,
    q8_ptr, k8_ptr, vt8_ptr, qs_ptr, ks_ptr, vs_ptr,
    qw_ptr, kw_ptr, cos_ptr, sin_ptr, eps,
    L, Lp, H, n_sblk, q_scale_mult, S,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_cb, stride_cl,
    D: tl.constexpr, SCALE_BLOCK: tl.constexpr, WITH_V: tl.constexpr, QK_INT8: tl.constexpr,
    QK_MAX: tl.constexpr, EMULATE_CAST: tl.constexpr,
    NORM_ROPE: tl.constexpr, ROUND: tl.constexpr, EXACT_BF16: tl.constexpr, V_PERM16: tl.constexpr,
    NP: tl.constexpr, V_HEADROOM: tl.constexpr, V_BLOCK_AMAX: tl.constexpr,
):  # fmt: skip
    """One SCALE_BLOCK of tokens of one head: Q and smoothed K (minus the sample's mean) to fp8 with one scale
    each; V to fp8 with the channel scale estimate / 448 (``_estimates``; ``_v_fixup_kernel`` corrects it where V
    exceeds it), stored transposed (block 0 also stores the V scales), and this block's V column |max| into
    ``vblk``. Rows past L are written as zeros (padding)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    offs_l = pid_s * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
    offs_d = tl.arange(0, D)
    row_ok = (offs_l < L)[:, None]
    dst = bh * Lp * D + offs_l[:, None] * D + offs_d[None, :]
    kmean, vest = _estimates(kpart_ptr, vpart_ptr, bh, S, offs_d, NP, D, V_HEADROOM, WITH_V)

    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh + offs_l[:, None] * stride_ql + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
    if NORM_ROPE:
        q = _norm_rope_tile(q, offs_l, L, off_b, qw_ptr, cos_ptr, sin_ptr, stride_cb, stride_cl, eps,
                            D, ROUND, EXACT_BF16)  # fmt: skip
    q_amax = tl.maximum(tl.max(tl.abs(q)), 1e-30)
    tl.store(q8_ptr + dst, _to_qk(q * (QK_MAX / q_amax), QK_INT8, EMULATE_CAST))
    tl.store(qs_ptr + pid_bh * n_sblk + pid_s, q_amax / QK_MAX * q_scale_mult)

    k = tl.load(k_ptr + off_b * stride_kb + off_h * stride_kh + offs_l[:, None] * stride_kl + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
    if NORM_ROPE:
        k = _norm_rope_tile(k, offs_l, L, off_b, kw_ptr, cos_ptr, sin_ptr, stride_cb, stride_cl, eps,
                            D, ROUND, EXACT_BF16)  # fmt: skip
    k = tl.where(row_ok, k - kmean[None, :], 0.0)
    k_amax = tl.maximum(tl.max(tl.abs(k)), 1e-30)
    tl.store(k8_ptr + dst, _to_qk(k * (QK_MAX / k_amax), QK_INT8, EMULATE_CAST))
    tl.store(ks_ptr + pid_bh * n_sblk + pid_s, k_amax / QK_MAX)

    if WITH_V:
        v = tl.load(v_ptr + off_b * stride_vb + off_h * stride_vh + offs_l[:, None] * stride_vl + offs_d[None, :],
                    mask=row_ok, other=0.0).to(tl.float32)  # fmt: skip
        if V_BLOCK_AMAX:  # 12 % of this kernel (probe_prepass_time run 3); per-element atomics instead: 18 % (run 4)
            tl.store(vblk_ptr + (bh * n_sblk + pid_s) * D + offs_d, tl.max(tl.abs(v), axis=0))
        if pid_s == 0:
            tl.store(vs_ptr + pid_bh * D + offs_d, vest / 448.0)
        _store_v_block(v, vest, vt8_ptr, bh, Lp, offs_l, offs_d, SCALE_BLOCK, D, EMULATE_CAST, V_PERM16)


@triton.jit
def _v_fixup_kernel(
    v_ptr, kpart_ptr, vpart_ptr, vblk_ptr, vt8_ptr, vs_ptr,
    L, Lp, H, n_sblk, S,
    stride_vb, stride_vh, stride_vl,
    D: tl.constexpr, SCALE_BLOCK: tl.constexpr, EMULATE_CAST: tl.constexpr, V_PERM16: tl.constexpr,
    NP: tl.constexpr, V_HEADROOM: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One head: V's column |max| over all tokens (the quant kernel's block maxima). Where it exceeds the estimate
    the quant kernel cast with (a token more than V_HEADROOM times the sample's largest: saturated), re-cast the
    head's V with the channel scale max(estimate, |max|) / 448. Otherwise (the usual case) return: the head's
    V was read once."""
    pid_bh = tl.program_id(0)
    bh = pid_bh.to(tl.int64)
    offs_d = tl.arange(0, D)
    _kmean, est = _estimates(kpart_ptr, vpart_ptr, bh, S, offs_d, NP, D, V_HEADROOM, True)
    amax = tl.zeros([D], dtype=tl.float32)
    for s0 in range(0, n_sblk, BLOCK_S):
        blk = s0 + tl.arange(0, BLOCK_S)
        m = tl.load(vblk_ptr + (bh * n_sblk + blk)[:, None] * D + offs_d[None, :], mask=(blk < n_sblk)[:, None],
                    other=0.0)  # fmt: skip
        amax = tl.maximum(amax, tl.max(m, axis=0))
    if tl.max(amax - est) > 0:
        v_amax = tl.maximum(amax, est)
        tl.store(vs_ptr + pid_bh * D + offs_d, v_amax / 448.0)
        v_base = v_ptr + (pid_bh // H).to(tl.int64) * stride_vb + (pid_bh % H).to(tl.int64) * stride_vh
        for s in range(n_sblk):
            offs_l = s * SCALE_BLOCK + tl.arange(0, SCALE_BLOCK)
            v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=(offs_l < L)[:, None],
                        other=0.0).to(tl.float32)  # fmt: skip
            _store_v_block(v, v_amax, vt8_ptr, bh, Lp, offs_l, offs_d, SCALE_BLOCK, D, EMULATE_CAST, V_PERM16)


@triton.jit
def _exp2_fma(x):
    """2**x on the FMA and integer pipes instead of the MUFU unit (FA4's trick), for x <= 8.

    x = n + f with n = round(x) (the 1.5 * 2**23 shift leaves n in the low mantissa bits of t) and
    f in [-0.5, 0.5]; 2**f from a degree-2 polynomial (relative error 1.7e-3, fitted for the minimax
    relative error), then n is added to the exponent field: bits(t) << 23 == n << 23 (mod 2**32) because
    the shift constant's low 9 bits are zero. Ample for P, which is rounded to e4m3 (3 mantissa bits)
    next; results below 2**-126 come out as 0 or tiny denormals."""
    x = tl.maximum(x, -127.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = (0.2384257 * f + 0.7034428) * f + 1.000443
    return (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


@triton.jit
def _attn_tile(
    acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_base, start_n, offs_n, L, stride_vn,
    D: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr, PV_FP8: tl.constexpr,
    MASK: tl.constexpr, EMULATE_CAST: tl.constexpr, EXP_SPLIT: tl.constexpr,
):  # fmt: skip
    k = tl.load(k_ptrs + start_n * D)  # (D, BLOCK_N) fp8
    qk = tl.dot(q, k).to(tl.float32)  # fp8 x fp8 -> fp32, or int8 x int8 -> int32 (exact)
    if BLOCK_N <= SCALE_BLOCK:  # one K scale for the whole tile: fold it into the row scale
        c = qs * tl.load(ks_base + start_n // SCALE_BLOCK)
    else:
        qk = qk * tl.load(ks_base + (start_n + offs_n) // SCALE_BLOCK)[None, :]
        c = qs
    if MASK:
        qk = tl.where((start_n + offs_n)[None, :] < L, qk, float("-inf"))
    # c > 0, so max(qk * c) = max(qk) * c: the scale then rides in the exp2 argument's FMA
    # (one FP op per logit instead of a multiply and a subtract; softmax is exp2-bound in FP8)
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * c)
    alpha = tl.math.exp2(m_i - m_new)
    if PV_FP8:
        shift = m_new - 8.0  # p in [0, 256]; the 256 cancels in l_i
    else:
        shift = m_new
    s = qk * c[:, None] - shift[:, None]
    if EXP_SPLIT and PV_FP8 and not MASK:
        # half the columns through MUFU.EX2, half through _exp2_fma: the softmax no longer waits on
        # the 16-per-clock MUFU alone (each thread holds adjacent column pairs: the split is in registers)
        s_mufu, s_fma = tl.split(tl.reshape(s, (s.shape[0], s.shape[1] // 2, 2)))
        p = tl.reshape(tl.join(tl.math.exp2(s_mufu), _exp2_fma(s_fma)), (s.shape[0], s.shape[1]))
    else:
        p = tl.math.exp2(s)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        vt = tl.load(v_ptrs + start_n)  # (D, BLOCK_N) fp8, sequence contiguous
        acc = tl.dot(_to_fp8(p, False, EMULATE_CAST), tl.trans(vt), acc)
    else:
        if MASK:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(start_n + offs_n)[:, None] < L, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    q8_ptr, k8_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, o_ptr,
    L, Lp, H, n_sblk,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_ol,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    PV_FP8: tl.constexpr, EMULATE_CAST: tl.constexpr, EXP_SPLIT: tl.constexpr,
):  # fmt: skip
    """One BLOCK_M tile of queries of one head against all keys, online softmax in the exp2 domain."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh = pid_bh.to(tl.int64)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)

    q = tl.load(q8_ptr + bh * Lp * D + offs_m[:, None] * D + offs_d[None, :])  # padded: no mask
    qs = tl.load(qs_ptr + pid_bh * n_sblk + offs_m // SCALE_BLOCK)  # includes sm_scale * log2(e)
    k_ptrs = k8_ptr + bh * Lp * D + offs_n[None, :] * D + offs_d[:, None]  # (D, BLOCK_N): Kᵀ
    if PV_FP8:
        v_ptrs = v_ptr + bh * D * Lp + offs_d[:, None] * Lp + offs_n[None, :]  # (D, BLOCK_N) of Vᵀ
    else:
        v_ptrs = v_ptr + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    ks_base = ks_ptr + pid_bh * n_sblk

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_base, start_n, offs_n, L, stride_vn,
            D, BLOCK_N, SCALE_BLOCK, PV_FP8, False, EMULATE_CAST, EXP_SPLIT,
        )  # fmt: skip
    if n_full < L:
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, q, qs, k_ptrs, v_ptrs, ks_base, n_full, offs_n, L, stride_vn,
            D, BLOCK_N, SCALE_BLOCK, PV_FP8, True, EMULATE_CAST, EXP_SPLIT,
        )  # fmt: skip

    o = acc * (1.0 / l_i)[:, None]
    if PV_FP8:
        o = o * tl.load(vs_ptr + pid_bh * D + offs_d)[None, :]
    o_ptrs = o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=(offs_m < L)[:, None])


# ---------------------------------------------------------------------------------------------------
# launcher

PV_MODES = ("fp8", "bf16")
QK_MODES = ("fp8", "int8")
QK_RANGE = {"fp8": FP8_MAX, "int8": 127.0}
SCALE_BLOCKS = (64, 128)
PREPASS_WARPS = {64: 4, 128: 8}  # _quant_kernel's warps per scale block (reports/fp8_attention/probe_prepass.py)


def _default_config(head_dim: int, device: torch.device, pv: str = "fp8") -> dict[str, int]:
    """Tile config: on a GPU the H100-measured one (reports/fp8_attention); on CPU (interpreter) 64-wide
    tiles, which keep interpreter tests fast."""
    if device.type == "cpu":
        return {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}
    # H100 sweeps (reports/fp8_attention): 128x64 tiles with one warpgroup beat 128x128 with two by
    # 1.2x at L=4608 and 16896; 3 stages for fp8 P·V, 2 for bf16 P·V (1.2x over 3 there)
    return {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3 if pv == "fp8" else 2}


# fp8_attention runs kernels/fp8_attention_sm90 (warp-specialized Gluon) where it applies; FLUX2_ATTN_SM90=0 keeps
# the Triton kernel everywhere
SM90 = os.environ.get("FLUX2_ATTN_SM90", "1") == "1"
SM90_BLOCK_N = 128  # reports/fp8_attention/attn_sm90.md, run 2: 128-key tiles, 2 stages, no ping-pong


def _use_sm90(q: Tensor, pv: str, block_n: int | None, triton_knobs: tuple) -> bool:
    """Whether fp8_attention takes the sm_90 kernel: a Hopper GPU with Gluon, fp8 P·V, head dim 64 or 128, no
    Triton launch knob (block_m, num_warps, num_stages) given and block_n unset or 64 / 128. Measured 1.05-1.15x
    the Triton kernel's speed on the H100 with the same accuracy (reports/fp8_attention/attn_sm90.md)."""
    if not (SM90 and q.is_cuda and pv == "fp8" and q.shape[-1] in (64, 128)):
        return False
    if any(k is not None for k in triton_knobs) or block_n not in (None, 64, 128):
        return False
    from flux2_bench.kernels import fp8_attention_sm90

    return fp8_attention_sm90.gluon is not None and fp8_attention_sm90.is_available(q.device)


def _default_block_n(q: Tensor, pv: str, block_n: int | None, triton_knobs: tuple) -> int:
    """The key tile fp8_attention uses (P is rounded to e4m3 relative to the running max per key tile, so the
    emulating reference must tile the same way)."""
    if block_n is not None:
        return block_n
    if _use_sm90(q, pv, block_n, triton_knobs):
        return SM90_BLOCK_N
    return _default_config(q.shape[-1], q.device, pv)["block_n"]


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, pv: str, scale_block: int, qk: str = "fp8") -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must be (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"{name} must be bf16, fp16 or fp32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim, got strides {t.stride()}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    d = q.shape[-1]
    if d not in (32, 64, 128):
        raise ValueError(f"head dim must be 32, 64 or 128, got {d}")
    if q.shape[2] < 1:
        raise ValueError(f"sequence length must be >= 1, got {q.shape[2]}")
    if pv not in PV_MODES:
        raise ValueError(f"pv must be one of {PV_MODES}, got {pv!r}")
    if qk not in QK_MODES:
        raise ValueError(f"qk must be one of {QK_MODES}, got {qk!r}")
    if scale_block not in SCALE_BLOCKS:
        raise ValueError(f"scale_block must be one of {SCALE_BLOCKS}, got {scale_block}")
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        cap = torch.cuda.get_device_capability(q.device)
        raise ValueError(f"fp8 tensor cores need compute capability >= 8.9, got {cap} ({q.device})")


def sample_tokens(L: int, device=None) -> Tensor:
    """The tokens whose K mean and V |max| the pre-pass estimates from: i * L // S for i < S = min(L, SAMPLE)."""
    S = min(L, SAMPLE)
    return torch.arange(S, device=device) * L // S


def quantize_qkv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    pv: str = "fp8",
    scale_block: int = 128,
    qk: str = "fp8",
    norm_rope: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    eps: float = 1e-6,
    v_perm16: bool = False,
) -> dict[str, Tensor]:
    """The pre-pass: K mean and V's channel scale (estimated from ``sample_tokens``, V's corrected where it
    saturates), Q/K fp8 (or int8) + block scales, V fp8 (transposed) + channel scales.

    Returns q8, k8 (B, H, Lp, D) e4m3 (int8 for qk="int8") with Lp = L rounded up to 128; qs, ks (B, H, Lp/scale_block) fp32
    (qs includes scale*log2(e)); for pv="fp8" also vt8 (B, H, D, Lp) e4m3 and vs (B, H, D) fp32.
    v_perm16=True (pv="fp8"; for ``fp8_attention_sm90``): Vᵀ is returned as vt8p instead, its tokens permuted
    within every 16 (``V_PERM16``: token c of a group stored at position V_PERM16[c]), the order in which
    that kernel's P registers hold the keys.

    norm_rope=(q_weight, k_weight, cos, sin): q and k are taken before FLUX.2's QK-RMSNorm and RoPE,
    which the pre-pass applies as it loads them (``kernels/qk_rope.py``'s maths and roundings, `eps`
    for the norm; cos, sin from ``rope_cos_sin``), instead of a separate ``qk_norm_rope`` pass. The
    quantized outputs are the same bits as ``quantize_qkv(*qk_norm_rope(q, k, ...), v)``.
    """
    _check_inputs(q, k, v, pv, scale_block, qk)
    if norm_rope is not None:
        if not isinstance(norm_rope, (tuple, list)) or len(norm_rope) != 4:
            raise ValueError(f"norm_rope must be (q_weight, k_weight, cos, sin), got {norm_rope!r:.80}")
        qw, kw, cos, sin = norm_rope
        _check_norm_rope(q, k, qw, kw, cos, sin, None, None)
    else:
        qw = kw = cos = sin = q  # unused pointers
    B, H, L, D = q.shape
    Lp = triton.cdiv(L, PAD) * PAD
    n_sblk = Lp // scale_block
    qk_dtype = torch.int8 if qk == "int8" else torch.float8_e4m3fn
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    emulate = q.device.type == "cpu"
    with_v = pv == "fp8"
    dev = q.device

    # one read of K and V: the K mean and V's channel scale come from a strided sample of the tokens
    # (reports/fp8_attention/probe_prepass_time.md: the exact statistics cost a pass of their own, 40 % of the
    # pre-pass at L = 4608)
    n_sample = min(L, SAMPLE)
    n_parts = SAMPLE // SAMPLE_BLOCK
    kpart = torch.empty(B * H, n_parts, D, device=dev, dtype=torch.float32)
    vpart = torch.empty_like(kpart) if with_v else kpart
    fused = norm_rope is not None
    stride_cb, stride_cl = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1)) if fused else (0, 0)
    rope_meta = dict(NORM_ROPE=fused, ROUND=_ROUND[q.dtype], EXACT_BF16=_INTERPRET)
    _sample_kernel[(n_parts, B * H)](
        k, v, kpart, vpart, kw, cos, sin, eps, L, n_sample, H,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), stride_cb, stride_cl,
        D=D, BLOCK_L=SAMPLE_BLOCK, WITH_V=with_v, num_warps=4, **rope_meta,
    )  # fmt: skip
    est_meta = dict(NP=n_parts, V_HEADROOM=V_HEADROOM)

    out = {
        "q8": torch.empty(B, H, Lp, D, device=dev, dtype=qk_dtype),
        "k8": torch.empty(B, H, Lp, D, device=dev, dtype=qk_dtype),
        "qs": torch.empty(B, H, n_sblk, device=dev, dtype=torch.float32),
        "ks": torch.empty(B, H, n_sblk, device=dev, dtype=torch.float32),
    }
    if v_perm16 and not with_v:
        raise ValueError("v_perm16 permutes the fp8 Vᵀ: it needs pv='fp8'")
    vt_key = "vt8p" if v_perm16 else "vt8"
    if with_v:
        out[vt_key] = torch.empty(B, H, D, Lp, device=dev, dtype=torch.float8_e4m3fn)
        out["vs"] = torch.empty(B, H, D, device=dev, dtype=torch.float32)
    vt8 = out.get(vt_key, out["k8"])
    vs = out.get("vs", out["qs"])
    vblk = torch.empty(B * H, n_sblk, D, device=dev, dtype=torch.float32) if with_v else kpart
    _quant_kernel[(n_sblk, B * H)](
        q, k, v, kpart, vpart, vblk,
        out["q8"], out["k8"], vt8, out["qs"], out["ks"], vs,
        qw, kw, cos, sin, eps,
        L, Lp, H, n_sblk, sm_scale * LOG2E, n_sample,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        stride_cb, stride_cl,
        D=D, SCALE_BLOCK=scale_block, WITH_V=with_v, QK_INT8=qk == "int8", QK_MAX=QK_RANGE[qk],
        EMULATE_CAST=emulate, V_PERM16=v_perm16, num_warps=PREPASS_WARPS[scale_block], **rope_meta, **est_meta,
        V_BLOCK_AMAX=_V_CHECK,
    )  # fmt: skip
    if with_v:
        _v_fixup_kernel[(B * H,)](
            v, kpart, vpart, vblk, vt8, vs, L, Lp, H, n_sblk, n_sample, v.stride(0), v.stride(1), v.stride(2),
            D=D, SCALE_BLOCK=scale_block, EMULATE_CAST=emulate, V_PERM16=v_perm16, BLOCK_S=128,
            num_warps=PREPASS_WARPS[scale_block], **est_meta,
        )  # fmt: skip
    return out


def fp8_attention_quantized(
    quant: dict[str, Tensor],
    v: Tensor,
    *,
    out: Tensor | None = None,
    scale_block: int = 128,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    exp_split: bool | None = None,
) -> Tensor:
    """The attention kernel alone, on the output of `quantize_qkv` (v: the original V, for shape,
    dtype and the bf16 P·V path). Split out so the pre-pass and the main kernel can be timed apart."""
    B, H, L, D = v.shape
    if "vt8p" in quant:
        raise ValueError("quant holds Vᵀ in fp8_attention_sm90's token order (v_perm16=True); this kernel reads vt8")
    pv_fp8 = "vt8" in quant
    cfg = _default_config(D, v.device, "fp8" if pv_fp8 else "bf16")
    for key, val in (
        ("block_m", block_m),
        ("block_n", block_n),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    ):
        if val is not None:
            cfg[key] = val
    if cfg["block_m"] not in (16, 32, 64, 128) or cfg["block_n"] not in (16, 32, 64, 128):
        raise ValueError(f"block_m and block_n must be 16..128 powers of two, got {cfg['block_m']}, {cfg['block_n']}")
    Lp = quant["q8"].shape[2]
    n_sblk = quant["qs"].shape[2]
    if out is None:
        out = torch.empty(B, H, L, D, device=v.device, dtype=v.dtype)
    v_arg = quant["vt8"] if pv_fp8 else v
    vs = quant["vs"] if pv_fp8 else quant["qs"]
    grid = (triton.cdiv(L, cfg["block_m"]), B * H)
    _attn_fwd[grid](
        quant["q8"], quant["k8"], v_arg, quant["qs"], quant["ks"], vs, out,
        L, Lp, H, n_sblk,
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D=D, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], SCALE_BLOCK=scale_block,
        PV_FP8=pv_fp8, EMULATE_CAST=v.device.type == "cpu", EXP_SPLIT=EXP2_SPLIT if exp_split is None else exp_split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def fp8_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    pv: str = "fp8",
    scale_block: int = 128,
    qk: str = "fp8",
    norm_rope: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    eps: float = 1e-6,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """softmax(q kᵀ · scale) v with FP8 Q·Kᵀ (per-`scale_block` scales, K smoothed) and FP8 or bf16 P·V.

    q, k, v: (B, H, L, D) bf16 (fp16/fp32 accepted), last dim contiguous, D in {32, 64, 128}.
    scale defaults to 1/sqrt(D). Returns (B, H, L, D) in the input dtype.
    qk="int8" quantizes Q and K to int8 with the same block scales instead (same tensor-core rate on
    H100; about 3x lower logit error than e4m3's 3 mantissa bits on RMS-normed inputs).
    norm_rope=(q_weight, k_weight, cos, sin): q and k before QK-RMSNorm and RoPE, applied in the
    pre-pass (the optional fused variant; `quantize_qkv`).
    On an sm_90 GPU with fp8 P·V and D in {64, 128} the main loop is kernels/fp8_attention_sm90.py's
    warp-specialized kernel (same quantization, 128-key tiles; `_use_sm90`), elsewhere `_attn_fwd`.
    The default scale_block is 128: the same accuracy as 64 on FLUX.2-like inputs and a scalar K scale per
    128-key tile in the sm_90 kernel (reports/fp8_attention/attn_sm90.md).
    """
    if _use_sm90(q, pv, block_n, (block_m, num_warps, num_stages)):
        from flux2_bench.kernels.fp8_attention_sm90 import fp8_attention_sm90

        quant = quantize_qkv(q, k, v, scale=scale, pv=pv, scale_block=scale_block, qk=qk, norm_rope=norm_rope,
                             eps=eps, v_perm16=True)  # fmt: skip
        return fp8_attention_sm90(quant, v, scale_block=scale_block, block_n=block_n or SM90_BLOCK_N)
    quant = quantize_qkv(q, k, v, scale=scale, pv=pv, scale_block=scale_block, qk=qk, norm_rope=norm_rope, eps=eps)
    return fp8_attention_quantized(
        quant,
        v,
        scale_block=scale_block,
        block_m=block_m,
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
    )


# ---------------------------------------------------------------------------------------------------
# references


def _quantize_blocks_ref(x: Tensor, scale_block: int, qk: str = "fp8") -> tuple[Tensor, Tensor]:
    """(B, H, Lp, D) fp32 -> e4m3 (or int8) values as fp32 and per-block scales (B, H, Lp/scale_block)."""
    B, H, Lp, D = x.shape
    xb = x.view(B, H, Lp // scale_block, scale_block, D)
    qmax = QK_RANGE[qk]
    amax = xb.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-30)
    xs = xb * (qmax / amax)
    x8 = torch.floor(xs + 0.5) if qk == "int8" else xs.clamp(-qmax, qmax).to(torch.float8_e4m3fn).float()
    return x8.view(B, H, Lp, D), (amax / qmax).view(B, H, Lp // scale_block)


def _quantize_v_ref(v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """V (B, H, L, D) -> e4m3 values as fp32 and the channel scales (B, H, 1, D): amax = max(V_HEADROOM x the
    sample's |max|, the |max| over all tokens), scale amax / 448, as the pre-pass computes them."""
    vf = v.float().abs()
    amax = torch.maximum(vf[:, :, idx].amax(dim=2, keepdim=True) * V_HEADROOM, vf.amax(dim=2, keepdim=True))
    amax = amax.clamp_min(1e-30)
    vq = (v.float() * (FP8_MAX / amax)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return vq, amax / FP8_MAX


def fp8_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    pv: str = "fp8",
    scale_block: int = 128,
    qk: str = "fp8",
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> Tensor:
    """Pure torch, same quantization as `fp8_attention`, including the online softmax over `block_n`
    key tiles (P is cast to fp8 relative to the running row max, as in the kernel). block_m and the
    launch knobs do not change the math and are accepted for a matching signature."""
    _check_inputs(q, k, v, pv, scale_block, qk)
    B, H, L, D = q.shape
    bn = _default_block_n(q, pv, block_n, (block_m, num_warps, num_stages))
    Lp = triton.cdiv(L, PAD) * PAD
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)

    def pad(x: Tensor) -> Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, Lp - L))

    idx = sample_tokens(L, q.device)
    q8, qs = _quantize_blocks_ref(pad(q.float()), scale_block, qk)
    k8, ks = _quantize_blocks_ref(pad(k.float() - k.float()[:, :, idx].mean(dim=2, keepdim=True)), scale_block, qk)
    q8, k8 = q8[:, :, :L], k8[:, :, :L]
    qs_rows = (qs * (sm_scale * LOG2E)).repeat_interleave(scale_block, dim=-1)[..., :L]
    ks_rows = ks.repeat_interleave(scale_block, dim=-1)[..., :L]
    if pv == "fp8":
        vq, vs = _quantize_v_ref(v, idx)
    else:
        vq = v

    m = torch.full((B, H, L), float("-inf"), device=q.device)
    l_sum = torch.zeros(B, H, L, device=q.device)
    acc = torch.zeros(B, H, L, D, device=q.device)
    for n0 in range(0, L, bn):
        n1 = min(n0 + bn, L)
        qk = q8 @ k8[:, :, n0:n1].transpose(-1, -2)
        if bn <= scale_block:
            c = qs_rows * ks_rows[..., n0 : n0 + 1]
        else:
            qk = qk * ks_rows[..., None, n0:n1]
            c = qs_rows
        m_new = torch.maximum(m, qk.amax(-1) * c)
        alpha = torch.exp2(m - m_new)
        if pv == "fp8":
            p = torch.exp2(qk * c[..., None] - (m_new - P_SHIFT)[..., None])
            pv_tile = p.to(torch.float8_e4m3fn).float() @ vq[:, :, n0:n1]
        else:
            p = torch.exp2(qk * c[..., None] - m_new[..., None])
            pv_tile = p.to(v.dtype).float() @ vq[:, :, n0:n1].float()
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + pv_tile
        m = m_new
    o = acc / l_sum[..., None]
    if pv == "fp8":
        o = o * vs
    return o.to(q.dtype)


def attention_fp32_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, **_unused) -> Tensor:
    """Exact softmax(q kᵀ · scale) v in fp32 (TF32 off), in query chunks so long L fits; returns fp32."""
    B, H, L, D = q.shape
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kf, vf = k.float(), v.float()
    out = torch.empty(B, H, L, D, device=q.device, dtype=torch.float32)
    chunk = max(1, (1 << 28) // max(1, B * H * L))  # about 1 GiB of fp32 logits per chunk
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for i in range(0, L, chunk):
            s = (q[:, :, i : i + chunk].float() @ kf.transpose(-1, -2)) * sm_scale
            out[:, :, i : i + chunk] = torch.softmax(s, dim=-1) @ vf
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out
