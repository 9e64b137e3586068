"""Block-scaled FP8 GEMM for Hopper (sm_90) in Gluon, warp-specialized, with per-step promotion (DeepGEMM's scheme).

The kernel that runs (since session 18 the only one here): ``Warp-specialized variant`` below, with the consumer
schedule of ``Schedules`` (unlagged promotion, deferred scale multiply) and the options of ``Profile``. The
sections in between are the history that led to it; what they describe and this file no longer holds is named in
``Pruned`` at the end.

What
----
``fp8_block_gemm_sm90(a, b, a_scale, b_scale)`` computes the same thing as
``flux2_bench.kernels.fp8_matmul.fp8_gemm`` with *block* scales (reference: ``fp8_gemm_ref``)::

    out[m, n] = sum_kb a_scale[m, kb] * b_scale[n // 128, kb] * sum_{k in block kb} A[m, k] * B[n, k]

in fp32, then optionally ``out = residual + gate[n] * out``, cast to ``out_dtype``.

- ``a``: (M, K) e4m3, K contiguous; ``a_scale``: (M, ceil(K/128)) fp32 (1x128 activation blocks).
- ``b``: (N, K) e4m3, K contiguous (``nn.Linear.weight`` layout); ``b_scale``: (ceil(N/128),
  ceil(K/128)) fp32 (128x128 weight blocks).

Why a Gluon kernel
------------------
Block scaling multiplies each 128-wide K step's partial product by its own scales ("promotion").
In Triton, ``acc += tl.dot(a, b) * scale`` makes the compiler wait for every wgmma right after
issuing it (``warp_group_dot_wait {pendings = 0}``), so the tensor cores idle while the CUDA cores
do the FMAs: the Triton block path ran at 0.63x of our row-wise kernel on the H100. Gluon exposes
the wgmma issue and its wait separately, so each K step here:

1. waits for the TMA load of step k (mbarrier of its ring slot),
2. issues the async wgmma of step k into a *fresh* accumulator ``part`` (``use_acc=False``),
3. on the CUDA cores, promotes step k-1: ``acc += part_{k-1} * (a_s[:, None] * b_s)`` and loads
   the scales of step k, while the tensor cores run step k,
4. waits for the wgmma (``warpgroup_mma_wait(0)``), then refills the ring slot it read with the
   TMA load of step k + NUM_STAGES.

Tiles: BLOCK_N = BLOCK_K = 128 (one weight scale per K step and program), BLOCK_M = 128 with
8 warps (two warpgroups of 64 rows; acc, part and the in-flight part are 64 fp32 registers each per
thread) or BLOCK_M = 64 with 4 warps for small M. Loads are TMA with zero fill, so ragged M, N and K
are exact (the K tail multiplies zeros); the epilogue (gate, residual, cast) stores with a mask.
TMA needs 16-byte aligned base addresses and row strides: K must be a multiple of 16 (e4m3 rows).

Expectations (written before the first GPU measurement)
-------------------------------------------------------
Compiled for sm_90 on the CPU (reports/fp8_matmul/compile_block_sm90.py, output in
compile_block_sm90.txt): 220 registers, no spills, 128 KB shared memory (4 stages, BLOCK_M 128); in the
K loop the 64 promotion FFMAs sit between the last QGMMA (fp8 HGMMA) and WARPGROUP.DEPBAR. Still
serial with the tensor cores, per 128-wide K step: 64 register moves (the product copied into the
lagged registers: unrolling by two to avoid them made ptxas move the FFMAs out of the window), four
CTA barriers around the ring refill, and the mbarrier wait + wgmma issue; the grid is not persistent
(no overlap of the epilogue with the next tile's loads). Expected: 0.8-0.9x our row-wise ``fp8_gemm``
on the M >= 4096 FLUX.2-dev shapes (against 0.63x for the Triton block path), 0.75-0.9x on the
M = 512 text shapes (96-192 tiles on 132 SMs: wave quantization, no split-K). Next step if short:
warp_specialize (a TMA producer warp, two consumer warpgroups synchronized by mbarriers instead of
CTA barriers, so one warpgroup's FMAs and moves run under the other's wgmma).

Measured (run 1, reports/fp8_matmul/block_sm90_run1.json): 0.53-0.65x row-wise, exact.

Warp-specialized variant (the kernel since run 2; ``fp8_block_gemm_sm90``)
--------------------------------------------------------------------------
DeepGEMM's structure with ``gl.warp_specialize`` (Triton 3.6: the default partition runs in the
kernel's ``num_warps`` warps and may be a consumer; workers take no tensors, only scalars,
descriptors, shared-memory views and constexprs; ``worker_num_regs`` becomes setmaxnreg):

- default partition (4 warps) = consumer 0, rows 0..63 of the 128-row tile; worker 0 (4 warps) =
  consumer 1, rows 64..127; worker 1 (1 warp) = TMA producer. 12 warps (rounded up to whole
  warpgroups), launched with maxnreg 168; setmaxnreg gives the consumers 232 registers each and
  the producer's warpgroup 40 (4 x 32 x (232 + 232 + 40) = 64512 of 65536).
- ring of NUM_STAGES slots, each one A tile (128 x 128) and one B tile (128 x 128); per slot a
  ``ready`` mbarrier (count 1: the producer's expect-tx, completed by the TMA bytes) and an
  ``empty`` mbarrier (count 2: one arrival per consumer warpgroup, made by one thread after a
  128-thread named barrier of that warpgroup).
- each consumer: wait ready[s] -> async wgmma m64n128k128 on its half (``slice`` of the A tile)
  into a fresh accumulator -> 64 promotion FFMAs of the previous step -> wgmma wait -> arrive
  empty[s]. The two consumers share no barrier, so one's promotion, register moves and mbarrier
  traffic run under the other's wgmma.
- persistent: grid = min(tiles, SMs), grouped tile order; every partition walks the same tiles
  and counts K steps over all of them (slot = it % S, phase = (it // S) & 1), so the producer
  loads the next tile while the consumers run their epilogue (gate, residual, cast, masked
  store, no TMA store).

Compiled on the CPU with Triton 3.6 (compile_block_sm90.txt, ``ws_*``): no spills, 128 KB shared
memory at 4 stages; each consumer's K loop is ~197 SASS instructions with two 128-thread named
barriers (BAR.SYNC 0x0/0x2, 0x80) and no CTA-wide one, 64 FFMAs between the last QGMMA and
WARPGROUP.DEPBAR; the 64 moves of the product into the lagged registers remain (per consumer, now
under the other consumer's wgmma). The producer loop is 36 instructions (wait empty, expect, 2 TMA).

Expectation for the WS variant (written before its first GPU run): 0.80-0.95x our row-wise
``fp8_gemm`` on the M >= 4096 FLUX.2-dev shapes (about 1000-1150 TFLOPS; cuBLAS's block-scaled
``_scaled_mm`` measured 0.87-0.95x row-wise in run 1), 0.7-0.9x on the M = 512 text shapes
(txt.proj: 192 tiles on 132 SMs, 1.45 waves, is the weakest). Risks: both consumers waiting on the
same ``ready`` may issue their wgmmas together and stall together (no explicit ping-pong order);
the scale loads are LDGs inside the loop (DeepGEMM stages them through shared memory).

Schedules (reports/fp8_matmul/probe_ws_schedule.md, H100): the two consumers issuing in order
(``ordered``) measured 0.99x the unordered kernel: they were not idling in lockstep. Promoting right
after the wait (``lagged=False``, scales prefetched a step ahead) measured 1.05-1.06x: the 64 register
moves of the lagged copy were the cost, not the overlap they bought. That schedule (3 stages from
M = 1024, 5 below) is what ``fp8_gemm`` runs for block scales on sm_90 (``fp8_matmul._use_block_gluon``).
128 x 256 tiles with each K step as two 128-column halves (probe run 2, commit ae0bdcf) measured
0.70x: ptxas spilled 276 bytes per thread (acc 128 + product 64 registers, plus the live zero operand
of each wgmma) and each warpgroup waited twice per K step; removed. On 128 x 128 tiles with two
consumer warpgroups our row-wise kernel itself runs ~20 % below its 128 x 256 tile
(probe_wide_tiles run 1), which bounds this kernel near 0.7x row-wise.

Profile, and three more options (reports/fp8_matmul/ncu_block_ws.md, probe_ws_consumers.md)
-------------------------------------------------------------------------------------------
Nsight Compute on double.img.proj (the ordered, unlagged schedule): tensor pipe 55 % active, against
76 % for cuBLAS's block kernel with the same 128 x 128 tile (6 stages, 1 x 2 cluster: 1.34x faster) and
93 % for its row-wise one. Consumer 1 stalled on its scale loads before the wgmma wait (ptxas put the
multiply of the next step's scales right after their loads); the epilogue (masked STG from registers)
took ~9 % of the consumers' samples. Options, each bit-identical to the two-consumer kernel:

- ``defer_scale``: the next step's raw scales are loaded under the wgmma and multiplied at their
  promotion. Measured 1.02-1.03x (expected 1.03-1.08x).
- ``tma_store``: the tile goes registers -> this consumer's 64 x 128 shared buffer -> TMA store, which
  drains under the next tile's K loop (``tma.store_wait`` before the buffer is rewritten). With
  ``defer_scale``: 1.08-1.09x (expected 1.05-1.13x). Deeper rings (4-6 stages) gave nothing more.
- ``consumers=3``: 192 x 128 tiles, three consumer warpgroups of 160 registers (16 warps launched at
  128, producer warpgroup at 32), each with its own 64-row A box. Expected 1.10-1.25x (a third wgmma
  stream to cover the others' overhead, 17 % fewer L2 bytes per FLOP); measured 1.00x on M >= 4096 (1.01-
  1.19x only on M = 4608, single.linear1/2, runs 1-3) and 0.72-0.81x on M = 512 (a third of the last tile
  padding).
  So neither overlap nor L2 traffic is what holds the kernel at ~1000 TFLOP/s; cuBLAS's remaining edge
  is its 1 x 2 cluster (TMA multicast of one operand; not exposed by Gluon 3.6) and its scheduling.

With the dispatch of these options the tensor pipe is 62 % active on double.img.proj (ncu_block_ws run 2);
consumer 1 still waits ~15 % of its samples on the loop-carried copy of its freshly loaded scales, which
ptxas places before the wgmma wait. Staging the scale products through shared memory instead (the
producer warp loading them a step ahead, at 1fc6630) measured 0.95x (two consumers) and 0.84x (three) in
probe_ws_consumers run 3, expected 1.02-1.06x: the producer warp then waits on global loads between its
TMA issues; the option was removed.

``fp8_matmul._block_gluon_options`` picks the dispatch from these measurements. Since session 15 ``fp8_gemm``
runs this kernel for block scales with ``fast_accum=False`` or an fp32 output only; fast accumulation with a
2-byte output goes to ``fp8_block_rescale_sm90`` (a rescaled accumulator instead of a promoted one: 128 x 256
tiles, 1.25x this kernel).

Pruned (session 18)
-------------------
The options ``fp8_matmul`` never dispatches are gone: the first, non-specialized kernel (``block_m`` 64 / 128,
``warp_specialized=False``), the lagged schedule (``lagged``) and the unlagged one that multiplies the scales
when loaded (``defer_scale=False``); ``fp8_block_gemm_sm90_ws`` became ``fp8_block_gemm_sm90``. Every
configuration ``_block_gluon_options`` returns compiles to the same SASS as before
(``reports/fp8_matmul/sass_block_sm90.py``: 12 configurations, ``sass_block_sm90_{before,after}_prune.json``).
The probes that timed the removed options (``bench_block_sm90.py``, ``probe_ws_schedule.py``,
``compile_block_sm90.py``, ``ncu_block_ws.py``) ran against this file as of 787a08e.
"""

