"""FP8 flash attention for Hopper (sm_90) in Gluon, warp-specialized (FA3's structure): fp8_attention's main loop on
Hopper (``fp8_attention._use_sm90``).

What
----
``fp8_attention_sm90(quant, v)`` runs the main loop of ``flux2_bench.kernels.fp8_attention`` on the output of
its pre-pass (``quantize_qkv(..., pv="fp8")``): the same maths as ``_attn_fwd`` with fp8 P·V, so the same
reference (``fp8_attention_ref``) holds::

    S = (Q8 · K8ᵀ) · qs[row block] · ks[column block]      (log2 domain: qs carries scale · log2 e)
    P = 2**(S - m + 8) cast to e4m3 (m the running row max; the 2**8 keeps P out of e4m3's subnormals)
    O = (Σ P8 · V8ᵀᵀ) / Σ P · vs[channel]

Q8 and K8 are e4m3 (or int8 for ``qk="int8"``) with one scale per ``scale_block`` tokens, V8 e4m3 stored
transposed (D, Lp) with one scale per channel; all padded to a multiple of 128 tokens by the pre-pass.

Why
---
The Triton kernel (``_attn_fwd``) is issue-bound at 700-770 TFLOP/s on the H100 (reports/fp8_attention,
NOTES.md): the warps that run the softmax also issue the loads and wait for each wgmma, so the tensor cores
idle during the softmax. Here (FA3, Shah et al. 2024):

- one producer warp loads Q once and K / Vᵀ tiles into a ``NUM_STAGES`` ring with TMA;
- two consumer warpgroups own 64 query rows each and share every K / Vᵀ tile (released through ``empty``,
  one arrival per consumer);
- within a consumer, the Q·Kᵀ of tile j and the P·V of tile j - 1 are issued together, and the softmax of
  tile j runs while the P·V wgmma executes (FA3's intra-warpgroup overlap);
- across consumers (``pingpong``), optional ``turn`` mbarriers make the two issue their wgmmas in turns, so
  one's softmax runs under the other's MMAs (FA3's inter-warpgroup ping-pong; not faster here, below).

P stays in registers: the P·V wgmma takes its A operand from registers, and the pre-pass stores Vᵀ's tokens in
the order in which P's accumulator registers already hold the keys (``_p_operand``, ``quantize_qkv(v_perm16=True)``),
so P needs two cvt per four keys and no exchange between threads.

Measured (reports/fp8_attention/attn_sm90.md, runs 1-3, and fp8_attention run 4, H100)
--------------------------------------------------------------------------------------
- Run 1, P converted by Triton's layout conversion: 557-716 TFLOP/s, below the Triton kernel (719-766). The loop
  spent 250 of its 692 instructions per tile moving P into the e4m3 operand layout.
- Run 2, after the relabelling above and the conversion next to its wgmma (a loop-carried e4m3 tensor is kept as
  one 16-bit register per element and repacked every iteration): 772-885 TFLOP/s with 128-token scale blocks,
  1.05-1.15x the Triton kernel, 1.22-1.43x cuDNN bf16. 64-token K scales cost 8-18 % (a per-column factor);
  ping-pong, 3 stages and 64-key tiles were not faster.
- Run 3: the exp2 split (half the exp2 on the FMA pipe) 0.9x, as expected: the loop is not MUFU-bound.
- What limits it (Nsight Compute, ``ncu_attn_sm90.md``, L = 8704 at ncu's base clock): 2344 cycles per 128 x 128
  tile pair per SM, with the tensor pipe 45 % and the MUFU (XU) pipe 46.5 % busy and 42 % of the issue slots
  used; cuDNN bf16 keeps its tensor pipe 77 % busy. The consumers' time goes to their own softmax chain: per warp,
  the exp2 sequence (64 MUFU at 8 cycles each) holds 26 % of the loop's stall samples, the row max 16 %, the
  wgmma waits only 9 %. Each warp's exp2 section (~680 cycles) is mostly outside the other consumer's (the XU is
  busy ~1090 cycles per pair), so the two are not in lockstep, and two warps per scheduler do not hide the rest.
- Run 4 (attn_sm90.md) tried what that suggested and each lost: the turn passed once S is complete (pingpong=2,
  forcing the offset) 0.96-1.0x, the row max / sum as trees (``row_tree``, 9 dependent steps instead of 33)
  0.92-0.97x, FA3's late rescale 0.95-1.0x; ex2.approx.f16x2 is two MUFU.EX2.F16 on sm_90 (no packed exp2).
- Run 5: a third consumer warpgroup (``consumers=3``: 192 query rows per program, 160 registers each) is
  1.09-1.10x two consumers on 64-key tiles (the same bits), so more warps do hide part of the chain; but 64-key
  tiles cost more than that (two consumers on them are 0.85-0.90x the default), so 0.92-0.98x the default in
  all; on 128-key tiles the 160 registers spill (13 loads and 19 stores per tile) and it is 0.82-0.83x.
  Issuing P_j·V_j right after its softmax (no P carried across iterations) spills 2.4 KB at 160 registers and
  makes ptxas serialize the wgmmas (compiled on the CPU; not run). Next steps: P kept as packed e4m3 across
  iterations (16 registers instead of 64: three consumers on 128-key tiles without spills; Gluon 3.6 keeps a
  loop-carried e4m3 tensor as one 16-bit register per element), the row sum through the P·V wgmma (a ones
  column in Vᵀ, N = 136), and split-KV for the 13-wave tail at L = 4608 (a persistent grid alone does not
  remove it: 1728 equal tiles on 132 SMs are 14 rounds either way).

Expectation (written before the first GPU run, session 10)
----------------------------------------------------------
Main kernel alone on the H100, B=1, H=48, D=128: 900-1050 TFLOP/s at L >= 8704 and 850-950 at L = 4608
(Triton kernel: 726-773), i.e. 1.45-1.7x cuDNN bf16's 607-629. FA3 FP8 is published near 1.2 PFLOP/s with
persistent scheduling and in-kernel V transposes; this kernel is not persistent (13 waves at L = 4608, the
last one 9 % full). Risk: the e4m3 layout conversion of P through shared memory instead of registers.
"""

