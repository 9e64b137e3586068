"""Weight-only FP8 GEMM for Hopper (sm_90) in Gluon, warp-specialized, e4m3 weights decoded in registers.

What
----
``fp8_weight_only_sm90(x, w, w_scale)`` computes what ``flux2_bench.kernels.fp8_matmul.fp8_weight_only_linear``
computes (reference: ``fp8_weight_only_linear_ref``) for bf16 activations::

    out = residual + gate[None, :] * (x @ (w * w_scale).T)

- ``x``: (M, K) bf16, K contiguous. ``w``: (N, K) e4m3 (or its uint8 view), K contiguous.
- ``w_scale``: one element (per-tensor), (N,) / (N, 1) per output channel, or (ceil(N/128), ceil(K/128))
  128 x 128 blocks.

fp32 accumulation; per-tensor and per-channel scales are applied once, in the epilogue; block scales multiply
the decoded weights of each K step (in fp32, rounded to bf16 for the MMA, as the Triton kernel does).

Why
---
The weight-only path exists for GPUs without FP8 tensor cores (sm_80/86), where the Triton kernel
(``fp8_matmul._fp8_weight_only_kernel``) runs. On the H100, where the issue's target is measured (within 1.1x of
bf16 cuBLAS time), that kernel reached 0.58-0.66x cuBLAS (reports/fp8_matmul run 15): its warps issue the
activation loads (cp.async), read and decode the weights and issue the wgmmas in one stream, 2 warps per
scheduler, and ncu (ncu_wo_m512.txt, txt.qkv) shows 23 % of issue slots and 41 % of the tensor pipe used, i.e.
latency, not work. Large M was routed to "dequantize to bf16 + cuBLAS" instead, which costs a bf16 copy of the
weight (up to 680 MB for single.linear1) and a pass over it per call.

This kernel is the row GEMM's warp-specialized structure (``fp8_row_gemm_sm90``: one TMA producer warp, two
consumer warpgroups, ``ready`` / ``empty`` mbarriers per ring slot, persistent grid) with the tile computed
transposed, Cᵀ = W·Xᵀ ("swap AB", as the Triton kernel): the decoded weights are the wgmma's A operand, which
Hopper takes from registers, and the activations are its B operand in shared memory. Per K step (64) each
consumer issues the async wgmmas (m64nBTk16 x 4) of step k on weights decoded in the step before, then waits
for step k + 1's slot, reads its 64 x 64 weight bytes into the A-fragment layout and decodes them (PRMT / LOP /
one packed FMA per two weights: ``_e4m3_bits_to_bf16`` of fp8_matmul) under those wgmmas, then waits for them.
No wgmma stays in flight across the loop's back edge: when one did (wait until one is in flight, the row
GEMM's scheme), ptxas serialized every wgmma, as it reads its A operand from registers ("insufficient register
resources", C7512). The epilogue transposes through shared memory and stores with TMA.

Expectation (written before the first GPU run, session 12)
----------------------------------------------------------
GPU time against bf16 cuBLAS (``torch.mm``), FLUX.2-dev shapes at 1024²: the M = 512 text GEMMs 0.80-0.95x
(from 0.58-0.63x; the tile count sets the ceiling there: txt.qkv 288 tiles of 128 x 256 on 132 SMs is 2.2
waves), the M >= 4096 shapes 0.85-1.0x (the decode is about 3 ALU instructions per 256 MACs per thread).
Risk: the A fragment read from the swizzled byte tile may be many narrow shared loads.

Measured (run 1, reports/fp8_weight_only/wo_sm90_run1.json, H100, interleaved A/B GPU time against bf16 cuBLAS)
--------------------------------------------------------------------------------------------------------------
256-token tiles: 0.69-0.75x on the M = 512 text GEMMs (the Triton fused kernel: 0.57-0.63x), 0.77-0.85x on
M >= 4096 (dequantize + cuBLAS: 0.91-0.93x). 128-token tiles: 0.46-0.60x everywhere. Bits equal to the Triton
fused kernel without the epilogue. The expectation was missed on both counts. What the CPU compile shows
(compile_wo_sm90.py): the K loop is ~210 SASS instructions per warp and K step (16 LDS.U16 for the A fragment,
72 PRMT, 16 packed FMAs), ~42 % of the issue slots at 256 tokens and ~85 % at 128 tokens, which is why 128-token
tiles lose. At 256 tokens the loss is latency: ptxas treats the wgmma's read of its register A operand as done
at the issue, gives the next step's decoded weights the same registers and holds every write to them back until
``warpgroup_mma_wait``: about 90 of the decode's instructions run after the wait, outside the window the wgmma
covers. Unrolling two K steps with two register sets did not change that (ptxas gave both the same registers),
nor did splitting the decode so that only the final FMA writes the operand (ptxas scheduled the SASS
identically), nor an empty asm use of the old weights after the wait (ptxas sees no use). The M = 512 shapes
are further capped by tiles per SM: 96 tiles on 132 SMs (txt.proj, txt.mlp_out) and 2.2 waves (txt.qkv).
Next steps: a K loop that keeps the decoded weights in explicitly distinct registers across the wait (a
two-stage register ring written in PTX), and stream-K for the M = 512 shapes.

Stream-K (session 13; ``stream_k=True``, chosen by ``use_stream_k``)
--------------------------------------------------------------------
At M = 512 whole tiles leave SMs idle: 96 tiles of 128 x 256 on 132 SMs (txt.proj, txt.mlp_out), 2.2 and 4.4
waves (txt.qkv, txt.mlp_in). Stream-K gives every program an equal share of the (tile, K step) iterations,
one lane of programs per token tile, weight-tile major (``_sk_share``: program j of every lane reads the same
weights at the same time, so they come from HBM once). A tile split between programs meets in an fp32
workspace: each program stores its partial (``evict_last``) and counts itself on the tile's counter; the last
to arrive sums the partials in program order (bits independent of timing), runs the epilogue and zeroes the
counter. No program waits for another. Measured (H100, reports/fp8_weight_only/wo_sm90.md, runs 3-5, A/B
against bf16 cuBLAS): txt.qkv 0.72 -> 0.85x, txt.mlp_out 0.74-0.76 -> 0.80x, txt.mlp_in 0.81-0.83 -> 0.85x,
txt.proj 0.74 -> 0.71x; the library's weight-only geomean over the 10 FLUX.2-dev shapes 0.836 -> 0.874x
(target 0.91: missed). Expected: 1.2-1.35x data-parallel on the 96-tile and 2.2-wave shapes. Why not
(probe_wo_sk.py, two runs): the K loop alone on 132 programs runs 10-20 % slower per step than on 96 (the
tile's 40 KB of operands per K step are mostly the bf16 activations, and 132 SMs pull ~6 TB/s from L2, where
the row GEMM saw the same limit in run 9 of reports/fp8_matmul), the partial stores cost 4-10 us and the fixup
4-9 us per launch (the latter unchanged by evict_last). txt.proj's 70-step shares do not pay for that, hence
``SK_MIN_STEPS``. Next: keep the owner's partial out of memory (the owner, whose share ends in the tile's first
K steps, waits for the others' partials and sums them from shared memory, which the ring frees at the end of
its share), and cut the activations' L2 traffic per MAC (TMA multicast across a cluster, not exposed by Gluon
3.6, or 192 weight rows per tile).

uint16-pair decode (session 14; ``DECODE=1``, the default; ``FLUX2_WO_DECODE=0`` restores the uint8 one)
-------------------------------------------------------------------------------------------------------
The K loop's 72 PRMT per warp and K step were not the decode's: the weights were loaded as uint8 elements of the
A-fragment layout (one LDS.U16 per byte pair), each byte then extracted into its own register and four of them
repacked into the 32-bit input of the 4-byte decode asm, whose outputs were then split again. ``_decoded_step``
now views the weight tile as uint16 pairs (``_reinterpret``, same swizzle), loads them in a linear layout whose
two bf16 halves, joined and reshaped, are the A fragment register for register (the ``convert_layout`` compiles
to nothing), and decodes each pair straight from the load's register (``E4M3X2_TO_BF16X2_PTX``: PRMT, two LOP3,
SHF, HFMA2). CPU compile: 213 -> 161 SASS instructions per warp and K step, PRMT 72 -> 16, same values (GPU tests:
every e4m3 code through both decodes; bits equal to the Triton fused kernel).
Expected 1.05-1.15x on M >= 4096 (``EXPECTATION_RUN6``); measured (wo_sm90 run 6, H100, A/B against bf16 cuBLAS):
data-parallel 0.96-1.02x against 0.82-0.875x for the uint8 decode (1.17x), stream-K at M = 512 0.87-0.98x on the
three shapes it is chosen for (uint8: 0.80-0.86x), txt.proj 0.815x data-parallel. The gain beat the expectation:
the decode's issue slots, not only its latency after the wait, held the loop back. ptxas still places most of
the decode after the wgmma wait (72 instructions; an asm that waits with the decoded registers as operands did
not move them: ptxas sinks the producers below it). With it the kernel beats dequantize + cuBLAS (0.90-0.95x) at
every M, and ``fp8_matmul.fp8_weight_only_linear`` runs it for every M on sm_90: the library's weight-only
geomean over the 10 FLUX.2-dev shapes is 0.953x bf16 cuBLAS by A/B (reports/fp8_matmul run 17; target 0.91 met),
and no bf16 copy of the weight is made per call.
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from flux2_bench.kernels import fp8_block_gemm_sm90 as _block
from flux2_bench.kernels.fp8_matmul import E4M3_TO_BF16_PTX, _check_epilogue

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

# e4m3 pair -> bf16 pair (``_e4m3x2_to_bf16x2``): fp8_matmul.E4M3_TO_BF16_PTX's maths on one 16-bit input
E4M3X2_TO_BF16X2_PTX = tl.constexpr(
    """
        {
        .reg .b32 t, u, s, two120, negzero;
        mov.b32 two120, 0x7B807B80;
        mov.b32 negzero, 0x80008000;
        cvt.u32.u16 t, $2;
        prmt.b32 t, t, 0, 0x1404;
        and.b32 u, t, 0x7FFF7FFF;
        shr.b32 u, u, 4;
        and.b32 s, t, 0x80008000;
        or.b32 u, u, s;
        fma.rn.bf16x2 u, u, two120, negzero;
        mov.b32 {$0, $1}, u;
        }
        """
)

BLOCK_K = 64  # 128 bytes of bf16 activations per row: one full swizzle line
ROWS = 64  # weight rows per consumer warpgroup (the wgmma's M)
GROUP = 8
SMEM_BYTES = _block.SMEM_BYTES
MAXNREG, CONSUMER_REGS, PRODUCER_REGS = _block.WS_REGS[2]
EXPECTATION = (
    "GPU time vs bf16 cuBLAS: M = 512 text GEMMs 0.80-0.95x (from 0.58-0.63x), M >= 4096 0.85-1.0x; written "
    "before the first run (session 12)"
)
EXPECTATION_RUN2 = (
    "run 2 (256-token tiles for every M, dispatched below 1024 rows; dequantize + cuBLAS from 1024): the library's "
    "weight-only geomean over the 10 shapes about 0.83x cuBLAS (run 1's best variant per shape: 0.834), the "
    "M = 512 shapes 0.69-0.75x; written before run 2"
)
EXPECTATION_RUN3 = (
    "run 3 (stream-K): per SM the data-parallel kernel already runs the M = 512 tiles near its M >= 4096 rate, "
    "and 96 tiles (txt.proj, txt.mlp_out) or 2.2 / 4.4 waves (txt.qkv, txt.mlp_in) leave 27 % / 27 % / 13 % of the "
    "SM slots idle; an even split recovers that less the fixup (about 0.5 MB of fp32 partials written and read "
    "per SM, ~5 us): stream-K / data-parallel 1.2-1.35x on the 96-tile and 2.2-wave shapes, 1.05-1.15x on "
    "txt.mlp_in, 0.95-1.02x at M >= 4096 (not dispatched there); bf16 cuBLAS / ours at M = 512 0.85-0.97x and "
    "the library's geomean over the 10 shapes 0.88-0.92x; written before run 3 (session 13)"
)
EXPECTATION_RUN4 = (
    "run 4 (fixup loads four partials per L2 round trip, 64-token chunks): run 3 measured stream-K / data-parallel "
    "0.89x (txt.proj), 1.05x (txt.mlp_out, txt.mlp_in), 1.17x (txt.qkv), i.e. ~25 us more than an even split of "
    "the data-parallel steps on txt.proj; if that is the fixup's serial L2 round trips (8 chunks x 2-3 partials), "
    "txt.proj goes to ~1.1x data-parallel and the others gain 0.05-0.1x; if the K loop itself slows with 132 "
    "programs instead of 96 (L2 bandwidth: ~5.5 TB/s of operand traffic in run 3), txt.mlp_out stays near 1.05x; "
    "written before run 4 (session 13)"
)
EXPECTATION_RUN5 = (
    "run 5 (partials stored evict_last; stream-K only for shares of >= 128 K steps): probe_wo_sk run 1 put the "
    "partial stores at 7-12 us and the fixup at 4-10 us, and ncu saw ~25 MB more DRAM traffic than data-parallel "
    "(partials evicted by the streaming weights before the fixup reads them): with evict_last the fixup falls "
    "to 2-6 us, stream-K +0.01-0.03x on txt.qkv / txt.mlp_out / txt.mlp_in; txt.proj back to data-parallel "
    "(0.73-0.74x); the library's geomean 0.87-0.88x; written before run 5 (session 13)"
)

EXPECTATION_RUN6 = (
    "run 6 (weights read and decoded as uint16 pairs, DECODE=1): the CPU compile puts each consumer's K loop at 161 "
    "SASS instructions per warp and K step instead of 213 (PRMT 72 -> 16: the uint8 elements were unpacked and "
    "repacked around the asm) and 72 of them after the wgmma wait instead of ~95; if the decode's issue and "
    "latency hold the K loop back, data-parallel 1.05-1.15x the uint8 decode on M >= 4096 (bf16 cuBLAS / ours "
    "0.81-0.875 -> 0.88-0.95) and 1.03-1.10x at M = 512 (partly L2-bound there), bits unchanged; the library "
    "(dispatch unchanged: dequantize + cuBLAS from 1024 rows) 0.874 -> 0.88-0.90; written before run 6 (session 14)"
)

if gluon is not None:

    @gluon.jit
    def _e4m3_bits_to_bf16(wb):
        """uint8 e4m3 bit patterns -> exact bf16 values, four per 32-bit register: fp8_matmul's decode (PRMT
        the bytes into the high halves of 16-bit lanes, shift the magnitude to bf16's exponent/mantissa
        position, one packed FMA by 2^120). Elementwise, so any register grouping of the layout is right."""
        return gl.inline_asm_elementwise(
            E4M3_TO_BF16_PTX,
            "=r,=r,r",
            [wb],
            dtype=gl.bfloat16,
            is_pure=True,
            pack=4,
        )

    @gluon.jit
    def _e4m3x2_to_bf16x2(wp):
        """uint16 pairs of e4m3 bit patterns (the lower-addressed weight in the low byte) -> the two exact bf16
        values (low, high). One 16-bit input per asm: PRMT straight from the shared load's register, no byte
        unpacking and repacking (``_e4m3_bits_to_bf16`` on uint8 elements costs ~3 extra PRMT per two weights)."""
        return gl.inline_asm_elementwise(
            E4M3X2_TO_BF16X2_PTX,
            "=h,=h,h",
            [wp],
            dtype=(gl.bfloat16, gl.bfloat16),
            is_pure=True,
            pack=1,
        )

    @gluon.jit
    def _decoded_step(w_smem, ready, w_scale_ptr, it, j, off_w, stride_wsn, stride_wsk, a_l: gl.constexpr,
                      SCALE_MODE: gl.constexpr, WG: gl.constexpr, pred=True, DECODE: gl.constexpr = 0):  # fmt: skip
        """Wait for ring step ``it`` (K step ``j`` of the tile; no wait where ``pred`` is false) and return this
        consumer's 64 x BK weights as the bf16 A operand (block scales applied, rounded to bf16). ``DECODE``: 0
        decodes uint8 elements four at a time, 1 uint16 pairs (``_e4m3x2_to_bf16x2``); same values."""
        NUM_STAGES: gl.constexpr = ready.shape[0]
        BW: gl.constexpr = w_smem.shape[1]
        BK: gl.constexpr = w_smem.shape[2]
        s = it % NUM_STAGES
        mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1, pred=pred)
        if DECODE == 1:
            # (BW, BK // 2) uint16 pairs laid out so that their two bf16 halves, joined and reshaped to (BW, BK),
            # are the wgmma A fragment (a_l) register for register: thread t of warp w holds rows 16 w + t // 4
            # (+ 8), pairs t % 4 (+ 4, + 8 per k16 step)
            gl.static_assert((BW == 64) & (BK == 64))
            pair_l: gl.constexpr = gl.DistributedLinearLayout(
                reg_bases=[[8, 0], [0, 4], [0, 8], [0, 16]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[BW, BK // 2])  # fmt: skip
            pairs_smem = w_smem.index(2 * s + WG)._reinterpret(
                gl.uint16, [BW, BK // 2], gl.NVMMASharedLayout(swizzle_byte_width=BK, element_bitwidth=16, rank=2)
            )
            lo, hi = _e4m3x2_to_bf16x2(pairs_smem.load(pair_l))
            w = gl.convert_layout(gl.reshape(gl.join(lo, hi), [BW, BK]), a_l)
        else:
            w = _e4m3_bits_to_bf16(w_smem.index(2 * s + WG).load(a_l))
        if SCALE_MODE == 2:  # 128 x 128 blocks: one scale per (128 rows, 128 columns); 64 rows and BK divide 128
            sc = gl.load(w_scale_ptr + (off_w // 128) * stride_wsn + ((j * BK) // 128) * stride_wsk)
            w = (w.to(gl.float32) * sc).to(gl.bfloat16)
        return w

    @gluon.jit
    def _k_range(w_smem, x_smem, ready, empty, w_scale_ptr, it, k_lo, k_hi, off_w, stride_wsn, stride_wsk,
                 SCALE_MODE: gl.constexpr, WG: gl.constexpr, DECODE: gl.constexpr):  # fmt: skip
        """K steps [k_lo, k_hi) of one tile for this consumer's 64 weight rows, ring steps from ``it`` on: returns
        the fp32 accumulator (64 x BT, unscaled) and the next ring step. Per K step: issue the async wgmma on the
        decoded weights of this step, then wait for the next step's slot (``ready``) and read and decode its
        weights under the wgmma, wait for the wgmma, release this step's slot (``empty``)."""
        NUM_STAGES: gl.constexpr = x_smem.shape[0]
        BW: gl.constexpr = w_smem.shape[1]
        BT: gl.constexpr = x_smem.shape[1]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BT, 16])
        a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        acc = gl.zeros([BW, BT], gl.float32, layout=mma)
        w = _decoded_step(w_smem, ready, w_scale_ptr, it, k_lo, off_w, stride_wsn, stride_wsk, a_l, SCALE_MODE, WG,
                          DECODE=DECODE)  # fmt: skip
        for j in range(k_lo, k_hi):
            s = it % NUM_STAGES
            acc = warpgroup_mma(w, x_smem.index(s).permute((1, 0)), acc, is_async=True)
            # under the wgmma: wait for and decode step j + 1 (past the range's last step: a stale slot read
            # without waiting, unused)
            w = _decoded_step(w_smem, ready, w_scale_ptr, it + 1, gl.minimum(j + 1, k_hi - 1), off_w, stride_wsn,
                              stride_wsk, a_l, SCALE_MODE, WG, j + 1 < k_hi, DECODE)  # fmt: skip
            # no wgmma stays in flight across the loop's back edge: with one in flight there (reading its
            # A operand from registers) ptxas serializes every wgmma ("insufficient register resources")
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(s), count=1)
            it += 1
        return acc, it

    @gluon.jit
    def _tma_epilogue(acc, c_smem, res_bar, out_desc, res_desc, w_scale_ptr, gate_ptr, off_w, off_t, n_done, N,
                      stride_wsn, stride_gn, SCALE_MODE: gl.constexpr, HAS_RESIDUAL: gl.constexpr,
                      HAS_GATE: gl.constexpr, WG: gl.constexpr):  # fmt: skip
        """A whole tile's epilogue: per-channel scale, gate, residual (fp32, fp8_matmul's order), cast, transpose
        through ``c_smem``, TMA store. ``n_done``: this consumer's TMA epilogues before this one (the residual
        barrier's phase)."""
        row_l: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
        BW: gl.constexpr = acc.shape[0]
        offs_w = off_w + gl.arange(0, BW, layout=row_l)
        mask_w = offs_w < N
        if SCALE_MODE != 2:
            sw = gl.load(w_scale_ptr + offs_w * stride_wsn, mask=mask_w, other=0.0)
            acc = acc * sw[:, None]
        if HAS_GATE:
            g = gl.load(gate_ptr + offs_w * stride_gn, mask=mask_w, other=0.0).to(gl.float32)
            acc = acc * g[:, None]
        c_buf = c_smem.index(WG)
        tma.store_wait(0)  # this consumer's previous tile has left c_buf
        if HAS_RESIDUAL:  # the residual tile comes in by TMA through c_buf, then joins in registers
            mbarrier.expect(res_bar.index(WG), res_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(res_desc, [off_t, off_w], res_bar.index(WG), c_buf)
        out = gl.permute(acc, (1, 0))  # [BT, BW]: the rows of out
        if HAS_RESIDUAL:
            mbarrier.wait(res_bar.index(WG), n_done & 1)
            out = out + c_buf.load(out.type.layout).to(gl.float32)
        c_buf.store(out.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [off_t, off_w], c_buf)  # clipped at M, N

    @gluon.jit
    def _wo_consumer(
        w_smem, x_smem, c_smem, ready, empty, res_bar, out_desc, res_desc, w_scale_ptr, gate_ptr,
        M, N, K, stride_wsn, stride_wsk, stride_gn,
        SCALE_MODE: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, GROUP: gl.constexpr,
        WG: gl.constexpr, DECODE: gl.constexpr,
    ):  # fmt: skip
        """Data-parallel: one warpgroup, weight rows [WG * 64, WG * 64 + 64) of every 128-row tile of the program
        (whole tiles, persistent grid), against the tile's BT tokens; ``_k_range`` then ``_tma_epilogue``."""
        BW: gl.constexpr = w_smem.shape[1]
        BT: gl.constexpr = x_smem.shape[1]
        BK: gl.constexpr = x_smem.shape[2]
        gl.static_assert(gl.num_warps() == 4)
        gl.static_assert(BW == 64)
        num_pid_w = gl.cdiv(N, 2 * BW)
        num_pid_t = gl.cdiv(M, BT)
        k_tiles = gl.cdiv(K, BK)
        it = 0
        for tile_id in range(gl.program_id(0), num_pid_w * num_pid_t, gl.num_programs(0)):
            pid_w, pid_t = _block._tile_pids(tile_id, num_pid_w, num_pid_t, GROUP)
            off_w = pid_w * 2 * BW + WG * BW
            acc, it = _k_range(w_smem, x_smem, ready, empty, w_scale_ptr, it, 0, k_tiles, off_w, stride_wsn,
                               stride_wsk, SCALE_MODE, WG, DECODE)  # fmt: skip
            n_done = (tile_id - gl.program_id(0)) // gl.num_programs(0)  # tiles before this one here
            _tma_epilogue(acc, c_smem, res_bar, out_desc, res_desc, w_scale_ptr, gate_ptr, off_w, pid_t * BT, n_done,
                          N, stride_wsn, stride_gn, SCALE_MODE, HAS_RESIDUAL, HAS_GATE, WG)  # fmt: skip
        tma.store_wait(0)

    # --- stream-K -------------------------------------------------------------------------------------------

    @gluon.jit
    def _sk_share(M, N, K, BT: gl.constexpr, BW2: gl.constexpr, BK: gl.constexpr):
        """This program's share of the stream-K work. The grid is num_pid_t lanes of ``lane`` programs (pid = j *
        num_pid_t + pid_t); the programs of a lane split their token row's num_pid_w * k_tiles (tile, K step)
        iterations evenly, weight-tile major: program j takes [j * W // lane, (j + 1) * W // lane). Program j
        of every lane covers the same weight rows at the same time, so the weights (the big operand at small M)
        come from HBM once and from L2 for the other lanes. The launcher keeps lane <= W: no share is empty."""
        num_pid_t = gl.cdiv(M, BT)
        num_pid_w = gl.cdiv(N, BW2)
        k_tiles = gl.cdiv(K, BK)
        lane = gl.num_programs(0) // num_pid_t
        pid_t = gl.program_id(0) % num_pid_t
        j = gl.program_id(0) // num_pid_t
        W = num_pid_w * k_tiles
        return pid_t, lane, W, (j * W) // lane, ((j + 1) * W) // lane, num_pid_t, num_pid_w, k_tiles

    @gluon.jit
    def _sk_owner(it, W, lane):
        """The program (lane index) whose share holds iteration ``it``: the largest j with j * W // lane <= it."""
        return ((it + 1) * lane + W - 1) // W - 1

    @gluon.jit
    def _wo_sk_producer(w_desc, x_desc, w_smem, x_smem, ready, empty, M, N, K):
        """1 warp: fill the ring with this program's stream-K iterations in order (``_sk_share``); the ring
        protocol of ``_block._ws_producer`` (step i uses slot i % S for the (i // S)-th time)."""
        NUM_STAGES: gl.constexpr = x_smem.shape[0]
        BW: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = w_desc.block_type.shape[1]
        BT: gl.constexpr = x_desc.block_type.shape[0]
        nbytes: gl.constexpr = 2 * w_desc.block_type.nbytes + x_desc.block_type.nbytes
        pid_t, lane, W, first, end, num_pid_t, num_pid_w, k_tiles = _sk_share(M, N, K, BT, 2 * BW, BK)
        off_t = pid_t * BT
        for g in range(first, end):
            i = g - first
            pid_w = g // k_tiles
            kk = (g - pid_w * k_tiles) * BK
            s = i % NUM_STAGES
            mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes)
            for c in gl.static_range(2):
                tma.async_copy_global_to_shared(w_desc, [pid_w * 2 * BW + c * BW, kk], bar, w_smem.index(2 * s + c))
            tma.async_copy_global_to_shared(x_desc, [off_t, kk], bar, x_smem.index(s))

    @gluon.jit
    def _sk_fixup(ws_ptr, out_ptr, res_ptr, w_scale_ptr, gate_ptr, j_lo, j_hi, tile_it, W, lane, pid_t, num_pid_t,
                  off_t, off_w, M, N, stride_wsn, stride_gn, stride_om, stride_rm, BT: gl.constexpr,
                  SCALE_MODE: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr,
                  WG: gl.constexpr):  # fmt: skip
        """A split tile's epilogue, by the last of its programs j_lo..j_hi to arrive: the sum of their partials (in
        program order, whoever arrived last: the bits do not depend on timing), then the TMA epilogue's maths
        (per-channel scale, gate, residual in fp32), stored with plain stores. FIX_T-token chunks; the partials
        of four programs are loaded at once (masked past j_hi), so a chunk costs one round trip to L2 rather
        than one per partial."""
        BW: gl.constexpr = 64
        FIX_T: gl.constexpr = 64  # tokens per chunk: 32 fp32 per thread and partial
        SLOT: gl.constexpr = BT * BW
        fix_l: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [4, 1], [1, 0])  # rows of 64 N, 16 B per thread
        offs_fix = (gl.arange(0, FIX_T, layout=gl.SliceLayout(1, fix_l))[:, None] * BW
                    + gl.arange(0, BW, layout=gl.SliceLayout(0, fix_l))[None, :])  # fmt: skip
        offs_n = off_w + gl.arange(0, BW, layout=gl.SliceLayout(0, fix_l))
        mask_n = offs_n < N
        if SCALE_MODE != 2:
            sw = gl.load(w_scale_ptr + offs_n * stride_wsn, mask=mask_n, other=0.0)
        if HAS_GATE:
            gate = gl.load(gate_ptr + offs_n * stride_gn, mask=mask_n, other=0.0).to(gl.float32)
        for r0 in range(0, BT, FIX_T):
            offs_t = off_t + r0 + gl.arange(0, FIX_T, layout=gl.SliceLayout(1, fix_l))
            mask = (offs_t < M)[:, None] & mask_n[None, :]
            if HAS_RESIDUAL:
                r_ptrs = res_ptr + offs_t.to(gl.int64)[:, None] * stride_rm + offs_n[None, :]
                res = gl.load(r_ptrs, mask=mask, other=0.0)
            tot = gl.zeros([FIX_T, BW], gl.float32, layout=fix_l)
            for jb in range(j_lo, j_hi + 1, 4):
                p0 = _sk_partial(ws_ptr, offs_fix + r0 * BW, jb, j_hi, W, lane, pid_t, num_pid_t, tile_it, SLOT, WG)
                p1 = _sk_partial(ws_ptr, offs_fix + r0 * BW, jb + 1, j_hi, W, lane, pid_t, num_pid_t, tile_it, SLOT, WG)
                p2 = _sk_partial(ws_ptr, offs_fix + r0 * BW, jb + 2, j_hi, W, lane, pid_t, num_pid_t, tile_it, SLOT, WG)
                p3 = _sk_partial(ws_ptr, offs_fix + r0 * BW, jb + 3, j_hi, W, lane, pid_t, num_pid_t, tile_it, SLOT, WG)
                tot = (((tot + p0) + p1) + p2) + p3
            if SCALE_MODE != 2:
                tot = tot * sw[None, :]
            if HAS_GATE:
                tot = tot * gate[None, :]
            if HAS_RESIDUAL:
                tot = tot + res.to(gl.float32)
            o_ptrs = out_ptr + offs_t.to(gl.int64)[:, None] * stride_om + offs_n[None, :]
            gl.store(o_ptrs, tot.to(out_ptr.dtype.element_ty), mask=mask)

    @gluon.jit
    def _sk_partial(ws_ptr, offs, jj, j_hi, W, lane, pid_t, num_pid_t, tile_it, SLOT: gl.constexpr, WG: gl.constexpr):
        """Program jj's partial of the tile starting at iteration ``tile_it`` (the chunk at ``offs``; zeros for
        jj > j_hi): the tile is jj's first segment (slot 0) unless jj's share starts before the tile (slot 1)."""
        p_slot = (2 * (jj * num_pid_t + pid_t) + (((jj * W) // lane) < tile_it).to(gl.int32)) * 2 + WG
        return gl.load(ws_ptr + p_slot * SLOT + offs, mask=(offs >= 0) & (jj <= j_hi), other=0.0, cache_modifier=".cg")

    @gluon.jit
    def _wo_sk_consumer(
        w_smem, x_smem, c_smem, ready, empty, res_bar, out_desc, res_desc, w_scale_ptr, gate_ptr, ws_ptr, cnt_ptr,
        out_ptr, res_ptr, M, N, K, stride_wsn, stride_wsk, stride_gn, stride_om, stride_rm,
        SCALE_MODE: gl.constexpr, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, SK_PROBE: gl.constexpr,
        WG: gl.constexpr, DECODE: gl.constexpr,
    ):  # fmt: skip
        """Stream-K: one warpgroup (weight rows WG * 64.. of each 128-row tile) walks this program's share as
        segments of K steps within a tile. A whole tile takes the TMA epilogue. A partial one is stored in fp32
        to the workspace (slot: program, first or last segment of its share, consumer) and counted on the tile's
        arrival counter (one per tile and consumer); the last of the tile's programs to arrive sums every slot
        (its own included), runs the epilogue in row chunks and zeroes the counter for the next launch. No
        program waits for another (the Triton persistent kernel's scheme, fp8_matmul)."""
        BW: gl.constexpr = w_smem.shape[1]
        BT: gl.constexpr = x_smem.shape[1]
        BK: gl.constexpr = x_smem.shape[2]
        SLOT: gl.constexpr = BT * BW
        gl.static_assert(gl.num_warps() == 4)
        gl.static_assert(BW == 64)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BT, 16])
        pid_t, lane, W, first, end, num_pid_t, num_pid_w, k_tiles = _sk_share(M, N, K, BT, 2 * BW, BK)
        off_t = pid_t * BT
        it = 0
        n_done = 0
        g = first
        while g < end:
            pid_w = g // k_tiles
            k_lo = g - pid_w * k_tiles
            k_hi = gl.minimum(k_tiles, k_lo + end - g)
            off_w = pid_w * 2 * BW + WG * BW
            acc, it = _k_range(w_smem, x_smem, ready, empty, w_scale_ptr, it, k_lo, k_hi, off_w, stride_wsn,
                               stride_wsk, SCALE_MODE, WG, DECODE)  # fmt: skip
            if (k_lo == 0) & (k_hi == k_tiles):
                _tma_epilogue(acc, c_smem, res_bar, out_desc, res_desc, w_scale_ptr, gate_ptr, off_w, off_t, n_done,
                              N, stride_wsn, stride_gn, SCALE_MODE, HAS_RESIDUAL, HAS_GATE, WG)  # fmt: skip
                n_done += 1
            else:
                slot = (2 * gl.program_id(0) + (g != first).to(gl.int32)) * 2 + WG
                # a slot holds a partial transposed, [BT tokens, 64 weight rows]: the fixup reads and writes along N
                offs_slot = (gl.arange(0, BT, layout=gl.SliceLayout(0, mma))[None, :] * BW
                             + gl.arange(0, BW, layout=gl.SliceLayout(1, mma))[:, None])  # fmt: skip
                if SK_PROBE == 2:  # timing probe: partials neither stored nor summed (the branch never runs)
                    if M < 0:
                        gl.store(ws_ptr + slot * SLOT + offs_slot, acc, eviction_policy="evict_last")
                else:
                    gl.store(ws_ptr + slot * SLOT + offs_slot, acc, eviction_policy="evict_last")
                if SK_PROBE == 0:
                    gl.thread_barrier()  # every thread's partial is written before the counter says so
                    tile_it = pid_w * k_tiles
                    j_lo = _sk_owner(tile_it, W, lane)
                    j_hi = _sk_owner(tile_it + k_tiles - 1, W, lane)
                    cnt = cnt_ptr + (pid_t * num_pid_w + pid_w) * 2 + WG
                    arrived = gl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
                    if arrived == j_hi - j_lo:  # the last of the tile's programs: sum the partials, epilogue
                        _sk_fixup(ws_ptr, out_ptr, res_ptr, w_scale_ptr, gate_ptr, j_lo, j_hi, tile_it, W, lane,
                                  pid_t, num_pid_t, off_t, off_w, M, N, stride_wsn, stride_gn, stride_om, stride_rm,
                                  BT, SCALE_MODE, HAS_RESIDUAL, HAS_GATE, WG)  # fmt: skip
                        gl.atomic_xchg(cnt, 0)
            g += k_hi - k_lo
        tma.store_wait(0)

    @gluon.jit
    def _fp8_weight_only_sm90_kernel(
        w_desc,  # (N, K) uint8 (e4m3 bits), block [64, BLOCK_K]
        x_desc,  # (M, K) bf16, block [BT, BLOCK_K]
        out_desc,  # (M, N) bf16 / fp16, block [BT, 64]
        res_desc,  # (M, N) residual in out's dtype (out_desc when there is none), block [BT, 64]
        w_scale_ptr, gate_ptr,
        ws_ptr,  # stream-K: fp32 partial tiles, 4 slots of BT x 64 per program (unused otherwise)
        cnt_ptr,  # stream-K: int32 arrival counters, 2 per tile, zero between launches
        out_ptr, res_ptr,  # stream-K: the output and residual again, for the fixup's plain stores / loads
        M, N, K, stride_wsn, stride_wsk, stride_gn, stride_om, stride_rm,
        SCALE_MODE: gl.constexpr,
        HAS_RESIDUAL: gl.constexpr,
        HAS_GATE: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        GROUP: gl.constexpr,
        STREAM_K: gl.constexpr,
        SK_PROBE: gl.constexpr,  # 0; timing probes only (wrong results): 1 partials stored, no fixup; 2 neither
        DECODE: gl.constexpr,  # weight decode: 0 uint8 elements, 1 uint16 pairs (_decoded_step)
        PRODUCER_REGS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        BW: gl.constexpr = w_desc.block_type.shape[0]
        BK: gl.constexpr = w_desc.block_type.shape[1]
        BT: gl.constexpr = x_desc.block_type.shape[0]
        gl.static_assert(BK == 64)
        gl.static_assert(BT == 128 or BT == 256)
        gl.static_assert(num_warps == 4)  # the default partition is consumer 0 (one warpgroup)

        w_smem = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES * 2, BW, BK], w_desc.layout)
        x_smem = gl.allocate_shared_memory(x_desc.dtype, [NUM_STAGES, BT, BK], x_desc.layout)
        c_smem = gl.allocate_shared_memory(out_desc.dtype, [2, BT, BW], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        res_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)  # the producer's expect; TMA bytes complete it
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer
        for i in gl.static_range(2):
            mbarrier.init(res_bar.index(i), count=1)  # consumer i's residual tile has arrived
        fence_async_shared()

        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        # fmt: off
        if STREAM_K:
            gl.warp_specialize(
                [
                (_wo_sk_consumer, (w_smem, x_smem, c_smem, ready, empty, res_bar, out_desc, res_desc, w_scale_ptr,
                                   gate_ptr, ws_ptr, cnt_ptr, out_ptr, res_ptr, M, N, K, stride_wsn, stride_wsk,
                                   stride_gn, stride_om, stride_rm, SCALE_MODE, HAS_RESIDUAL, HAS_GATE, SK_PROBE,
                                   WG0, DECODE)),
                (_wo_sk_consumer, (w_smem, x_smem, c_smem, ready, empty, res_bar, out_desc, res_desc, w_scale_ptr,
                                   gate_ptr, ws_ptr, cnt_ptr, out_ptr, res_ptr, M, N, K, stride_wsn, stride_wsk,
                                   stride_gn, stride_om, stride_rm, SCALE_MODE, HAS_RESIDUAL, HAS_GATE, SK_PROBE,
                                   WG1, DECODE)),
                (_wo_sk_producer, (w_desc, x_desc, w_smem, x_smem, ready, empty, M, N, K)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:
            # the producer sees the transposed problem: its "A" is the weight (N rows, one 64-row box per
            # consumer), its "B" the activations (M rows); tile order and K steps match _wo_consumer's
            gl.warp_specialize(
                [
                (_wo_consumer, (w_smem, x_smem, c_smem, ready, empty, res_bar, out_desc, res_desc, w_scale_ptr,
                                gate_ptr, M, N, K, stride_wsn, stride_wsk, stride_gn, SCALE_MODE, HAS_RESIDUAL,
                                HAS_GATE, GROUP, WG0, DECODE)),
                (_wo_consumer, (w_smem, x_smem, c_smem, ready, empty, res_bar, out_desc, res_desc, w_scale_ptr,
                                gate_ptr, M, N, K, stride_wsn, stride_wsk, stride_gn, SCALE_MODE, HAS_RESIDUAL,
                                HAS_GATE, GROUP, WG1, DECODE)),
                (_block._ws_producer, (w_desc, x_desc, w_smem, x_smem, ready, empty, N, M, K, GROUP)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        # fmt: on


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

is_available = _block.is_available
FAST_LAUNCH = os.environ.get("FLUX2_FAST_LAUNCH", "1") == "1"
_LAUNCHERS: dict[tuple, tuple] = {}
_OUT_GL = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def smem_bytes(num_stages: int, block_t: int, out_bytes: int = 2) -> int:
    """Shared memory of the kernel: the ring (128 weight rows of BLOCK_K bytes and ``block_t`` activation rows
    of BLOCK_K bf16 per stage), the two consumers' transposed output tiles, 2 mbarriers per stage."""
    return num_stages * (2 * ROWS + 2 * block_t) * BLOCK_K + 2 * block_t * ROWS * out_bytes + 16 * num_stages


def default_config(M: int) -> tuple[int, int]:
    """(block_t, num_stages) = (256, 4) for every M. 128-token tiles give the M = 512 GEMMs more tiles but decode
    each weight twice as often per MMA flop: they ran 0.46-0.60x cuBLAS against 0.69-0.85x for 256-token tiles
    on every FLUX.2-dev shape (reports/fp8_weight_only/wo_sm90_run1.json, H100)."""
    return 256, 4


def fp8_weight_only_sm90(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    block_t: int | None = None,
    num_stages: int | None = None,
    stream_k: bool | None = None,
) -> torch.Tensor:
    """``residual + gate * (x @ (w * w_scale).T)`` on Hopper (module docstring). ``x`` (M, K) bf16, ``w`` (N, K)
    e4m3 or uint8, both K-contiguous with 16-byte aligned rows (K a multiple of 16); ``w_scale`` fp32: one
    element, (N,) / (N, 1), or (ceil(N/128), ceil(K/128)) blocks; ``out_dtype`` bf16 (default) or fp16, N a
    multiple of 8. ``block_t``: tokens per tile (128 or 256), ``num_stages``: depth of the TMA ring (2-8,
    within sm_90's 227 KB: ``smem_bytes``); both default to ``default_config(M)``. ``stream_k``: split the
    (tile, K step) iterations evenly over the SMs instead of giving each program whole tiles (partial tiles meet
    in an fp32 workspace, ``_stream_k_buffers``); default ``use_stream_k``."""
    from flux2_bench.kernels.fp8_matmul import _weight_scale_mode

    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16 or x.ndim != 2:
        raise TypeError(f"x must be a 2-D bf16 tensor, got {getattr(x, 'dtype', type(x))}")
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float8_e4m3fn, torch.uint8) or w.ndim != 2:
        raise TypeError(f"w must be a 2-D float8_e4m3fn (or uint8) tensor, got {getattr(w, 'dtype', type(w))}")
    M, K = x.shape
    N = w.shape[0]
    if w.shape[1] != K:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)}, w is {tuple(w.shape)} (w is (N, K))")
    for name, t in (("x", x), ("w", w)):
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along K, got strides {t.stride()}")
    if not isinstance(w_scale, torch.Tensor) or w_scale.dtype != torch.float32:
        raise TypeError(f"w_scale must be a float32 tensor, got {getattr(w_scale, 'dtype', type(w_scale))}")
    mode, s_n, s_k = _weight_scale_mode(w_scale, N, K)
    out_dtype = out_dtype or torch.bfloat16
    if out_dtype not in _OUT_GL:
        raise ValueError(f"fp8_weight_only_sm90 writes bf16 or fp16 (TMA store), got out_dtype={out_dtype}")
    _check_epilogue(residual, gate, M, N)
    if residual is not None and residual.stride(1) != 1:
        raise ValueError(f"residual must be contiguous along N, got strides {residual.stride()}")
    if residual is not None and residual.dtype != out_dtype:
        raise TypeError(f"residual must be in out_dtype ({out_dtype}): it is read by TMA; got {residual.dtype}")
    dt, ds = default_config(M)
    block_t = block_t or dt
    num_stages = num_stages or ds
    if block_t not in (128, 256):
        raise ValueError(f"block_t must be 128 or 256, got {block_t}")
    if not 2 <= num_stages <= 8:
        raise ValueError(f"num_stages must be in 2..8, got {num_stages}")
    smem = smem_bytes(num_stages, block_t)
    if smem > SMEM_BYTES:
        raise ValueError(f"num_stages={num_stages} with block_t={block_t} needs {smem} B of shared memory, more "
                         f"than sm_90's {SMEM_BYTES}")  # fmt: skip
    _block.check_sm90_launch("fp8_weight_only_sm90", x, w, w_scale, residual, gate)
    num_sms = _block._num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    sk_grid = stream_k_grid(M, N, K, block_t, num_sms)
    if stream_k is None:
        stream_k = use_stream_k(M, N, K, block_t, num_sms)
    if stream_k and sk_grid is None:
        raise ValueError(f"stream_k=True: no stream-K split for M={M}, N={N}, K={K} with block_t={block_t} on "
                         f"{num_sms} SMs (more token tiles than SMs, or more than {SK_MAX_COUNTERS // 2} tiles)")  # fmt: skip
    out = torch.empty((M, N), device=x.device, dtype=out_dtype)
    wu = w.view(torch.uint8)
    for name, t in (("x", x), ("w", wu), ("out", out), ("residual", residual)):
        if t is not None:
            _block._check_tma(t, name)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        if residual is not None:
            out.copy_(residual)
        return out
    g = gate.reshape(-1) if gate is not None else out.view(-1)
    return _launch(x, wu, w_scale, out, residual, g, mode, s_n, s_k, residual is not None, gate is not None, block_t,
                   num_stages, sk_grid if stream_k else None)  # fmt: skip


def _launch(x, w, w_scale, out, res, g, mode, s_n, s_k, has_res, has_gate, block_t, num_stages, sk_grid):
    M, K = x.shape
    N = w.shape[0]
    res = res if has_res else out
    ints = (M, N, K, s_n, s_k, g.stride(0), out.stride(0), res.stride(0))
    consts = dict(SCALE_MODE=mode, HAS_RESIDUAL=has_res, HAS_GATE=has_gate, NUM_STAGES=num_stages, GROUP=GROUP,
                  STREAM_K=sk_grid is not None, SK_PROBE=_SK_PROBE, DECODE=_DECODE, PRODUCER_REGS=PRODUCER_REGS,
                  CONSUMER_REGS=CONSUMER_REGS)  # fmt: skip
    ws, cnt = _stream_k_buffers(x.device) if sk_grid is not None else (out, out)
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    # everything the launch specializes on (see fp8_row_gemm_sm90._launch)
    key = (index, x.stride(0), w.stride(0), out.dtype, g.dtype, block_t, sk_grid, *ints, *consts.values(),
           *(t.data_ptr() % 16 == 0 for t in (w_scale, g, res)))  # fmt: skip

    def make():
        w_desc = TensorDescriptor(w, [N, K], [w.stride(0), 1], [ROWS, BLOCK_K],
                                  gl.NVMMASharedLayout.get_default_for([ROWS, BLOCK_K], gl.uint8))  # fmt: skip
        x_desc = TensorDescriptor(x, [M, K], [x.stride(0), 1], [block_t, BLOCK_K],
                                  gl.NVMMASharedLayout.get_default_for([block_t, BLOCK_K], gl.bfloat16))  # fmt: skip
        o_layout = gl.NVMMASharedLayout.get_default_for([block_t, ROWS], getattr(gl, _OUT_GL[out.dtype]))
        out_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [block_t, ROWS], o_layout)
        res_desc = TensorDescriptor(res, [M, N], [res.stride(0), 1], [block_t, ROWS], o_layout) if has_res else out_desc
        grid = (sk_grid or min(-(-N // (2 * ROWS)) * -(-M // block_t), _block._num_sms(index)), 1, 1)
        return grid, (w_desc, x_desc, out_desc, res_desc)

    _block.launch_cached(_LAUNCHERS, key, FAST_LAUNCH, _fp8_weight_only_sm90_kernel, (w, x, out, res if has_res else out),
                         (w_scale, g, ws, cnt, out, res, *ints), make, consts, num_warps=4, maxnreg=MAXNREG)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Stream-K: split, choice and workspace
# ----------------------------------------------------------------------------------------------

_DECODE = int(os.environ.get("FLUX2_WO_DECODE", "1"))  # _decoded_step's weight decode (0: uint8 elements, 1: pairs)
_SK_PROBE = 0  # timing probes (reports/fp8_weight_only/probe_wo_sk.py) only: 1 or 2 give wrong results
SK_MAX_COUNTERS = 1 << 16  # int32 arrival counters per workspace (2 per tile: one per consumer)
SK_SLOTS = 4  # partial tiles per program: (first or last segment of its share) x (consumer)
_SK_BUFFERS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def stream_k_grid(M: int, N: int, K: int, block_t: int, num_sms: int) -> int | None:
    """Programs of the stream-K launch (``_sk_share``): one lane per token tile, ``num_sms // lanes`` programs
    each, fewer where a lane has fewer (tile, K step) iterations than programs (so that no share is empty).
    None where there is no split: more token tiles than SMs, or more tiles than the arrival counters."""
    lanes = -(-M // block_t)
    tiles_w = -(-N // (2 * ROWS))
    work = tiles_w * -(-K // BLOCK_K)
    if M == 0 or N == 0 or K == 0 or lanes > num_sms or 2 * lanes * tiles_w > SK_MAX_COUNTERS:
        return None
    return lanes * min(num_sms // lanes, work)


def use_stream_k(M: int, N: int, K: int, block_t: int, num_sms: int) -> bool:
    """The default: stream-K where whole tiles leave the last wave of the persistent grid short (fewer than
    ``SK_MIN_FILL`` of the SM slots of the data-parallel waves do work) and each program's share is at least
    ``SK_MIN_STEPS`` K steps. The second condition because a split tile costs the same whatever its length: on
    the H100 the partial stores took 7-12 us and the fixup 4-10 us per launch at M = 512 (probe_wo_sk_run1.json),
    more than the idle SMs' share of txt.proj's 71 us (70 steps per program: stream-K 0.96x data-parallel in
    wo_sm90_run4.json) and less than that of the 209-419-step shares of txt.qkv, txt.mlp_out, txt.mlp_in
    (1.04-1.19x)."""
    grid = stream_k_grid(M, N, K, block_t, num_sms)
    if grid is None:
        return False
    tiles = -(-M // block_t) * -(-N // (2 * ROWS))
    waves = -(-tiles // num_sms)
    return tiles / (waves * num_sms) < SK_MIN_FILL and tiles * -(-K // BLOCK_K) / grid >= SK_MIN_STEPS


SK_MIN_FILL = 0.9
SK_MIN_STEPS = 128


def _stream_k_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream-K workspace (fp32, ``SK_SLOTS`` partial tiles of 256 x 64 per SM: 34.6 MB on a 132-SM H100)
    and arrival counters (int32, zero between launches: each tile's last arrival resets its counter). One pair
    per device and stream, so that launches on different streams never share counters; allocated once."""
    from flux2_bench.kernels.fp8_matmul import _current_raw_stream

    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, _current_raw_stream(index))
    bufs = _SK_BUFFERS.get(key)
    if bufs is None:
        slots = SK_SLOTS * _block._num_sms(index)
        bufs = (torch.empty(slots * 256 * ROWS, device=device, dtype=torch.float32),
                torch.zeros(SK_MAX_COUNTERS, device=device, dtype=torch.int32))  # fmt: skip
        _SK_BUFFERS[key] = bufs
    return bufs