from __future__ import annotations

import functools
import os

import torch

from flux2_bench.kernels.fp8_matmul import (
    QBLOCK,
    _as_fp32_scale,
    _check_epilogue,
    _check_fp8_operands,
    _desc_template,
    _rebased,
)

try:  # Gluon ships with Triton >= 3.5; its API moves between releases (written against 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _GLUON_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 (any import failure means "not available", with the reason kept)
    gluon = None
    _GLUON_ERROR = f"{type(e).__name__}: {e}"

BLOCK_N = 128
BLOCK_K = 128
GROUP_M = 8
# Warp-specialized kernel, two consumers: 4 (default partition, consumer 0) + 4 (consumer 1) + 1 (producer)
# warps, rounded up to 12 (registers are handed out per warpgroup): 12 x 32 threads x 168 = 64512 of the
# 65536 registers; setmaxnreg then gives the producer's warpgroup 40 and each consumer 232
# (4 x 32 x (232 + 232 + 40) = 64512). Three consumers: 16 warps launched at 128 registers, then
# 160 per consumer and 32 for the producer's warpgroup (4 x 32 x (3 x 160 + 32) = 65536).
WS_MAXNREG = 168
WS_CONSUMER_REGS = 232
WS_PRODUCER_REGS = 40
WS_REGS = {
    2: (WS_MAXNREG, WS_CONSUMER_REGS, WS_PRODUCER_REGS),
    3: (128, 160, 32),
}  # consumers -> maxnreg, each, producer
SMEM_BYTES = 232448  # sm_90's opt-in shared memory per block (227 KB)
WS_EXPECTATION = (
    "0.80-0.95x ours_gemm_row on M >= 4096, 0.7-0.9x on M = 512 (txt.proj weakest); written before the first WS run"
)


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------

