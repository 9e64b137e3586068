"""Row-wise (and per-tensor) scaled FP8 GEMM for Hopper (sm_90) in Gluon, warp-specialized.

What
----
``fp8_row_gemm_sm90(a, b, a_scale, b_scale)`` computes what ``flux2_bench.kernels.fp8_matmul.fp8_gemm``
computes for per-row (or per-tensor) scales with fast accumulation (reference: ``fp8_gemm_ref``)::

    out = residual + gate[None, :] * (a_scale[:, None] * b_scale[None, :] * (A @ B.T))

fp32 accumulation in the wgmma chain, the scales applied once, in the epilogue, then cast to bf16 / fp16.

- ``a``: (M, K) e4m3, K contiguous; ``a_scale``: (M,) / (M, 1) fp32, or one element (per-tensor).
- ``b``: (N, K) e4m3, K contiguous; ``b_scale``: (N,) / (N, 1) / (1, N) fp32, or one element.

Why
---
The Triton persistent kernel (``fp8_matmul._fp8_gemm_persistent_kernel``) runs 0.93-0.98x cuBLAS's row-wise
``_scaled_mm`` on the FLUX.2-dev shapes with M >= 4096 (reports/fp8_matmul, run 14, GPU time). It is not
warp-specialized: its TMA loads are issued by the same warps that issue the wgmmas, and its epilogue (scale,
cast, TMA store) leaves the tensor cores idle. cuBLAS's row-wise kernel keeps them 93 % busy (ncu_block_ws run 1).
This kernel is the block kernel's warp-specialized structure (``fp8_block_gemm_sm90``: one TMA producer warp,
consumer warpgroups synchronized by per-slot ``ready`` / ``empty`` mbarriers, persistent grid, TMA-store
epilogue) without the per-step promotion: each consumer chains its wgmmas into one accumulator and keeps one
in flight (``warpgroup_mma_wait(num_outstanding=1)``), releasing the ring slot of the step before.

Two schedules (``pingpong``):

- cooperative (False): both consumer warpgroups work on one 128 x BN tile, 64 rows each (BN = 128 or 256;
  m64nBNk32 wgmmas). The epilogue of the two runs at the same time, so the tensor cores wait for it; only
  the TMA store drains under the next tile.
- ping-pong (True): each consumer owns whole 128 x 128 tiles (two m64n128k32 wgmmas per k32, 128 accumulator
  registers), taking every other tile of the program. The producer fills the ring in tile order, so one
  consumer runs its K loop while the other runs its epilogue (CUTLASS's "ping-pong" kernel); the ring
  serializes their K loops.

Expectation (written before the first GPU run, session 9)
----------------------------------------------------------
On the H100, GPU time against ``_scaled_mm`` row-wise (fast accumulation), the M >= 4096 FLUX.2-dev
shapes: cooperative 128 x 256, 3 stages: 0.97-1.03x (our Triton persistent kernel: 0.92-1.04x);
ping-pong 128 x 128, 5 stages: 1.00-1.05x (the epilogue hidden). The M = 512 text shapes keep the
Triton kernel's stream-K where tiles are fewer than two waves (txt.proj, txt.mlp_out: 48 tiles of
128 x 128). Risk: the ring's single order serializes the ping-pong consumers' loads behind one
another, so a slow epilogue still stalls the next K loop.

Measured (reports/fp8_matmul/probe_row_ws.md, runs 1-2, H100; every variant bit-identical to the Triton
persistent kernel): cooperative 128 x 256 ran at the persistent kernel's speed on M >= 4096 (interleaved A/B
0.98-1.01x; against cuBLAS 0.92-0.99x), so neither the unspecialized structure nor the epilogue is what
separates that kernel from cuBLAS. Ping-pong (after the fix in ``_row_consumer``'s docstring) was slower:
0.88x the persistent kernel on M >= 4096 (not profiled; the likely cause is that one warpgroup at a time
issuing m64n128 wgmmas keeps the tensor cores less busy than two issuing together, which the hidden epilogue
does not repay). Cooperative 128 x 128 with 6
stages won on the M = 512 text GEMMs with N >= 16384 (txt.qkv 1.13x, txt.mlp_in 1.05x, by A/B): that is what
``fp8_matmul`` dispatches here (``_row_gluon_options``).

Epilogue options (session 16, reports/fp8_matmul/probe_row_epilogue.py runs 1-2, H100, same bits):
``prefetch_scales`` loads a tile's scales before its K loop (their global-load latency was exposed after it:
+1.0 %); ``epilogue_subtile`` stores each consumer's 64 x 256 tile as two halves through one 64 x 128 buffer,
which frees the shared memory of a fourth ring stage (+0.6 % on M >= 4096, up to +12 % on the few-tile M = 512
shapes). Together, 4 stages: 1.010x the Triton persistent kernel on M >= 4096, which is what ``fp8_matmul`` now
dispatches from 1024 rows. A diagnostic with the stores skipped ran only 1.024x faster: the epilogue left costs
~2.5 %, the rest of the gap to cuBLAS (0.98x) is in the K loop. Running consumer 1 one or two K steps behind
consumer 0, so that their epilogues would overlap each other's wgmmas, gained nothing (probe_row_stagger run 1,
session 17: 1.000x / 1.003x, same bits; the option was removed).
"""