from __future__ import annotations

import os

import torch
import triton

from flux2_bench.kernels import fp8_block_gemm_sm90 as _block
from flux2_bench.kernels.fp8_attention import P_SHIFT as _P_SHIFT

gluon, gl = _block.gluon, _block.gl
if gluon is not None:
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

CONSUMER_ROWS = 64  # query rows per consumer warpgroup; a program has 2 (or 3) consumers
# P = 2**(S - m + P_SHIFT), the Triton kernel's shift (a constexpr global, readable inside the Gluon kernels)
P_SHIFT = gl.constexpr(_P_SHIFT) if gluon is not None else _P_SHIFT
# consumers -> (maxnreg at launch, setmaxnreg of each consumer, of the producer's warpgroup): 2 consumers launch
# 12 warps at 168 and take 232 each (the producer 40); 3 launch 16 warps at 128 and take 160 each (the producer 32)
WS_REGS = _block.WS_REGS
SMEM_BYTES = _block.SMEM_BYTES
EXPECTATION = (
    "kernel alone, H100, B=1 H=48 D=128: 900-1050 TFLOP/s at L >= 8704, 850-950 at L = 4608 (Triton kernel "
    "726-773); written before the first GPU run (session 10)"
)
EXPECTATION_RUN2 = (
    "run 1 measured 557-716 TFLOP/s (below the Triton kernel's 719-766): the SASS loop spent 250 of its 692 "
    "instructions per tile on moving P into the e4m3 operand layout (shuffles, byte extracts and repacks). With "
    "V's tokens permuted so that P's registers are the operand as they are, and P converted next to its wgmma, "
    "the steady-state loop is 466 instructions (scale_block 128). If the loop is issue-bound, time falls by "
    "25-33 %: scale_block 128 from 644-716 to 850-950 TFLOP/s, 1.4-1.55x cuDNN; scale_block 64 about 8 % "
    "behind (its per-column K scale adds 64 multiplies per tile); written before run 2 (session 10)"
)
EXPECTATION_RUN3 = (
    "run 2 measured 772-885 TFLOP/s at scale_block 128 (1.22-1.43x cuDNN, 1.05-1.15x the Triton kernel). The exp2 "
    "split moves 32 of each thread's 64 exp2 per tile off the MUFU pipe for 193 more issued instructions (855 vs 662 "
    "per tile): if the MUFU pipe limits (16384 exp2 per 128x128 tile pair = 1024 cycles, as many as the tensor "
    "cores' share at peak) it gains 5-10 %; if issue or latency limits (two warps per scheduler) it loses 10-20 %. I "
    "expect the loss. fp8_attention as the model calls it (pre-pass + the sm_90 kernel): about 1.0x cuDNN at "
    "L = 4608 (pre-pass ~0.19 ms), 1.35-1.4x at 45568; written before run 3 (session 10)"
)