if gluon is not None:

    @gluon.jit
    def _tile_pids(tile_id, num_pid_m, num_pid_n, GROUP: gl.constexpr):
        """Grouped tile order: GROUP row-tiles share each B column-tile while it sits in L2."""
        num_pid_in_group = GROUP * num_pid_n
        group_id = tile_id // num_pid_in_group
        first_pid_m = group_id * GROUP
        group_size_m = gl.minimum(num_pid_m - first_pid_m, GROUP)
        pid_m = first_pid_m + (tile_id % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @gluon.jit
    def _ws_producer(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP: gl.constexpr):
        """1 warp: fill the ring for every tile of this program. Slot s is refilled once every
        consumer arrived on ``empty[s]``. A slot holds one 64-row A box per consumer
        (``a_smem[s * CONSUMERS + c]``) and the B tile.

        Phases: the partitions walk the same tiles and K steps, counting steps ``it`` over all
        tiles; step ``it`` uses slot it % S for the (it // S)-th time. A fresh mbarrier counts as
        having completed the phase before phase 0, so waiting ``empty`` with parity
        ((it // S) & 1) ^ 1 passes at once for the first S steps and then waits for the release
        of step it - S."""
        NUM_STAGES: gl.constexpr = b_smem.shape[0]
        CONSUMERS: gl.constexpr = a_smem.shape[0] // NUM_STAGES
        BM_C: gl.constexpr = a_desc.block_type.shape[0]
        BM: gl.constexpr = BM_C * CONSUMERS
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        nbytes: gl.constexpr = CONSUMERS * a_desc.block_type.nbytes + b_desc.block_type.nbytes
        num_pid_m = gl.cdiv(M, BM)
        num_pid_n = gl.cdiv(N, BN)
        k_tiles = gl.cdiv(K, BK)
        it = 0
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile_id, num_pid_m, num_pid_n, GROUP)
            off_m = pid_m * BM
            off_n = pid_n * BN
            for j in range(k_tiles):
                s = it % NUM_STAGES
                mbarrier.wait(empty.index(s), ((it // NUM_STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                for c in gl.static_range(CONSUMERS):
                    tma.async_copy_global_to_shared(a_desc, [off_m + c * BM_C, j * BK], bar,
                                                    a_smem.index(s * CONSUMERS + c))  # fmt: skip
                tma.async_copy_global_to_shared(b_desc, [off_n, j * BK], bar, b_smem.index(s))
                it += 1

    @gluon.jit
    def _step_scales(sa_ptrs, sb_ptr, mask_m, j, stride_ask, stride_bsk):
        """a_scale[m, j] (rows of the tile; 0 past M) and b_scale[pid_n, j], not yet multiplied."""
        a_s = gl.load(sa_ptrs + j * stride_ask, mask=mask_m, other=0.0)
        b_s = gl.load(sb_ptr + j * stride_bsk)
        return a_s, b_s

    @gluon.jit
    def _ws_consumer(
        a_smem, b_smem, c_smem, ready, empty, issued, out_desc,
        a_scale_ptr, b_scale_ptr, out_ptr, res_ptr, gate_ptr,
        M, N, K,
        stride_asm, stride_ask, stride_bsn, stride_bsk, stride_om, stride_rm, stride_gn,
        HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, GROUP: gl.constexpr, WG: gl.constexpr,
        ORDERED: gl.constexpr, TMA_STORE: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup (4 warps): rows [WG * 64, WG * 64 + 64) of each tile, no barrier shared with
        the other consumers: it waits ``ready[s]``, issues its m64n128 wgmma on its A box, loads the
        next step's raw scales, waits for the wgmma, releases the slot (``empty[s]``, one arrival per
        consumer) and promotes step k right after its wait (DeepGEMM's order), relying on the other
        consumers' wgmmas for the overlap. The scales are multiplied only at their promotion, a step after
        their load: multiplying them at once made ptxas wait for the loads before the wgmma wait
        (ncu_block_ws run 1: 16 % of consumer 1's stall samples). The epilogue (gate, residual, cast,
        store) of its 64 rows runs while the producer already loads the next tile.

        ``ORDERED`` (two consumers only): consumer 1 issues step ``it``'s wgmma only after consumer 0
        issued its own (``issued[s]``). ``TMA_STORE``: the tile leaves through this consumer's shared-memory buffer and a TMA store,
        which drains during the next tile's K loop (``c_smem``: [CONSUMERS, 64, BN] of the output
        dtype)."""
        NUM_STAGES: gl.constexpr = b_smem.shape[0]
        CONSUMERS: gl.constexpr = a_smem.shape[0] // NUM_STAGES
        BM: gl.constexpr = a_smem.shape[1]
        BM_TILE: gl.constexpr = BM * CONSUMERS
        BN: gl.constexpr = b_smem.shape[1]
        BK: gl.constexpr = b_smem.shape[2]
        gl.static_assert(gl.num_warps() == 4)
        gl.static_assert(BM == 64)
        gl.static_assert(CONSUMERS == 2 or not ORDERED)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        col_l: gl.constexpr = gl.SliceLayout(0, mma)

        num_pid_m = gl.cdiv(M, BM_TILE)
        num_pid_n = gl.cdiv(N, BN)
        k_tiles = gl.cdiv(K, BK)
        zero = gl.zeros([BM, BN], gl.float32, layout=mma)
        it = 0
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile_id, num_pid_m, num_pid_n, GROUP)
            off_m = pid_m * BM_TILE + WG * BM
            offs_m = off_m + gl.arange(0, BM, layout=row_l)
            mask_m = offs_m < M
            sa_ptrs = a_scale_ptr + offs_m * stride_asm
            sb_ptr = b_scale_ptr + pid_n * stride_bsn

            acc = gl.zeros([BM, BN], gl.float32, layout=mma)
            a_cur, b_cur = _step_scales(sa_ptrs, sb_ptr, mask_m, 0, stride_ask, stride_bsk)  # step 0's
            for j in range(k_tiles):
                s = it % NUM_STAGES
                mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
                if ORDERED and WG == 1:
                    mbarrier.wait(issued.index(s), (it // NUM_STAGES) & 1)
                a_s = a_smem.index(s * CONSUMERS + WG)
                b_s = b_smem.index(s)
                tok = warpgroup_mma(a_s, b_s.permute((1, 0)), zero, use_acc=False, is_async=True)
                if ORDERED and WG == 0:
                    mbarrier.arrive(issued.index(s), count=1)
                nxt_j = gl.minimum(j + 1, k_tiles - 1)
                # raw scales of step j + 1 loaded now, multiplied at its promotion
                a_nxt, b_nxt = _step_scales(sa_ptrs, sb_ptr, mask_m, nxt_j, stride_ask, stride_bsk)
                part, _a, _b = warpgroup_mma_wait(num_outstanding=0, deps=(tok, a_s, b_s))
                mbarrier.arrive(empty.index(s), count=1)
                acc = acc + part * (a_cur * b_cur)[:, None]
                a_cur = a_nxt
                b_cur = b_nxt
                it += 1

            off_n = pid_n * BN
            offs_n = off_n + gl.arange(0, BN, layout=col_l)
            mask_n = offs_n < N
            if HAS_GATE:
                g = gl.load(gate_ptr + offs_n * stride_gn, mask=mask_n, other=0.0).to(gl.float32)
                acc = acc * g[None, :]
            mask = mask_m[:, None] & mask_n[None, :]
            rows = offs_m.to(gl.int64)[:, None]
            if HAS_RESIDUAL:
                r = gl.load(res_ptr + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0)
                acc = acc + r.to(gl.float32)
            if TMA_STORE:  # rows / columns past M / N are clipped by the TMA unit
                c_buf = c_smem.index(WG)
                tma.store_wait(0)  # this consumer's previous tile has left c_buf
                c_buf.store(acc.to(out_desc.dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_buf)
            else:
                gl.store(out_ptr + rows * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
        if TMA_STORE:
            tma.store_wait(0)

    @gluon.jit
    def _fp8_block_gemm_sm90_ws_kernel(
        a_desc,  # (M, K) e4m3, block [64, BLOCK_K]: one box per consumer
        b_desc,  # (N, K) e4m3, block [BLOCK_N, BLOCK_K]
        out_desc,  # (M, N) output, block [64, BLOCK_N] (TMA_STORE; any descriptor otherwise)
        a_scale_ptr, b_scale_ptr, out_ptr, res_ptr, gate_ptr,
        M, N, K,
        stride_asm, stride_ask, stride_bsn, stride_bsk, stride_om, stride_rm, stride_gn,
        HAS_RESIDUAL: gl.constexpr,
        HAS_GATE: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        GROUP: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        ORDERED: gl.constexpr,
        CONSUMERS: gl.constexpr,
        TMA_STORE: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        gl.static_assert(BM == 64)
        gl.static_assert(BK == 128)
        gl.static_assert(BN == 128)
        gl.static_assert(CONSUMERS == 2 or CONSUMERS == 3)
        gl.static_assert(num_warps == 4)  # the default partition is consumer 0 (one warpgroup)

        a_smem = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES * CONSUMERS, BM, BK], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BN, BK], b_desc.layout)
        if TMA_STORE:
            c_smem = gl.allocate_shared_memory(out_desc.dtype, [CONSUMERS, BM, BN], out_desc.layout)
        else:
            c_smem = b_smem  # unused
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        issued = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)  # the producer's expect; TMA bytes complete it
            mbarrier.init(empty.index(i), count=CONSUMERS)  # one arrival per consumer warpgroup
            mbarrier.init(issued.index(i), count=1)  # consumer 0 issued its wgmma (ORDERED only)
        fence_async_shared()

        # Partition arguments: the worker partitions take no tensors (scalars, descriptors,
        # shared-memory views and constexprs only); a constexpr in an argument tuple must be a
        # named constexpr (a literal in a concatenated tuple reaches the builder as a plain int).
        # The consumer tuples are spelled out: building them as `shared + (WG0,)` does not compile
        # with triton 3.6 (CompilationError at the warp_specialize call; tried in session 5).
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        WG2: gl.constexpr = 2
        # (A tuple kept in a variable loses its constexprs too: the consumers then compiled both sides
        # of every `if TMA_STORE:`.)
        # fmt: off
        if CONSUMERS == 2:
            # default partition: the kernel's 4 warps (consumer 0); worker 0: consumer 1; worker 1: 1 TMA warp
            gl.warp_specialize(
                [
                (_ws_consumer, (a_smem, b_smem, c_smem, ready, empty, issued, out_desc, a_scale_ptr, b_scale_ptr,
                                out_ptr, res_ptr, gate_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk,
                                stride_om, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, GROUP, WG0, ORDERED,
                                TMA_STORE)),
                (_ws_consumer, (a_smem, b_smem, c_smem, ready, empty, issued, out_desc, a_scale_ptr, b_scale_ptr,
                                out_ptr, res_ptr, gate_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk,
                                stride_om, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, GROUP, WG1, ORDERED,
                                TMA_STORE)),
                    (_ws_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP)),
                ],
                [4, 1],
                [CONSUMER_REGS, PRODUCER_REGS],
            )
        else:  # default partition: consumer 0; workers 0 and 1: consumers 1 and 2; worker 2: 1 TMA warp
            gl.warp_specialize(
                [
                (_ws_consumer, (a_smem, b_smem, c_smem, ready, empty, issued, out_desc, a_scale_ptr, b_scale_ptr,
                                out_ptr, res_ptr, gate_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk,
                                stride_om, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, GROUP, WG0, ORDERED,
                                TMA_STORE)),
                (_ws_consumer, (a_smem, b_smem, c_smem, ready, empty, issued, out_desc, a_scale_ptr, b_scale_ptr,
                                out_ptr, res_ptr, gate_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk,
                                stride_om, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, GROUP, WG1, ORDERED,
                                TMA_STORE)),
                (_ws_consumer, (a_smem, b_smem, c_smem, ready, empty, issued, out_desc, a_scale_ptr, b_scale_ptr,
                                out_ptr, res_ptr, gate_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk,
                                stride_om, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, GROUP, WG2, ORDERED,
                                TMA_STORE)),
                    (_ws_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP)),
                ],
                [4, 4, 1],
                [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS],
            )
        # fmt: on


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def is_available(device: torch.device | str | int | None = None) -> bool:
    """True when Gluon imports and ``device`` (default: the current CUDA device) is an sm_90 GPU."""
    if gluon is None:
        return False
    if device is None:
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability(index) == (9, 0)


def check_sm90_launch(fn: str, *tensors: torch.Tensor | None) -> None:
    """What a Gluon sm_90 launch of ``fn`` needs beyond its arguments' shapes: every tensor on one CUDA device,
    Gluon importable, the device an sm_90 GPU."""
    a = tensors[0]
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devs))}")
    if a.device.type != "cuda":
        raise ValueError(f"{fn} needs CUDA tensors, got {a.device}")
    if gluon is None:
        raise RuntimeError(f"{fn} needs triton.experimental.gluon (Triton >= 3.6): {_GLUON_ERROR}")
    if not is_available(a.device):
        major, minor = _capability(a.device.index if a.device.index is not None else torch.cuda.current_device())
        raise RuntimeError(f"{fn} needs sm_90 (Hopper); {torch.cuda.get_device_name(a.device)} is sm_{major}{minor}")


def check_block_operands(a, b, a_scale, b_scale, out_dtype, residual, gate) -> tuple[int, int, int]:
    """The arguments of a Gluon block-scaled GEMM (this kernel's and ``fp8_block_rescale_sm90``'s): ``fp8_gemm``'s
    own checks, then what TMA adds (K-contiguous operands and residual) and the block-scale shapes. Returns
    (M, N, K)."""
    _check_fp8_operands(a, b, out_dtype)
    for name, t in (("a", a), ("b", b)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along K, got strides {t.stride()}")
    M, K = a.shape
    N = b.shape[0]
    kb, nb = -(-K // QBLOCK), -(-N // QBLOCK)
    for name, s, shape in (("a_scale", a_scale, (M, kb)), ("b_scale", b_scale, (nb, kb))):
        _as_fp32_scale(s, name)
        if tuple(s.shape) != shape:
            raise ValueError(
                f"{name} must have the block-scale shape {shape} for M={M}, N={N}, K={K}, got {tuple(s.shape)}"
            )
    _check_epilogue(residual, gate, M, N)
    if residual is not None and residual.stride(1) != 1:
        raise ValueError(f"residual must be contiguous along N, got strides {residual.stride()}")
    return M, N, K


def _check_tma(t: torch.Tensor, name: str) -> None:
    """TMA descriptors need a 16-byte aligned base address and 16-byte aligned row strides."""
    if t.data_ptr() % 16 != 0:
        raise ValueError(
            f"{name} must start at a 16-byte aligned address for TMA, got data_ptr % 16 = {t.data_ptr() % 16}"
        )
    row_bytes = t.stride(0) * t.element_size()
    if row_bytes % 16 != 0:
        raise ValueError(
            f"{name}'s row stride must be a multiple of 16 bytes for TMA, got {t.stride(0)} elements x "
            f"{t.element_size()} B = {row_bytes} B (for e4m3 rows: K a multiple of 16)"
        )


def fp8_block_gemm_sm90(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    num_stages: int = 3,
    consumers: int = 2,
    ordered: bool | None = None,
    tma_store: bool = False,
) -> torch.Tensor:
    """``residual + gate * ((a * a_scale) @ (b * b_scale).T)`` with 1x128 (A) and 128x128 (B) block
    scales on Hopper: e4m3 ``a`` (M, K), ``b`` (N, K); fp32 ``a_scale`` (M, ceil(K/128)), ``b_scale``
    (ceil(N/128), ceil(K/128)); returns ``out_dtype`` (M, N). Same maths as ``fp8_gemm`` with block
    scales (module docstring), on the persistent warp-specialized kernel: one TMA producer warp and
    ``consumers`` warpgroups of 64 rows, 2 (128 x 128 tiles) or 3 (192 x 128 tiles, 160 registers per
    consumer). ``num_stages``: depth of the TMA ring (2-6, within sm_90's shared memory). ``ordered`` (two
    consumers; the default there): consumer 1 issues each wgmma after consumer 0's. ``tma_store``: write the tile through shared
    memory and a TMA store (2-byte outputs; rows that are not 16-byte aligned fall back to plain stores)."""
    M, N, K = check_block_operands(a, b, a_scale, b_scale, out_dtype, residual, gate)
    if not 2 <= num_stages <= 6:
        raise ValueError(f"num_stages must be in 2..6, got {num_stages}")
    if consumers not in WS_REGS:
        raise ValueError(f"consumers must be one of {sorted(WS_REGS)}, got {consumers}")
    if consumers != 2 and ordered:
        raise ValueError("ordered orders two consumers; it needs consumers=2")
    ordered = consumers == 2 if ordered is None else ordered
    if tma_store and out_dtype.itemsize != 2:
        raise ValueError(f"tma_store writes 2-byte outputs (bf16 / fp16), got out_dtype={out_dtype}")
    check_sm90_launch("fp8_block_gemm_sm90", a, b, a_scale, b_scale, residual, gate)
    _check_tma(a, "a")
    _check_tma(b, "b")

    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        if residual is not None:
            out.copy_(residual)
        return out
    res = residual if residual is not None else out
    g = gate.reshape(-1) if gate is not None else out.view(-1)
    tma_store = tma_store and out.data_ptr() % 16 == 0 and (N * out.element_size()) % 16 == 0
    smem = _ws_smem_bytes(num_stages, consumers, out.element_size() if tma_store else 0)
    if smem > SMEM_BYTES:
        raise ValueError(f"num_stages={num_stages} with {consumers} consumers needs {smem} B of shared memory, "
                         f"more than sm_90's {SMEM_BYTES}")  # fmt: skip
    return _launch_ws(a, b, a_scale, b_scale, out, res, g, residual is not None, gate is not None, num_stages,
                      ordered=ordered, consumers=consumers, tma_store=tma_store)  # fmt: skip


# Cached launches of the warp-specialized kernel (the dispatch of fp8_gemm's block scales): Gluon's
# JIT launch path (binder, specialization key, descriptor checks) cost 120-280 us of host time per
# call on the H100 (fp8_matmul run 12: eager 281 us for a 137 us kernel), so after the first launch
# of a specialization the compiled kernel's launcher is called directly, with the first launch's
# TMA descriptors re-pointed at the new tensors. FLUX2_FAST_LAUNCH=0 turns it off (as in fp8_matmul).
FAST_LAUNCH = os.environ.get("FLUX2_FAST_LAUNCH", "1") == "1"
_WS_LAUNCHERS: dict[tuple, tuple] = {}


def _ws_smem_bytes(num_stages: int, consumers: int, out_bytes: int) -> int:
    """Shared memory of the warp-specialized kernel: the ring (one 64 x 128 e4m3 A box per consumer and
    the 128 x 128 B tile per stage), the TMA-store buffers (``out_bytes`` per element, 0: none) and 3
    mbarriers per stage."""
    return num_stages * (consumers * 64 + BLOCK_N) * BLOCK_K + consumers * 64 * BLOCK_N * out_bytes + 24 * num_stages


def _launch_ws(a, b, a_scale, b_scale, out, res, g, has_res, has_gate, num_stages, *, ordered, consumers, tma_store):
    M, K = a.shape
    N = b.shape[0]
    maxnreg, consumer_regs, producer_regs = WS_REGS[consumers]
    ints = (M, N, K, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
            out.stride(0), res.stride(0), g.stride(0))  # fmt: skip
    consts = dict(HAS_RESIDUAL=has_res, HAS_GATE=has_gate, NUM_STAGES=num_stages, GROUP=GROUP_M,
                  PRODUCER_REGS=producer_regs, CONSUMER_REGS=consumer_regs, ORDERED=ordered, CONSUMERS=consumers,
                  TMA_STORE=tma_store)  # fmt: skip
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    # everything the launch specializes on: integer values (Triton specializes on 1 and on 16-divisibility),
    # the pointers' 16-byte alignment, dtypes, the descriptors' row strides, the constexprs
    key = (index, a.stride(0), b.stride(0), out.dtype, res.dtype, g.dtype, *ints, *consts.values(),
           *(t.data_ptr() % 16 == 0 for t in (a_scale, b_scale, out, res, g)))  # fmt: skip

    def make():
        a_layout = gl.NVMMASharedLayout.get_default_for([64, BLOCK_K], gl.float8e4nv)
        b_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gl.float8e4nv)
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [64, BLOCK_K], a_layout)
        b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [BLOCK_N, BLOCK_K], b_layout)
        if tma_store:
            o_layout = gl.NVMMASharedLayout.get_default_for(
                [64, BLOCK_N], {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[out.dtype]
            )
            out_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [64, BLOCK_N], o_layout)
        else:
            out_desc = a_desc  # not read (TMA_STORE=False); the kernel's signature takes a descriptor there
        grid = (min(-(-M // (64 * consumers)) * -(-N // BLOCK_N), _num_sms(index)), 1, 1)
        return grid, (a_desc, b_desc, out_desc)

    launch_cached(_WS_LAUNCHERS, key, FAST_LAUNCH, _fp8_block_gemm_sm90_ws_kernel, (a, b, out if tma_store else a),
                  (a_scale, b_scale, out, res, g, *ints), make, consts, num_warps=4, maxnreg=maxnreg)  # fmt: skip
    return out


def cache_launcher(cache: dict, key: tuple, kernel, compiled, grid, n_runtime: int, consts: dict, descs: tuple) -> None:
    """Keep ``(launcher, *descs, constexprs)`` for ``key``: the compiled kernel's launcher for ``grid``, the first
    launch's TMA descriptors without their tensors (``_desc_template``; re-pointed per call with ``_rebased``) and the constexpr arguments in parameter
    order (the kernel's parameters after its ``n_runtime`` runtime ones). Nothing when the launch returned no
    compiled kernel."""
    if compiled is None or not hasattr(compiled, "__getitem__"):
        return
    full = {**consts, "num_warps": 4}
    tail = tuple(full[n] for n in kernel.arg_names[n_runtime:])
    cache[key] = (compiled[grid], *map(_desc_template, descs), tail)


def launch_cached(
    cache: dict, key: tuple, fast: bool, kernel, desc_tensors: tuple, args: tuple, make, consts: dict, **launch
) -> None:
    """Launch the Gluon ``kernel`` as ``kernel[grid](*descriptors, *args, **consts, **launch)``, where ``make()``
    returns ``(grid, descriptors)`` (the kernel's leading TMA-descriptor parameters, descriptor i over
    ``desc_tensors[i]``). With ``fast``, the first launch of ``key`` (everything the launch specializes on) is
    cached (``cache_launcher``) and later ones go through the compiled kernel's launcher with the first launch's
    descriptors re-pointed at ``desc_tensors`` (``_rebased``): no JIT argument processing, no descriptor checks."""
    hit = cache.get(key) if fast else None
    if hit is not None:
        runner, *descs, tail = hit
        runner(*map(_rebased, descs, desc_tensors), *args, *tail)
        return
    grid, descs = make()
    compiled = kernel[grid](*descs, *args, **consts, **launch)
    if fast:
        cache_launcher(cache, key, kernel, compiled, grid, len(descs) + len(args), consts, descs)