from __future__ import annotations

import os

import torch

from flux2_bench.kernels import fp8_block_gemm_sm90 as _block
from flux2_bench.kernels import fp8_block_rescale_sm90 as _rescale
from flux2_bench.kernels.fp8_matmul import _check_epilogue, _check_fp8_operands

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

BLOCK_K = 128
GROUP_M = 8
SMEM_BYTES = _block.SMEM_BYTES
# launched as 12 warps (two consumer warpgroups, the producer's warp rounded up to a warpgroup) at
# 168 registers; setmaxnreg then gives each consumer 232 and the producer's warpgroup 40
MAXNREG, CONSUMER_REGS, PRODUCER_REGS = _block.WS_REGS[2]
EXPECTATION = (
    "GPU time vs _scaled_mm row fast, M >= 4096: cooperative 128x256 3 stages 0.97-1.03x, ping-pong "
    "128x128 5 stages 1.00-1.05x; written before the first run (session 9)"
)


if gluon is not None:

    @gluon.jit
    def _load_col_scales(b_scale_ptr, off_n, N, stride_bsn, WIDTH: gl.constexpr, layout: gl.constexpr):
        offs_n = off_n + gl.arange(0, WIDTH, layout=layout)
        return gl.load(b_scale_ptr + offs_n * stride_bsn, mask=offs_n < N, other=0.0)

    @gluon.jit
    def _row_part(acc, a_s, b_s, c_buf, out_desc, off_m, off_n, N, gate_ptr, res_ptr, offs_m, mask_m, stride_rm,
                  stride_gn, HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, STORE: gl.constexpr):  # fmt: skip
        """Epilogue of one part of a consumer's tile (``c_buf``'s width of columns from ``off_n``): scales, then
        gate, residual, cast and TMA store (``fp8_block_rescale_sm90._store_half``). ``STORE=False`` (timing
        probes only) stores nothing, the output is left unwritten: the store sits behind a test that is false at
        run time but not at compile time (``off_m < 0``), so that the compiler keeps the wgmmas and the scaling."""
        acc = acc * (a_s[:, None] * b_s[None, :])
        if STORE:  # noqa: SIM114 (a constexpr branch and a run-time one: kept apart so STORE compiles to no test)
            _rescale._store_half(acc, c_buf, out_desc, off_m, off_n, N, gate_ptr, res_ptr, offs_m, mask_m, stride_rm,
                                 stride_gn, HAS_RESIDUAL, HAS_GATE)  # fmt: skip
        elif off_m < 0:
            _rescale._store_half(acc, c_buf, out_desc, off_m, off_n, N, gate_ptr, res_ptr, offs_m, mask_m, stride_rm,
                                 stride_gn, HAS_RESIDUAL, HAS_GATE)  # fmt: skip

    @gluon.jit
    def _row_consumer(
        a_smem, b_smem, c_smem, ready, empty, turn, out_desc, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr,
        M, N, K, stride_asm, stride_bsn, stride_rm, stride_gn,
        HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, GROUP: gl.constexpr, WG: gl.constexpr,
        PINGPONG: gl.constexpr, PREFETCH: gl.constexpr, SUBTILE: gl.constexpr, STORE: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup. Cooperative: rows [WG * 64, WG * 64 + 64) of every tile of the program (its own
        64-row A box in each slot). Ping-pong: all 128 rows of every other tile of the program (WG 0 the
        even ones), skipping the other consumer's K steps in the ring count. Per K step: wait ``ready``,
        issue the async wgmma into the accumulator, wait until at most this one is in flight, release the
        previous step's slot (``empty``: one arrival per consumer using the slot). Then the epilogue:
        scales, gate, residual, cast, TMA store through this consumer's shared buffer.

        Ping-pong K loops strictly alternate (``turn[c]``: the other consumer finished issuing its tile's K
        loop). Without that order, consumer 1 waited on ``ready`` for a step more than one ring lap ahead of
        the producer, where the parity wait cannot tell the awaited phase from one two laps earlier: it read
        slots before their data arrived (probe_row_ws run 1: launch failures; wrong results under
        compute-sanitizer). With it, a consumer starts a tile only after every earlier step was waited for, so
        the slot it waits on is at most one phase from the awaited one."""
        NUM_STAGES: gl.constexpr = b_smem.shape[0]
        BOXES: gl.constexpr = a_smem.shape[0] // NUM_STAGES  # A boxes per slot: 2 cooperative, 1 ping-pong
        BM: gl.constexpr = a_smem.shape[1]  # this consumer's rows
        BM_TILE: gl.constexpr = BM * BOXES
        BN: gl.constexpr = b_smem.shape[1]
        BK: gl.constexpr = b_smem.shape[2]
        PART: gl.constexpr = c_smem.shape[2]  # epilogue columns per TMA store: BN, or BN / 2 (SUBTILE)
        gl.static_assert(gl.num_warps() == 4)
        gl.static_assert((PINGPONG and BOXES == 1) or (not PINGPONG and BOXES == 2 and BM == 64))
        gl.static_assert((BN // 2 if SUBTILE else BN) == PART)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
        mma_p: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, PART, 32])  # fmt: skip
        row_l: gl.constexpr = gl.SliceLayout(1, mma_p)
        col_l: gl.constexpr = gl.SliceLayout(0, mma_p)
        pre_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])  # prefetched scales: 1-2 registers a thread

        num_pid_m = gl.cdiv(M, BM_TILE)
        num_pid_n = gl.cdiv(N, BN)
        k_tiles = gl.cdiv(K, BK)
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        if PINGPONG:
            first = pid + WG * nprog
            stride = 2 * nprog
            it = WG * k_tiles  # ring steps of the tiles before this consumer's first one
            n = 0  # tiles this consumer has run
            box = 0
            row0 = 0
        else:
            first = pid
            stride = nprog
            it = 0
            box = WG
            row0 = WG * BM
        for tile_id in range(first, num_pid_m * num_pid_n, stride):
            pid_m, pid_n = _block._tile_pids(tile_id, num_pid_m, num_pid_n, GROUP)
            off_m = pid_m * BM_TILE + row0
            off_n = pid_n * BN
            acc = gl.zeros([BM, BN], gl.float32, layout=mma)
            if PREFETCH:  # the tile's scales, loaded before the K loop so that it hides their latency
                pm = off_m + gl.arange(0, BM, layout=pre_l)
                a_pre = gl.load(a_scale_ptr + pm * stride_asm, mask=pm < M, other=0.0)
                pn = off_n + gl.arange(0, PART, layout=pre_l)
                b_pre0 = gl.load(b_scale_ptr + pn * stride_bsn, mask=pn < N, other=0.0)
                if SUBTILE:
                    b_pre1 = gl.load(b_scale_ptr + (pn + PART) * stride_bsn, mask=pn + PART < N, other=0.0)
            if PINGPONG:  # this consumer's n-th tile: after the other's K loop of the tile before it
                if WG == 0:
                    mbarrier.wait(turn.index(0), (n + 1) & 1, pred=n > 0)
                else:
                    mbarrier.wait(turn.index(1), n & 1)
            for j in range(k_tiles):
                s = it % NUM_STAGES
                mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
                acc = warpgroup_mma(a_smem.index(s * BOXES + box), b_smem.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                # the wgmma of step j - 1 has retired: its slot may be refilled
                mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES), count=1, pred=j > 0)
                it += 1
            if PINGPONG:  # every wgmma of this tile issued: the other consumer's turn
                mbarrier.arrive(turn.index(1 - WG), count=1)
                n += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index((it + NUM_STAGES - 1) % NUM_STAGES), count=1)
            if PINGPONG:
                it += k_tiles  # the other consumer's tile

            # epilogue, in fp8_matmul._epilogue_math's order (the same bits as the Triton kernels)
            offs_m = off_m + gl.arange(0, BM, layout=row_l)
            mask_m = offs_m < M
            if PREFETCH:
                a_s = gl.convert_layout(a_pre, row_l)
            else:
                a_s = gl.load(a_scale_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)
            c_buf = c_smem.index(WG)
            if SUBTILE:  # two 64 x BN/2 halves through one buffer (the smem of a fourth ring stage)
                acc_lo, acc_hi = acc.reshape([BM, 2, PART]).permute((0, 2, 1)).split()
                acc_lo = gl.convert_layout(acc_lo, mma_p)  # register relabelling, no data movement
                acc_hi = gl.convert_layout(acc_hi, mma_p)
                if PREFETCH:
                    b_lo = gl.convert_layout(b_pre0, col_l)
                    b_hi = gl.convert_layout(b_pre1, col_l)
                else:
                    b_lo = _load_col_scales(b_scale_ptr, off_n, N, stride_bsn, PART, col_l)
                    b_hi = _load_col_scales(b_scale_ptr, off_n + PART, N, stride_bsn, PART, col_l)
                tma.store_wait(0)  # this consumer's previous store has been read out of c_buf
                _row_part(acc_lo, a_s, b_lo, c_buf, out_desc, off_m, off_n, N, gate_ptr, res_ptr, offs_m, mask_m,
                          stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, STORE)  # fmt: skip
                tma.store_wait(0)
                _row_part(acc_hi, a_s, b_hi, c_buf, out_desc, off_m, off_n + PART, N, gate_ptr, res_ptr, offs_m,
                          mask_m, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, STORE)  # fmt: skip
            else:
                if PREFETCH:
                    b_s = gl.convert_layout(b_pre0, col_l)
                else:
                    b_s = _load_col_scales(b_scale_ptr, off_n, N, stride_bsn, PART, col_l)
                tma.store_wait(0)  # this consumer's previous tile has left c_buf
                _row_part(acc, a_s, b_s, c_buf, out_desc, off_m, off_n, N, gate_ptr, res_ptr, offs_m, mask_m,
                          stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE, STORE)  # fmt: skip
        tma.store_wait(0)

    @gluon.jit
    def _fp8_row_gemm_sm90_kernel(
        a_desc,  # (M, K) e4m3, block [64 (cooperative) or 128 (ping-pong), BLOCK_K]
        b_desc,  # (N, K) e4m3, block [BLOCK_N, BLOCK_K]
        out_desc,  # (M, N) bf16 / fp16, block [rows per consumer, BLOCK_N (or BLOCK_N / 2: SUBTILE)]
        a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr,
        M, N, K, stride_asm, stride_bsn, stride_rm, stride_gn,
        HAS_RESIDUAL: gl.constexpr,
        HAS_GATE: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        GROUP: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        PINGPONG: gl.constexpr,
        PREFETCH: gl.constexpr,
        SUBTILE: gl.constexpr,
        STORE: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        gl.static_assert(BK == 128)
        gl.static_assert(BN == 128 or BN == 256)
        gl.static_assert(num_warps == 4)  # the default partition is consumer 0 (one warpgroup)
        BOXES: gl.constexpr = 1 if PINGPONG else 2

        a_smem = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES * BOXES, BM, BK], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BN, BK], b_desc.layout)
        c_smem = gl.allocate_shared_memory(out_desc.dtype, [2, BM, out_desc.block_type.shape[1]], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)  # the producer's expect; TMA bytes complete it
            mbarrier.init(empty.index(i), count=BOXES)  # one arrival per consumer reading the slot
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)  # ping-pong: consumer i may start its next K loop
        fence_async_shared()

        # (argument tuples spelled out: see fp8_block_gemm_sm90's kernel for why)
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        # fmt: off
        gl.warp_specialize(
            [
            (_row_consumer, (a_smem, b_smem, c_smem, ready, empty, turn, out_desc, a_scale_ptr, b_scale_ptr, res_ptr,
                             gate_ptr, M, N, K, stride_asm, stride_bsn, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE,
                             GROUP, WG0, PINGPONG, PREFETCH, SUBTILE, STORE)),
            (_row_consumer, (a_smem, b_smem, c_smem, ready, empty, turn, out_desc, a_scale_ptr, b_scale_ptr, res_ptr,
                             gate_ptr, M, N, K, stride_asm, stride_bsn, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE,
                             GROUP, WG1, PINGPONG, PREFETCH, SUBTILE, STORE)),
            (_block._ws_producer, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP)),
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


def smem_bytes(
    num_stages: int, block_n: int, pingpong: bool, out_bytes: int = 2, subtile: bool = False, prefetch: bool = False
) -> int:
    """Shared memory of the kernel: the ring (128 A rows and ``block_n`` B rows of 128 e4m3 per stage), the
    two consumers' TMA-store buffers (half-width with ``subtile``), 2 mbarriers per stage and the 2 ping-pong
    ones, and with ``prefetch`` the layout-conversion scratch of the prefetched scales."""
    rows = 128 if pingpong else 64
    part = block_n // 2 if subtile else block_n
    scratch = 8 * block_n if prefetch else 0  # an upper bound (compile_row_sm90: 864-1888 B at 256)
    return num_stages * (128 + block_n) * BLOCK_K + 2 * rows * part * out_bytes + 16 * num_stages + 16 + scratch


def _scale_stride(s: torch.Tensor, name: str, shapes: tuple) -> int:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if s.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {s.dtype}")
    if s.numel() == 1:
        return 0
    if tuple(s.shape) not in shapes:
        raise ValueError(f"{name} must be one element (per-tensor) or of shape {' / '.join(map(str, shapes))}, "
                         f"got {tuple(s.shape)}")  # fmt: skip
    return s.stride(1) if s.ndim == 2 and s.shape[0] == 1 else s.stride(0)  # along the rows / columns


def fp8_row_gemm_sm90(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    block_n: int = 256,
    num_stages: int = 3,
    pingpong: bool = False,
    prefetch_scales: bool = False,
    epilogue_subtile: bool = False,
    _store: bool = True,
) -> torch.Tensor:
    """``residual + gate * (a_scale * b_scale * (a @ b.T))`` on Hopper with per-row / per-tensor scales (module
    docstring): e4m3 ``a`` (M, K) and ``b`` (N, K), both K-contiguous with 16-byte aligned rows (K a multiple
    of 16); fp32 ``a_scale`` (M,) / (M, 1) / one element, ``b_scale`` (N,) / (N, 1) / (1, N) / one element;
    ``out_dtype`` bf16 or fp16. ``pingpong``: each consumer warpgroup owns whole 128 x 128 tiles (``block_n``
    must be 128); otherwise both share 128 x ``block_n`` tiles (128 or 256). ``num_stages``: depth of the TMA
    ring (2-8, within sm_90's 227 KB of shared memory: ``smem_bytes``). ``prefetch_scales``: load each tile's
    scales before its K loop instead of in the epilogue. ``epilogue_subtile`` (cooperative only): store each
    consumer's 64 x ``block_n`` tile in two halves through one half-size buffer, which frees the shared memory
    of a fourth ring stage at ``block_n=256``. ``_store=False`` is for timing probes: the output is left
    unwritten."""
    _check_fp8_operands(a, b, out_dtype)
    if out_dtype not in _OUT_GL:
        raise ValueError(f"fp8_row_gemm_sm90 writes bf16 or fp16 (TMA store), got out_dtype={out_dtype}")
    for name, t in (("a", a), ("b", b)):
        if t.stride(1) != 1:
            raise ValueError(f"{name} must be contiguous along K, got strides {t.stride()}")
    M, K = a.shape
    N = b.shape[0]
    s_am = _scale_stride(a_scale, "a_scale", ((M,), (M, 1)))
    s_bn = _scale_stride(b_scale, "b_scale", ((N,), (N, 1), (1, N)))
    _check_epilogue(residual, gate, M, N)
    if residual is not None and residual.stride(1) != 1:
        raise ValueError(f"residual must be contiguous along N, got strides {residual.stride()}")
    if block_n not in (128, 256):
        raise ValueError(f"block_n must be 128 or 256, got {block_n}")
    if pingpong and block_n != 128:
        raise ValueError(
            f"pingpong tiles are 128 x 128 per consumer (128 accumulator registers); got block_n={block_n}"
        )
    if pingpong and epilogue_subtile:
        raise ValueError("epilogue_subtile is for the cooperative schedule (pingpong=False)")
    if not 2 <= num_stages <= 8:
        raise ValueError(f"num_stages must be in 2..8, got {num_stages}")
    smem = smem_bytes(num_stages, block_n, pingpong, subtile=epilogue_subtile, prefetch=prefetch_scales)
    if smem > SMEM_BYTES:
        raise ValueError(f"num_stages={num_stages} with block_n={block_n}{' (ping-pong)' if pingpong else ''} needs "
                         f"{smem} B of shared memory, more than sm_90's {SMEM_BYTES}")  # fmt: skip
    _block.check_sm90_launch("fp8_row_gemm_sm90", a, b, a_scale, b_scale, residual, gate)
    out = torch.empty((M, N), device=a.device, dtype=out_dtype)
    for name, t in (("a", a), ("b", b), ("out", out)):
        _block._check_tma(t, name)
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.zero_()
        if residual is not None:
            out.copy_(residual)
        return out
    res = residual if residual is not None else out
    g = gate.reshape(-1) if gate is not None else out.view(-1)
    return _launch(a, b, a_scale, b_scale, out, res, g, s_am, s_bn, residual is not None, gate is not None,
                   block_n, num_stages, pingpong, prefetch_scales, epilogue_subtile, _store)  # fmt: skip


def _launch(a, b, a_scale, b_scale, out, res, g, s_am, s_bn, has_res, has_gate, block_n, num_stages, pingpong,
            prefetch=False, subtile=False, store=True):  # fmt: skip
    M, K = a.shape
    N = b.shape[0]
    ints = (M, N, K, s_am, s_bn, res.stride(0), g.stride(0))
    consts = dict(HAS_RESIDUAL=has_res, HAS_GATE=has_gate, NUM_STAGES=num_stages, GROUP=GROUP_M,
                  PRODUCER_REGS=PRODUCER_REGS, CONSUMER_REGS=CONSUMER_REGS, PINGPONG=pingpong, PREFETCH=prefetch,
                  SUBTILE=subtile, STORE=store)  # fmt: skip
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    # everything the launch specializes on: integer values (Triton specializes on 1 and on 16-divisibility),
    # the pointers' 16-byte alignment, dtypes, the descriptors' shapes and row strides, the constexprs
    key = (index, a.stride(0), b.stride(0), out.stride(0), out.dtype, res.dtype, g.dtype, block_n, *ints,
           *consts.values(), *(t.data_ptr() % 16 == 0 for t in (a_scale, b_scale, res, g)))  # fmt: skip

    def make():
        rows = 128 if pingpong else 64
        e4m3 = gl.float8e4nv
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [rows, BLOCK_K],
                                  gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], e4m3))  # fmt: skip
        b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [block_n, BLOCK_K],
                                  gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], e4m3))  # fmt: skip
        part = block_n // 2 if subtile else block_n
        o_layout = gl.NVMMASharedLayout.get_default_for([rows, part], getattr(gl, _OUT_GL[out.dtype]))
        out_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [rows, part], o_layout)
        # one tile per program where tiles are few (ping-pong too: the ring serializes a program's K loops)
        grid = (min(-(-M // 128) * -(-N // block_n), _block._num_sms(index)), 1, 1)
        return grid, (a_desc, b_desc, out_desc)

    _block.launch_cached(_LAUNCHERS, key, FAST_LAUNCH, _fp8_row_gemm_sm90_kernel, (a, b, out),
                         (a_scale, b_scale, res, g, *ints), make, consts, num_warps=4, maxnreg=MAXNREG)  # fmt: skip
    return out