EXPECTATION_RUN4 = (
    "ncu (ncu_attn_sm90.md) found the tensor pipe 45 % and the MUFU 46.5 % busy at L = 8704: their phases add up "
    "instead of overlapping, because both consumers run their exp2 at the same time (and pp1, turns passed at issue, "
    "does not offset them); the row max is a 33-deep FMNMX chain. Passing the turn once S is complete (pp2) forces "
    "one consumer's softmax under the other's wgmmas: 1.2-1.5x the kernel (950-1200 TFLOP/s). The tree row max/sum "
    "(9-deep): +3-8 % alone, less on top of pp2. Late rescale (FA3's order): 0-5 %. Written before run 4 (session 11)"
)

EXPECTATION_RUN5 = (
    "run 4 and ncu: each consumer warp spends its loop on its own softmax chain (MUFU, row max, issue) and two "
    "consumer warps per scheduler do not hide it. A third consumer warpgroup (192 query rows per program, 160 "
    "registers each) adds a third chain per scheduler: with 64-key tiles (no spills; 64-key tiles alone measured "
    "0.9x in run 2) 1.05-1.25x the library kernel; with 128-key tiles (13 spill loads and 19 stores per tile) "
    "0.9-1.2x. Written before run 5 (session 11)"
)


if gluon is not None:

    @gluon.jit
    def _attn_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, L, Lp):
        """1 warp: Q's 64-row boxes (one per consumer) once, then K and Vᵀ tile j into slot j % NUM_STAGES after
        every consumer released the slot's previous use (parity as in ``fp8_block_gemm_sm90._ws_producer``)."""
        NUM_STAGES: gl.constexpr = k_smem.shape[0]
        BN: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        BM_C: gl.constexpr = q_desc.block_type.shape[0]
        CONSUMERS: gl.constexpr = q_smem.shape[0]
        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        row_q = bh * Lp + pid_m * (CONSUMERS * BM_C)  # rows past Lp: the next head's or zeros (masked at the store)
        mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
        for c in gl.static_range(CONSUMERS):
            tma.async_copy_global_to_shared(q_desc, [row_q + c * BM_C, 0], q_bar, q_smem.index(c))
        for j in range(gl.cdiv(L, BN)):
            s = j % NUM_STAGES
            mbarrier.wait(empty.index(s), ((j // NUM_STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [bh * Lp + j * BN, 0], k_ready.index(s), k_smem.index(s))
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [bh * D, j * BN], v_ready.index(s), v_smem.index(s))

    @gluon.jit
    def _turn_wait(turn, WG: gl.constexpr, k, PINGPONG: gl.constexpr):
        """Ping-pong: before its k-th wgmma issue, consumer 0 waits for consumer 1's (k-1)-th turn, consumer 1 for
        consumer 0's k-th (strict alternation; neither gets more than one phase ahead). A consumer passes its turn
        right after issuing (PINGPONG 1) or once its S tile is complete (PINGPONG 2)."""
        if PINGPONG > 0:
            if WG == 0:
                mbarrier.wait(turn.index(0), (k + 1) & 1, pred=k > 0)
            else:
                mbarrier.wait(turn.index(1), k & 1)

    @gluon.jit
    def _turn_arrive(turn, WG: gl.constexpr, PINGPONG: gl.constexpr, WHEN: gl.constexpr):
        if PINGPONG == WHEN:
            mbarrier.arrive(turn.index(1 - WG), count=1)

    @gluon.jit
    def _exp2_poly(x):
        """2**x without the MUFU unit, as fp8_attention._exp2_fma (same constants and error, 1.7e-3 relative;
        P is rounded to e4m3 next)."""
        x = gl.maximum(x, -127.0)
        t = x + 12582912.0
        f = x - (t - 12582912.0)
        p = (0.2384257 * f + 0.7034428) * f + 1.000443
        return (p.to(gl.int32, bitcast=True) + (t.to(gl.int32, bitcast=True) << 23)).to(gl.float32, bitcast=True)

    @gluon.jit
    def _row_reduce(x, IS_MAX: gl.constexpr, ROW_TREE: gl.constexpr):
        """Row max or sum of an S / P tile. A thread holds, per row, columns 8 g + 2 t + b (g < BN / 8); ``gl.max``
        and ``gl.sum`` fold them in one chain of BN / 4 - 1 dependent instructions per row (ncu: the max chain
        took 15 % of the consumer's stall samples). ROW_TREE folds the g axis in two levels first (16, then 4
        independent chains of 3 per thread), then b and t: 8 dependent steps instead of 32 for BN = 128."""
        if ROW_TREE:  # the reshape only relabels registers; the result holds each row where gl.max(x, 1) does
            t = gl.reshape(x, [x.shape[0], 4, x.shape[1] // 32, 8])  # g = 4 g1 + g0
            if IS_MAX:
                r = gl.max(gl.max(gl.max(t, axis=1), axis=1), axis=1)
            else:
                r = gl.sum(gl.sum(gl.sum(t, axis=1), axis=1), axis=1)
            r = gl.convert_layout(r, gl.SliceLayout(1, x.type.layout))
        elif IS_MAX:
            r = gl.max(x, axis=1)
        else:
            r = gl.sum(x, axis=1)
        return r

    @gluon.jit
    def _softmax_tile(
        qk,
        m_i,
        l_i,
        qs,
        ks_base,
        start_n,
        L,
        SCALE_BLOCK: gl.constexpr,
        EXP_SPLIT: gl.constexpr,
        ROW_TREE: gl.constexpr,
    ):
        """Online softmax of one S tile (fp32 or int32 from the wgmma) in the exp2 domain, as
        ``fp8_attention._attn_tile``: returns P = 2**(S - m_new + 8) (fp32, <= 256), m_new, the updated row
        sum and alpha = 2**(m_old - m_new), the accumulator's rescale factor."""
        BN: gl.constexpr = qk.shape[1]
        col_l: gl.constexpr = gl.SliceLayout(0, qk.type.layout)
        qk = qk.to(gl.float32)
        if start_n + BN > L:  # the tail tile: keys past L (padding, or the next head's rows) get no weight
            offs_n = gl.arange(0, BN, layout=col_l)
            qk = gl.where((start_n + offs_n < L)[None, :], qk, float("-inf"))
        if BN <= SCALE_BLOCK:  # one K scale per tile: it rides in the exp2 argument's FMA
            c = qs * gl.load(ks_base + start_n // SCALE_BLOCK)
            m_new = gl.maximum(m_i, _row_reduce(qk, True, ROW_TREE) * c)
            s = qk * c - (m_new - P_SHIFT)[:, None]
        else:  # two K scales per tile (BN = 2 * SCALE_BLOCK): a per-column factor
            gl.static_assert(BN == 2 * SCALE_BLOCK)
            offs_n = gl.arange(0, BN, layout=col_l)
            c0 = qs * gl.load(ks_base + start_n // SCALE_BLOCK)
            c1 = qs * gl.load(ks_base + start_n // SCALE_BLOCK + 1)
            t = qk * gl.where(offs_n < SCALE_BLOCK, c0, c1)[None, :]
            m_new = gl.maximum(m_i, _row_reduce(t, True, ROW_TREE))
            s = t - (m_new - P_SHIFT)[:, None]
        alpha = gl.exp2(m_i - m_new)
        if EXP_SPLIT:  # odd columns on the FMA pipe (FA4): each thread holds column pairs, the split is in registers
            s0, s1 = gl.split(gl.reshape(s, [s.shape[0], BN // 2, 2]))
            p = gl.reshape(gl.join(gl.exp2(s0), _exp2_poly(s1)), [s.shape[0], BN])
            p = gl.convert_layout(p, qk.type.layout)
        else:
            p = gl.exp2(s)
        l_i = l_i * alpha + _row_reduce(p, False, ROW_TREE)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _p_operand(p, p_l: gl.constexpr):
        """P (fp32, the S accumulator's layout) as the e4m3 A operand of the P·V wgmma, without moving data
        between threads. In the m64nN accumulator thread t of a quad holds, in every 16 columns, columns
        {2t, 2t+1, 2t+8, 2t+9}; the k32 e4m3 A fragment wants keys {4t, ..., 4t+3}. Relabelling column
        c = 8a + 2t + b (per 16) as key k = 4t + 2a + b makes the registers the operand as they are, which is
        right because the pre-pass stored Vᵀ's tokens in that order (``V_PERM``; the sum over keys does not
        care about their order)."""
        BM: gl.constexpr = p.shape[0]
        BN: gl.constexpr = p.shape[1]
        p = gl.reshape(p, [BM, BN // 16, 2, 4, 2])  # c = 16 g + 8 a + 2 t + b
        p = gl.reshape(gl.permute(p, [0, 1, 3, 2, 4]), [BM, BN])  # k = 16 g + 4 t + 2 a + b
        # the same registers in the operand's order (4 consecutive keys per thread first): no data movement
        p = gl.convert_layout(p, gl.DotOperandLayout(operand_index=0, parent=p_l.parent, k_width=4))
        # 4 fp32 -> 4 e4m3 in one 32-bit register (two cvt.rn.satfinite, as Triton's own cast; P <= 256)
        return gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
            "mov.b32 $0, {lo, hi}; }",
            "=r,r,r,r,r", [p], dtype=gl.float8e4nv, is_pure=True, pack=4,
        )  # fmt: skip

    @gluon.jit
    def _attn_consumer(
        q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, qs_ptr, ks_ptr, vs_ptr, o_ptr,
        L, H, n_sblk, stride_ob, stride_oh, stride_ol,
        SCALE_BLOCK: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr, EXP_SPLIT: gl.constexpr,
        ROW_TREE: gl.constexpr, LATE_RESCALE: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup: query rows [WG * 64, WG * 64 + 64) of the program's 128 against every key tile.
        Iteration j issues S_j = Q·K_jᵀ and O += P_{j-1}·V_{j-1} (async), waits for S_j only, runs the
        softmax of tile j under the P·V wgmma, then waits for it and releases slot j - 1. O is rescaled by
        alpha_j at the end of iteration j, or (LATE_RESCALE, FA3's order) in iteration j + 1 between the two
        issues, where it runs under the Q·K wgmma instead of before it."""
        NUM_STAGES: gl.constexpr = k_smem.shape[0]
        BN: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        BM: gl.constexpr = q_smem.shape[1]
        gl.static_assert(gl.num_warps() == 4)
        gl.static_assert(BM == 64)
        QK_INT8: gl.constexpr = q_smem.dtype == gl.int8
        acc_s_ty: gl.constexpr = gl.int32 if QK_INT8 else gl.float32
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 32])
        p_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=4)  # e4m3: 4 per 32 bits
        row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        row_o: gl.constexpr = gl.SliceLayout(1, mma_o)
        col_o: gl.constexpr = gl.SliceLayout(0, mma_o)
        AT_ISSUE: gl.constexpr = 1
        AT_S_DONE: gl.constexpr = 2

        pid_m = gl.program_id(0)
        bh = gl.program_id(1)
        CONSUMERS: gl.constexpr = q_smem.shape[0]
        row0 = pid_m * (CONSUMERS * BM) + WG * BM
        # 64 rows share one Q scale (SCALE_BLOCK >= 64); with three consumers the last rows can lie past Lp
        qs = gl.load(qs_ptr + bh * n_sblk + gl.minimum(row0 // SCALE_BLOCK, n_sblk - 1))
        ks_base = ks_ptr + bh * n_sblk
        n_tiles = gl.cdiv(L, BN)
        q = q_smem.index(WG)
        m_i = gl.full([BM], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([BM], gl.float32, row_s)
        acc = gl.zeros([BM, D], gl.float32, mma_o)
        mbarrier.wait(q_bar, 0)

        # tile 0: S_0 and its softmax (O is still zero: no P·V yet)
        _turn_wait(turn, WG, 0, PINGPONG)
        mbarrier.wait(k_ready.index(0), 0)
        qk = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], acc_s_ty, mma_s), use_acc=False,
                           is_async=True)  # fmt: skip
        _turn_arrive(turn, WG, PINGPONG, AT_ISSUE)
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
        _turn_arrive(turn, WG, PINGPONG, AT_S_DONE)
        # P stays fp32 across iterations and becomes the e4m3 operand next to the wgmma that reads it: a
        # loop-carried e4m3 tensor is kept as one 16-bit register per element and repacked (2.5x the instructions)
        p, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, qs, ks_base, 0, L, SCALE_BLOCK, EXP_SPLIT, ROW_TREE)

        for j in range(1, n_tiles):
            s = j % NUM_STAGES
            sp = (j - 1) % NUM_STAGES
            _turn_wait(turn, WG, j, PINGPONG)
            mbarrier.wait(k_ready.index(s), (j // NUM_STAGES) & 1)
            qk = warpgroup_mma(q, k_smem.index(s).permute((1, 0)), gl.zeros([BM, BN], acc_s_ty, mma_s),
                               use_acc=False, is_async=True)  # fmt: skip
            if LATE_RESCALE:  # alpha_{j-1}: O (sum over tiles < j - 1) from m_{j-2} to m_{j-1}
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            p_op = _p_operand(p, p_l)
            mbarrier.wait(v_ready.index(sp), ((j - 1) // NUM_STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(sp).permute((1, 0)), acc, is_async=True)
            _turn_arrive(turn, WG, PINGPONG, AT_ISSUE)
            qk = warpgroup_mma_wait(num_outstanding=1, deps=(qk,))  # S_j done; P_{j-1}·V_{j-1} may still run
            _turn_arrive(turn, WG, PINGPONG, AT_S_DONE)
            p, m_i, l_i, alpha = _softmax_tile(qk, m_i, l_i, qs, ks_base, j * BN, L, SCALE_BLOCK, EXP_SPLIT, ROW_TREE)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(sp), count=1)
            if not LATE_RESCALE:
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]

        # the last tile's P·V
        sp = (n_tiles - 1) % NUM_STAGES
        _turn_wait(turn, WG, n_tiles, PINGPONG)
        if LATE_RESCALE:
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = _p_operand(p, p_l)
        mbarrier.wait(v_ready.index(sp), ((n_tiles - 1) // NUM_STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(sp).permute((1, 0)), acc, is_async=True)
        _turn_arrive(turn, WG, PINGPONG, AT_ISSUE)
        _turn_arrive(turn, WG, PINGPONG, AT_S_DONE)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(sp), count=1)

        offs_m = row0 + gl.arange(0, BM, layout=row_o)
        offs_d = gl.arange(0, D, layout=col_o)
        vs = gl.load(vs_ptr + bh * D + offs_d)
        o = acc * (1.0 / gl.convert_layout(l_i, row_o))[:, None] * vs[None, :]
        off_b = (bh // H).to(gl.int64)
        off_h = (bh % H).to(gl.int64)
        o_ptrs = (o_ptr + off_b * stride_ob + off_h * stride_oh + offs_m.to(gl.int64)[:, None] * stride_ol
                  + offs_d[None, :])  # fmt: skip
        gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=(offs_m < L)[:, None])

    @gluon.jit
    def _fp8_attention_sm90_kernel(
        q_desc,  # (B*H*Lp, D) e4m3 / int8, block [64, D]
        k_desc,  # (B*H*Lp, D) e4m3 / int8, block [BLOCK_N, D]
        v_desc,  # (B*H*D, Lp) e4m3 (Vᵀ), block [D, BLOCK_N]
        qs_ptr, ks_ptr, vs_ptr, o_ptr,
        L, Lp, H, n_sblk, stride_ob, stride_oh, stride_ol,
        SCALE_BLOCK: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        PINGPONG: gl.constexpr,
        EXP_SPLIT: gl.constexpr,
        ROW_TREE: gl.constexpr,
        LATE_RESCALE: gl.constexpr,
        CONSUMERS: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        BM_C: gl.constexpr = q_desc.block_type.shape[0]
        D: gl.constexpr = q_desc.block_type.shape[1]
        BN: gl.constexpr = k_desc.block_type.shape[0]
        gl.static_assert(num_warps == 4)  # the default partition is consumer 0
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS, BM_C, D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [NUM_STAGES, BN, D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [NUM_STAGES, D, BN], v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)  # one arrival per consumer
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)
        fence_async_shared()

        # the consumer tuples are spelled out (see fp8_block_gemm_sm90: tuples built from a shared prefix lose
        # their constexprs in triton 3.6); the default partition (the kernel's 4 warps) is consumer 0
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        WG2: gl.constexpr = 2
        # fmt: off
        if CONSUMERS == 2:
            gl.warp_specialize(
                [
                (_attn_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, qs_ptr, ks_ptr, vs_ptr,
                                  o_ptr, L, H, n_sblk, stride_ob, stride_oh, stride_ol, SCALE_BLOCK, WG0, PINGPONG,
                                  EXP_SPLIT, ROW_TREE, LATE_RESCALE)),
                (_attn_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, qs_ptr, ks_ptr, vs_ptr,
                                  o_ptr, L, H, n_sblk, stride_ob, stride_oh, stride_ol, SCALE_BLOCK, WG1, PINGPONG,
                                  EXP_SPLIT, ROW_TREE, LATE_RESCALE)),
                (_attn_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, L,
                                  Lp)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:
            gl.warp_specialize(
                [
                (_attn_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, qs_ptr, ks_ptr, vs_ptr,
                                  o_ptr, L, H, n_sblk, stride_ob, stride_oh, stride_ol, SCALE_BLOCK, WG0, PINGPONG,
                                  EXP_SPLIT, ROW_TREE, LATE_RESCALE)),
                (_attn_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, qs_ptr, ks_ptr, vs_ptr,
                                  o_ptr, L, H, n_sblk, stride_ob, stride_oh, stride_ol, SCALE_BLOCK, WG1, PINGPONG,
                                  EXP_SPLIT, ROW_TREE, LATE_RESCALE)),
                (_attn_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, turn, qs_ptr, ks_ptr, vs_ptr,
                                  o_ptr, L, H, n_sblk, stride_ob, stride_oh, stride_ol, SCALE_BLOCK, WG2, PINGPONG,
                                  EXP_SPLIT, ROW_TREE, LATE_RESCALE)),
                (_attn_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, empty, L,
                                  Lp)),
                ],
                [4, 4, 1],
                [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
            )
        # fmt: on


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

is_available = _block.is_available
FAST_LAUNCH = os.environ.get("FLUX2_FAST_LAUNCH", "1") == "1"
_LAUNCHERS: dict[tuple, tuple] = {}
BLOCK_NS = (64, 128)
BLOCK_N_DEFAULT = 128
PINGPONG_MODES = {0: "off", 1: "turn passed at issue", 2: "turn passed when S is complete"}


def smem_bytes(num_stages: int, block_n: int, head_dim: int = 128, consumers: int = 2) -> int:
    """Shared memory of the kernel: Q's 64-row boxes (one per consumer), the K and Vᵀ ring (``block_n`` x D bytes
    each per stage) and the mbarriers."""
    return consumers * CONSUMER_ROWS * head_dim + 2 * num_stages * block_n * head_dim + 8 * (1 + 3 * num_stages + 2)


def check_config(head_dim: int, scale_block: int, block_n: int, num_stages: int, consumers: int = 2) -> None:
    """What the kernel supports; raises ValueError otherwise."""
    if consumers not in WS_REGS:
        raise ValueError(f"consumers must be one of {sorted(WS_REGS)}, got {consumers}")
    if head_dim not in (64, 128):
        raise ValueError(f"fp8_attention_sm90 needs head dim 64 or 128, got {head_dim}")
    if block_n not in BLOCK_NS:
        raise ValueError(f"block_n must be one of {BLOCK_NS}, got {block_n}")
    if scale_block not in (64, 128):
        raise ValueError(f"scale_block must be 64 or 128, got {scale_block}")
    if block_n > 2 * scale_block:
        raise ValueError(f"block_n={block_n} spans more than two K scale blocks of {scale_block}")
    if not 2 <= num_stages <= 6:
        raise ValueError(f"num_stages must be in 2..6, got {num_stages}")
    smem = smem_bytes(num_stages, block_n, head_dim, consumers)
    if smem > SMEM_BYTES:
        raise ValueError(f"num_stages={num_stages} with block_n={block_n} needs {smem} B of shared memory, more "
                         f"than sm_90's {SMEM_BYTES}")  # fmt: skip


def fp8_attention_sm90(
    quant: dict[str, torch.Tensor],
    v: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scale_block: int = 128,
    block_n: int = BLOCK_N_DEFAULT,
    num_stages: int = 2,
    pingpong: int = 0,
    exp_split: bool = False,
    row_tree: bool = False,
    late_rescale: bool = False,
    consumers: int = 2,
) -> torch.Tensor:
    """The attention main loop on sm_90 (module docstring) on ``quant = quantize_qkv(q, k, v, pv="fp8",
    scale_block=scale_block, v_perm16=True)`` (qk "fp8" or "int8"); ``v`` the original V, for shape and output dtype.
    Returns (B, H, L, D) in v's dtype (or writes ``out``, any strides with a contiguous last dim).
    ``block_n``: keys per tile (64 or 128); ``num_stages``: depth of the K / Vᵀ ring; ``pingpong``: the
    two consumer warpgroups issue their wgmmas in turns, passing the turn right after issuing (1) or once their S
    tile is complete (2; ``PINGPONG_MODES``); ``exp_split``: half of each tile's exp2 on the FMA pipe
    (``_exp2_poly``) instead of the MUFU unit; ``row_tree``: the row max and sum as trees instead of one chain
    (``_row_reduce``); ``late_rescale``: O rescaled under the next Q·K wgmma (FA3's order); ``consumers``: 2 or 3
    consumer warpgroups of 64 query rows per program (3: 160 registers each instead of 232, no ping-pong)."""
    if int(pingpong) not in PINGPONG_MODES:
        raise ValueError(f"pingpong must be one of {sorted(PINGPONG_MODES)} ({PINGPONG_MODES}), got {pingpong!r}")
    pingpong = int(pingpong)
    if "vt8p" not in quant:
        raise ValueError("fp8_attention_sm90 runs fp8 P·V on Vᵀ in its token order: quantize_qkv(..., pv='fp8', "
                         "v_perm16=True)")  # fmt: skip
    B, H, L, D = v.shape
    q8, k8, vt8 = quant["q8"], quant["k8"], quant["vt8p"]
    Lp = q8.shape[2]
    check_config(D, scale_block, block_n, num_stages, consumers)
    if consumers != 2 and pingpong:
        raise ValueError("pingpong alternates two consumers: it needs consumers=2")
    if q8.shape != (B, H, Lp, D) or k8.shape != q8.shape or vt8.shape != (B, H, D, Lp) or Lp % 128:
        raise ValueError(f"quant does not match v {tuple(v.shape)}: q8 {tuple(q8.shape)}, k8 {tuple(k8.shape)}, "
                         f"vt8 {tuple(vt8.shape)}")  # fmt: skip
    if quant["qs"].shape[2] * scale_block != Lp:
        raise ValueError(f"quant was made with another scale_block than {scale_block}")
    for name, t in (("q8", q8), ("k8", k8), ("vt8p", vt8)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (as quantize_qkv writes it)")
    if out is None:
        out = torch.empty(B, H, L, D, device=v.device, dtype=v.dtype)
    elif out.shape != v.shape or out.dtype != v.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(v.shape)} {v.dtype} with a contiguous last dim")
    _block.check_sm90_launch("fp8_attention_sm90", q8, k8, vt8, quant["qs"], quant["ks"], quant["vs"], out)
    if B * H == 0:
        return out
    qk_gl = gl.int8 if q8.dtype == torch.int8 else gl.float8e4nv
    q2, k2, v2 = q8.view(-1, D), k8.view(-1, D), vt8.view(-1, Lp)
    ints = (L, Lp, H, quant["qs"].shape[2], out.stride(0), out.stride(1), out.stride(2))
    consts = dict(SCALE_BLOCK=scale_block, NUM_STAGES=num_stages, PINGPONG=pingpong, EXP_SPLIT=bool(exp_split),
                  ROW_TREE=bool(row_tree), LATE_RESCALE=bool(late_rescale), CONSUMERS=consumers,
                  PRODUCER_REGS=WS_REGS[consumers][2], CONSUMER_REGS=WS_REGS[consumers][1])  # fmt: skip
    grid = (triton.cdiv(Lp, consumers * CONSUMER_ROWS), B * H, 1)
    index = v.device.index if v.device.index is not None else torch.cuda.current_device()
    key = (index, q8.dtype, out.dtype, D, block_n, grid, *ints, *consts.values(),
           *(t.data_ptr() % 16 == 0 for t in (quant["qs"], quant["ks"], quant["vs"], out)))  # fmt: skip

    def make():
        q_desc = TensorDescriptor(q2, list(q2.shape), [D, 1], [CONSUMER_ROWS, D],
                                  gl.NVMMASharedLayout.get_default_for([CONSUMER_ROWS, D], qk_gl))  # fmt: skip
        k_desc = TensorDescriptor(k2, list(k2.shape), [D, 1], [block_n, D],
                                  gl.NVMMASharedLayout.get_default_for([block_n, D], qk_gl))  # fmt: skip
        v_desc = TensorDescriptor(v2, list(v2.shape), [Lp, 1], [D, block_n],
                                  gl.NVMMASharedLayout.get_default_for([D, block_n], gl.float8e4nv))  # fmt: skip
        return grid, (q_desc, k_desc, v_desc)

    _block.launch_cached(_LAUNCHERS, key, FAST_LAUNCH, _fp8_attention_sm90_kernel, (q2, k2, v2),
                         (quant["qs"], quant["ks"], quant["vs"], out, *ints), make, consts, num_warps=4,
                         maxnreg=WS_REGS[consumers][0])  # fmt: skip
    return out
