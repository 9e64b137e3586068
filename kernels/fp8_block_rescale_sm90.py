"""Block-scaled FP8 GEMM for Hopper (sm_90) with a rescaled accumulator: 128 x 256 tiles, fast accumulation.

What
----
``fp8_block_gemm_rescaled_sm90(a, b, a_scale, b_scale)`` computes what ``fp8_block_gemm_sm90`` computes
(1x128 activation blocks, 128x128 weight blocks; reference ``fp8_matmul.fp8_gemm_ref``)::

    out[m, n] = sum_kb s_kb[m, n] * P_kb[m, n],   s_kb = a_scale[m, kb] * b_scale[n // 128, kb],
    P_kb = sum_{k in block kb} A[m, k] * B[n, k]

but without a second accumulator. Instead of promoting each K block's product into an fp32 sum on the CUDA
cores (``acc += s_kb * P_kb``: DeepGEMM's scheme, ``fp8_block_gemm_sm90``), the wgmma chain accumulates in
units of the current block's scale, and the accumulator is rescaled between K blocks (FlashAttention's
running-max trick, applied to block scales)::

    acc_0 = P_0;   acc_kb = acc_{kb-1} * (s_{kb-1} / s_kb) + P_kb;   out = acc_last * s_last

Each rescale is one fp32 multiply per accumulator element on the CUDA cores, after the wgmma of the K block
retired. Because the accumulator of a 64 x 256 warpgroup tile is 128 registers instead of 256 (accumulator
plus product), each consumer warpgroup can own 64 x 256 (two m64n128 wgmmas per K block, one per weight-scale
block, each rescaled by its own per-row factor): the tile of our row-wise kernel, where the promotion kernel
is held to 128 x 128 (``fp8_block_gemm_sm90``'s docstring: 276 bytes of spills at 128 x 256).

Accuracy: the wgmma chain adds each K block into the running accumulator inside the tensor core, so this is
*fast accumulation* (Hopper's MMA keeps about 14 bits while it accumulates; ``_scaled_mm(use_fast_accum=True)``
and our row-wise kernels do the same), plus one fp32 rounding per rescale. ``fp8_gemm`` dispatches it for
block scales with ``fast_accum=True`` (its default); ``fast_accum=False`` keeps the promotion kernel.

Range: the accumulator holds ``partial sum / s_kb``. The step scales are clamped to >= ``SCALE_FLOOR``
(1e-30; the library's quantizers give >= (1e-12 / 448)^2 = 5e-30, so the clamp never binds on their
scales), which bounds the accumulator by 1e30 x the partial sum: a zero scale (an all-zero weight block)
cannot turn the sum into inf or NaN. A block whose scale is below the floor contributes ``1e-30 * P_kb``
instead of ``s_kb * P_kb`` (below 3e-23 in absolute value for e4m3 operands).

Structure (``fp8_row_gemm_sm90``'s cooperative kernel, ``fp8_block_gemm_sm90``'s producer)
-----------------------------------------------------------------------------------------
Persistent grid, one TMA producer warp (``fp8_block_gemm_sm90._ws_producer``: per ring slot one 64 x 128 A box
per consumer and the 256 x 128 B tile), two consumer warpgroups of 64 rows each. Per K step a consumer waits
``ready[s]``, issues the two async m64n128k128 wgmmas (the weight tile's two 128-row halves), computes the next
step's rescale factors from scales loaded a step earlier (so that no load is waited on before the wgmma wait),
issues the loads of the step after, waits for its wgmmas, releases the slot and rescales. The other consumer's
wgmmas keep the tensor cores busy while one rescales. The epilogue (gate, residual, cast) goes through one
64 x 128 shared buffer per consumer and half, and a TMA store that drains under the next tile's K loop.
Shared memory at 3 stages: 3 x 48 KB ring + 64 KB store buffers = 208 KB.

Compiled for sm_90 on the CPU (reports/fp8_matmul/compile_block_rescale_sm90.py, Triton 3.6): no spills at
168 registers with or without the gate / residual epilogue, one wgmma wait per K step, 271-278 SASS
instructions per consumer and K step (152 FMUL: 128 rescales, the rest the scales and the approximate
divisions), 8 QGMMA.

Expectation (written before the first GPU run, session 15)
----------------------------------------------------------
On the H100, interleaved A/B against our row-wise dispatch on the FLUX.2-dev shapes: 0.85-0.95x on
M >= 4096 (the row-wise kernel's 128 x 256 tile and ring, plus per K step 128 FMULs, 4 divisions and three
scale loads per thread, and a full wgmma wait instead of keeping one in flight: the other consumer's 512-cycle
m64n256k128 must cover ~250 cycles of that), against 0.72 for the promotion kernel (fp8_matmul run 17); M = 512
similar to the promotion kernel's or better (96-192 tiles of 128 x 128 there become 48-96 of 128 x 256: wave
quantization may eat the gain on txt.proj). Accuracy: rel L2 against the fp32 reference like the row-wise fast
accumulation's (~2e-4 on random data), not the promotion kernel's.

Measured (H100; reports/fp8_matmul/probe_block_rescale.py runs 1-4, bench_fp8_matmul runs 18-19)
------------------------------------------------------------------------------------------------
- Two m64n128 wgmmas per consumer and K step (run 1): 0.79x our row-wise GEMM, below the expected 0.85-0.95x.
  Nsight Compute: tensor pipe 70 % active. A is read from shared memory once per wgmma, so twice per K step.
- ``wide`` (one m64n256 wgmma, per-half rescale through a register-relabelling reshape; run 2): 1.13x that
  (expected 1.03-1.10x), tensor pipe 80 %; 0.894x row-wise, 1.01x cuBLAS's block-scaled ``_scaled_mm``.
- The step scales' reciprocal in one MUFU.RCP (run 4): 0.904x row-wise (run 3 without it: 0.892x).
- ``block_n=128``: 1.07x the 128 x 256 tiles on txt.qkv in run 3, 0.98x there in run 4, slower on every other
  shape; not dispatched.
- Releasing each ring slot after the next step's wgmma issue, so that the warpgroup barrier in front of Gluon's
  mbarrier arrive runs under it (run 5, expected 1.00-1.04x): 0.946x; with 3 stages the producer then has a step
  less to refill the slot. Removed.
- bench_fp8_matmul run 19 (fp8_gemm's dispatch, ``fp8_matmul.BLOCK_RESCALE_OPTIONS``): block / row-wise 0.903x
  by interleaved A/B, 0.915x eager, 0.925x in GPU time (the issue's 0.9 target), 1.06x cuBLAS block in GPU time.
- ``share_out_buffer`` (session 16, probe_block_rescale run 6): one 64 x 128 output buffer per consumer, the
  halves stored in turn, frees a fourth ring stage: 1.024x (up to 1.08x on the M = 512 shapes), same bits.
  bench_fp8_matmul run 20 with it: block / row-wise 0.925x by A/B against the faster Gluon row-wise dispatch.
- Accuracy, rel L2 against fp32 (random data, bf16 output): 2.8e-3 at K = 6144 to 6.9e-3 at K = 24576, against
  2.4e-3 to 4.3e-3 for the row-wise fast accumulation and 1.7e-3 for the promotion kernel (the bf16 rounding):
  expected "like row-wise", measured 1.2-1.6x it. (The estimate above, ~2e-4, was fast accumulation's error
  without the output rounding, and too low.)
"""

from __future__ import annotations

import os

import torch

from flux2_bench.kernels import fp8_block_gemm_sm90 as _block

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

BLOCK_M = 128  # two consumer warpgroups of 64 rows
BLOCK_N = 256  # default: two 128-row weight-scale blocks (block_n=128: one)
BLOCK_K = 128
HALF_N = 128
GROUP_M = 8
SCALE_FLOOR = 1e-30
SMEM_BYTES = _block.SMEM_BYTES
MAXNREG, CONSUMER_REGS, PRODUCER_REGS = _block.WS_REGS[2]
EXPECTATION_WIDE = (
    "wide (one m64n256 wgmma per consumer and K step, A read from shared memory once instead of twice: 80 instead "
    "of 96 B/clk of operand reads at the tensor pipe's full rate, next to 48 B/clk of TMA writes, against a 128 B/clk "
    "port; 4 QGMMA instead of 8): 1.03-1.10x the two-wgmma kernel; written before its first run (session 15)"
)
EXPECTATION = (
    "A/B vs our row-wise dispatch: 0.85-0.95x on M >= 4096, M = 512 at or above the promotion kernel "
    "(0.72x row-wise in fp8_matmul run 17); rel L2 like row-wise fast accumulation; written before the first run "
    "(session 15)"
)


if gluon is not None:

    @gluon.jit
    def _step_raw(sa_ptrs, sb_ptr, mask_m, has_hi, j, k_tiles, stride_ask, stride_bsk, stride_bsn):
        """Raw scales of K step j: a_scale[m, j] for this consumer's rows and b_scale of the tile's two weight
        blocks at j. 1.0 past the last step (so that the last rescale leaves the sum in absolute units), for
        rows past M and for a half past N."""
        live = j < k_tiles
        a = gl.load(sa_ptrs + j * stride_ask, mask=mask_m & live, other=1.0)
        b_lo = gl.load(sb_ptr + j * stride_bsk, mask=live, other=1.0)
        b_hi = gl.load(sb_ptr + stride_bsn + j * stride_bsk, mask=live & has_hi, other=1.0)
        return a, b_lo, b_hi

    @gluon.jit
    def _scale_in_place(acc, f):
        """``acc * f`` written over ``acc``'s registers (a tied asm operand). With a plain multiply LLVM copied the
        wgmma's accumulator registers before the wgmma wait, and ptxas, seeing them read while the wgmma ran,
        serialized every wgmma of the kernel (C7514) and spilled 388 bytes (compile_block_rescale_sm90.py)."""
        return gl.inline_asm_elementwise(
            "mul.f32 $0, $1, $2;", "=r,0,r", [acc, f], dtype=gl.float32, is_pure=True, pack=1
        )

    @gluon.jit
    def _rescale_wide(acc, f_lo, f_hi):
        """``acc`` (BM x BN, one wgmma accumulator) with its left half times ``f_lo`` and its right half times
        ``f_hi`` (per row), in place."""
        BM: gl.constexpr = acc.shape[0]
        BN: gl.constexpr = acc.shape[1]
        acc3 = acc.reshape([BM, 2, BN // 2])
        f3 = gl.convert_layout(gl.join(f_lo, f_hi), gl.SliceLayout(2, acc3.type.layout))
        acc3 = _scale_in_place(acc3, f3[:, :, None])
        return gl.convert_layout(acc3.reshape([BM, BN]), acc.type.layout)

    @gluon.jit
    def _rcp(x):
        """1 / x to about 1 ulp in one MUFU.RCP (``rcp.approx.ftz``; x is a step scale in [1e-30, 3e38)). A
        division compiles to a call with a slow path (ptxas then spilled the accumulators around it) or, as
        ``gl.fdiv``, to six instructions with range fix-ups."""
        return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True,
                                         pack=1)  # fmt: skip

    @gluon.jit
    def _step_scale(a, b_lo, b_hi):
        """The step's scale per row, for each half of the tile, clamped to SCALE_FLOOR (module docstring)."""
        return gl.maximum(a * b_lo, 1e-30), gl.maximum(a * b_hi, 1e-30)

    @gluon.jit
    def _store_half(acc, c_buf, out_desc, off_m, off_n, N, gate_ptr, res_ptr, offs_m, mask_m, stride_rm, stride_gn,
                    HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr):  # fmt: skip
        """Epilogue of one 64 x 128 half, in fp8_matmul._epilogue_math's order: gate, residual, cast, TMA store
        (rows / columns past M / N clipped by the TMA unit)."""
        HALF: gl.constexpr = c_buf.shape[1]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 32])
        offs_n = off_n + gl.arange(0, HALF, layout=gl.SliceLayout(0, mma))
        mask_n = offs_n < N
        if HAS_GATE:
            g = gl.load(gate_ptr + offs_n * stride_gn, mask=mask_n, other=0.0).to(gl.float32)
            acc = acc * g[None, :]
        if HAS_RESIDUAL:
            rows = offs_m.to(gl.int64)[:, None]
            r = gl.load(res_ptr + rows * stride_rm + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                        other=0.0)  # fmt: skip
            acc = acc + r.to(gl.float32)
        c_buf.store(acc.to(out_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [off_m, off_n], c_buf)

    @gluon.jit
    def _rescale_consumer(
        a_smem, b_smem, c_smem, ready, empty, out_desc, a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr,
        M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk, stride_rm, stride_gn,
        HAS_RESIDUAL: gl.constexpr, HAS_GATE: gl.constexpr, GROUP: gl.constexpr, WG: gl.constexpr,
        WIDE: gl.constexpr,
    ):  # fmt: skip
        """One warpgroup: rows [WG * 64, WG * 64 + 64) of every 128 x 256 tile of the program, as two 64 x 128
        accumulators (one per weight-scale block) kept in units of the current K step's scale (module
        docstring)."""
        NUM_STAGES: gl.constexpr = b_smem.shape[0]
        BM: gl.constexpr = a_smem.shape[1]
        BN: gl.constexpr = b_smem.shape[1]
        BK: gl.constexpr = b_smem.shape[2]
        HALF: gl.constexpr = c_smem.shape[2]  # one weight-scale block of columns
        NH: gl.constexpr = BN // HALF  # weight blocks per tile: 1 or 2
        BUFS: gl.constexpr = c_smem.shape[0] // 2  # output buffers per consumer: NH, or 1 shared by the halves
        gl.static_assert(WIDE or NH == 2)
        gl.static_assert(gl.num_warps() == 4)
        gl.static_assert(BM == 64)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HALF, 32])
        wide: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, wide) if WIDE else gl.SliceLayout(1, mma)

        num_pid_m = gl.cdiv(M, 2 * BM)
        num_pid_n = gl.cdiv(N, BN)
        n_blocks = gl.cdiv(N, HALF)
        k_tiles = gl.cdiv(K, BK)
        it = 0
        for tile_id in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _block._tile_pids(tile_id, num_pid_m, num_pid_n, GROUP)
            off_m = pid_m * 2 * BM + WG * BM
            off_n = pid_n * BN
            offs_m = off_m + gl.arange(0, BM, layout=row_l)
            mask_m = offs_m < M
            sa_ptrs = a_scale_ptr + offs_m * stride_asm
            sb_ptr = b_scale_ptr + (NH * pid_n) * stride_bsn
            has_hi = (NH == 2) & (NH * pid_n + 1 < n_blocks)

            a0, l0, h0 = _step_raw(sa_ptrs, sb_ptr, mask_m, has_hi, 0, k_tiles, stride_ask, stride_bsk, stride_bsn)
            c_lo, c_hi = _step_scale(a0, l0, h0)  # step j's scales
            a_n, l_n, h_n = _step_raw(sa_ptrs, sb_ptr, mask_m, has_hi, 1, k_tiles, stride_ask, stride_bsk, stride_bsn)
            if WIDE:
                acc = gl.zeros([BM, BN], gl.float32, layout=wide)
            else:
                acc_lo = gl.zeros([BM, HALF], gl.float32, layout=mma)
                acc_hi = gl.zeros([BM, HALF], gl.float32, layout=mma)
            for j in range(k_tiles):
                s = it % NUM_STAGES
                mbarrier.wait(ready.index(s), (it // NUM_STAGES) & 1)
                a_t = a_smem.index(s * 2 + WG)
                b_t = b_smem.index(s)
                if WIDE:
                    acc = warpgroup_mma(a_t, b_t.permute((1, 0)), acc, is_async=True)
                else:
                    acc_lo = warpgroup_mma(a_t, b_t.slice(0, HALF).permute((1, 0)), acc_lo, is_async=True)
                    acc_hi = warpgroup_mma(a_t, b_t.slice(HALF, HALF).permute((1, 0)), acc_hi, is_async=True)
                # under the wgmmas: the rescale factors from scales loaded a step ago, and the loads of the
                # scales of step j + 2 (not used before the next step: nothing here waits on a load)
                n_lo, n_hi = _step_scale(a_n, l_n, h_n)
                f_lo = c_lo * _rcp(n_lo)
                f_hi = c_hi * _rcp(n_hi)
                a_n, l_n, h_n = _step_raw(sa_ptrs, sb_ptr, mask_m, has_hi, j + 2, k_tiles, stride_ask, stride_bsk,
                                          stride_bsn)  # fmt: skip
                if WIDE:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    mbarrier.arrive(empty.index(s), count=1)
                    if NH == 2:
                        acc = _rescale_wide(acc, f_lo, f_hi)
                    else:
                        acc = _scale_in_place(acc, f_lo[:, None])
                else:
                    acc_lo, acc_hi = warpgroup_mma_wait(num_outstanding=0, deps=(acc_lo, acc_hi))
                    mbarrier.arrive(empty.index(s), count=1)
                    acc_lo = _scale_in_place(acc_lo, f_lo[:, None])
                    acc_hi = _scale_in_place(acc_hi, f_hi[:, None])
                c_lo = n_lo
                c_hi = n_hi
                it += 1
            if WIDE and NH == 2:
                acc3 = acc.reshape([BM, 2, HALF]).permute((0, 2, 1))
                acc_lo, acc_hi = acc3.split()
                acc_lo = gl.convert_layout(acc_lo, mma)
                acc_hi = gl.convert_layout(acc_hi, mma)
            elif WIDE:
                acc_lo = gl.convert_layout(acc, mma)

            tma.store_wait(0)  # this consumer's previous tile has left its buffers
            offs_e = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
            mask_e = offs_e < M
            _store_half(acc_lo, c_smem.index(BUFS * WG), out_desc, off_m, off_n, N, gate_ptr, res_ptr, offs_e, mask_e,
                        stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE)  # fmt: skip
            if NH == 2:
                if BUFS == 1:
                    tma.store_wait(0)  # the left half has been read out of the shared buffer
                _store_half(acc_hi, c_smem.index(BUFS * WG + BUFS - 1), out_desc, off_m, off_n + HALF, N, gate_ptr, res_ptr,
                            offs_e, mask_e, stride_rm, stride_gn, HAS_RESIDUAL, HAS_GATE)  # fmt: skip
        tma.store_wait(0)

    @gluon.jit
    def _fp8_block_gemm_rescaled_kernel(
        a_desc,  # (M, K) e4m3, block [64, BLOCK_K]: one box per consumer
        b_desc,  # (N, K) e4m3, block [BLOCK_N, BLOCK_K]
        out_desc,  # (M, N) bf16 / fp16, block [64, HALF_N]
        a_scale_ptr, b_scale_ptr, res_ptr, gate_ptr,
        M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk, stride_rm, stride_gn,
        HAS_RESIDUAL: gl.constexpr,
        HAS_GATE: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        GROUP: gl.constexpr,
        PRODUCER_REGS: gl.constexpr,
        CONSUMER_REGS: gl.constexpr,
        WIDE: gl.constexpr,
        SHARE_OUT: gl.constexpr,
        num_warps: gl.constexpr,
    ):  # fmt: skip
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        HALF: gl.constexpr = out_desc.block_type.shape[1]
        gl.static_assert(BM == 64)
        gl.static_assert(BK == 128)
        gl.static_assert(BN == 2 * HALF or BN == HALF)
        gl.static_assert(num_warps == 4)  # the default partition is consumer 0 (one warpgroup)

        a_smem = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES * 2, BM, BK], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [NUM_STAGES, BN, BK], b_desc.layout)
        c_smem = gl.allocate_shared_memory(
            out_desc.dtype, [2 * (1 if SHARE_OUT else BN // HALF), BM, HALF], out_desc.layout
        )  # consumer x half (SHARE_OUT: one buffer per consumer, the halves stored in turn)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(i), count=1)  # the producer's expect; TMA bytes complete it
            mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
        fence_async_shared()

        # (argument tuples spelled out: see fp8_block_gemm_sm90's kernel for why)
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        # fmt: off
        gl.warp_specialize(
            [
            (_rescale_consumer, (a_smem, b_smem, c_smem, ready, empty, out_desc, a_scale_ptr, b_scale_ptr, res_ptr,
                                 gate_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk, stride_rm,
                                 stride_gn, HAS_RESIDUAL, HAS_GATE, GROUP, WG0, WIDE)),
            (_rescale_consumer, (a_smem, b_smem, c_smem, ready, empty, out_desc, a_scale_ptr, b_scale_ptr, res_ptr,
                                 gate_ptr, M, N, K, stride_asm, stride_ask, stride_bsn, stride_bsk, stride_rm,
                                 stride_gn, HAS_RESIDUAL, HAS_GATE, GROUP, WG1, WIDE)),
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


def smem_bytes(num_stages: int, block_n: int = BLOCK_N, out_bytes: int = 2, share_out_buffer: bool = False) -> int:
    """Shared memory of the kernel: the ring (128 A rows and ``block_n`` B rows of 128 e4m3 per stage), the
    64 x 128 TMA-store buffers (one per consumer and weight block of the tile, or one per consumer with
    ``share_out_buffer``) and 2 mbarriers per stage."""
    halves = 1 if share_out_buffer else block_n // HALF_N
    return num_stages * (BLOCK_M + block_n) * BLOCK_K + 2 * halves * 64 * HALF_N * out_bytes + 16 * num_stages


def fp8_block_gemm_rescaled_sm90(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    num_stages: int = 3,
    wide: bool = True,
    block_n: int = BLOCK_N,
    share_out_buffer: bool = False,
) -> torch.Tensor:
    """``residual + gate * ((a * a_scale) @ (b * b_scale).T)`` with 1x128 (A) and 128x128 (B) block scales on
    Hopper, fast accumulation through a rescaled accumulator (module docstring): e4m3 ``a`` (M, K), ``b`` (N, K),
    both K-contiguous with 16-byte aligned rows (K a multiple of 16); fp32 ``a_scale`` (M, ceil(K/128)),
    ``b_scale`` (ceil(N/128), ceil(K/128)); ``out_dtype`` bf16 or fp16 with 16-byte aligned rows (TMA store).
    ``num_stages``: depth of the TMA ring (2 or 3 fit sm_90's shared memory at ``block_n=256``, up to 6 at 128:
    ``smem_bytes``). ``wide`` (default, 1.13x the other on the H100): one m64n256 wgmma per consumer and K step into
    one accumulator, rescaled per half through a reshape; ``wide=False``: two m64n128 wgmmas, one accumulator per
    weight block. ``block_n``: 256 (two weight blocks per tile) or 128 (one; needs ``wide``: one m64n128 wgmma;
    more tiles where M is small, but no faster on FLUX.2's shapes: probe_block_rescale runs 3-4).
    ``share_out_buffer``: the two 64 x 128 halves of each consumer's output go out in turn through one buffer,
    which frees the shared memory of a fourth ring stage at ``block_n=256``."""
    M, N, K = _block.check_block_operands(a, b, a_scale, b_scale, out_dtype, residual, gate)
    if out_dtype not in _OUT_GL:
        raise ValueError(f"fp8_block_gemm_rescaled_sm90 writes bf16 or fp16 (TMA store), got out_dtype={out_dtype}")
    if (N * out_dtype.itemsize) % 16:
        raise ValueError(
            f"the output's rows must be a multiple of 16 bytes for TMA, got N={N} x {out_dtype.itemsize} B"
        )
    if not 2 <= num_stages <= 8:
        raise ValueError(f"num_stages must be in 2..8, got {num_stages}")
    if block_n not in (128, 256):
        raise ValueError(f"block_n must be 128 or 256, got {block_n}")
    if block_n == 128 and not wide:
        raise ValueError("block_n=128 has one weight block per tile: it runs as wide=True (one accumulator)")
    smem = smem_bytes(num_stages, block_n, share_out_buffer=share_out_buffer)
    if smem > SMEM_BYTES:
        raise ValueError(f"num_stages={num_stages} with block_n={block_n} needs {smem} B of shared memory, more than "
                         f"sm_90's {SMEM_BYTES}")  # fmt: skip
    _block.check_sm90_launch("fp8_block_gemm_rescaled_sm90", a, b, a_scale, b_scale, residual, gate)
    for name, t in (("a", a), ("b", b)):
        _block._check_tma(t, name)
    return run_checked(a, b, a_scale, b_scale, out_dtype, residual, gate, num_stages=num_stages, wide=wide,
                       block_n=block_n, share_out_buffer=share_out_buffer)  # fmt: skip


def run_checked(a, b, a_scale, b_scale, out_dtype, residual, gate, *, num_stages, wide, block_n,
                share_out_buffer=False) -> torch.Tensor:  # fmt: skip
    """``fp8_block_gemm_rescaled_sm90`` for arguments already validated (``fp8_matmul.fp8_gemm``'s dispatch checks
    them before it picks this kernel): allocate the output and launch, without the per-call checks that cost
    host time on the small text GEMMs."""
    M, K = a.shape
    N = b.shape[0]
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
    return _launch(a, b, a_scale, b_scale, out, res, g, residual is not None, gate is not None, num_stages, wide,
                   block_n, share_out_buffer)  # fmt: skip


def _launch(a, b, a_scale, b_scale, out, res, g, has_res, has_gate, num_stages, wide, block_n, share_out=False):
    M, K = a.shape
    N = b.shape[0]
    ints = (M, N, K, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1), res.stride(0),
            g.stride(0))  # fmt: skip
    consts = dict(HAS_RESIDUAL=has_res, HAS_GATE=has_gate, NUM_STAGES=num_stages, GROUP=GROUP_M,
                  PRODUCER_REGS=PRODUCER_REGS, CONSUMER_REGS=CONSUMER_REGS, WIDE=bool(wide),
                  SHARE_OUT=bool(share_out))  # fmt: skip
    index = a.device.index if a.device.index is not None else torch.cuda.current_device()
    # everything the launch specializes on (as in fp8_row_gemm_sm90._launch)
    key = (index, a.stride(0), b.stride(0), out.stride(0), out.dtype, res.dtype, g.dtype, block_n, *ints,
           *consts.values(),
           *(t.data_ptr() % 16 == 0 for t in (a_scale, b_scale, res, g)))  # fmt: skip

    def make():
        e4m3 = gl.float8e4nv
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [64, BLOCK_K],
                                  gl.NVMMASharedLayout.get_default_for([64, BLOCK_K], e4m3))  # fmt: skip
        b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [block_n, BLOCK_K],
                                  gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], e4m3))  # fmt: skip
        o_layout = gl.NVMMASharedLayout.get_default_for([64, HALF_N], getattr(gl, _OUT_GL[out.dtype]))
        out_desc = TensorDescriptor(out, [M, N], [out.stride(0), 1], [64, HALF_N], o_layout)
        grid = (min(-(-M // BLOCK_M) * -(-N // block_n), _block._num_sms(index)), 1, 1)
        return grid, (a_desc, b_desc, out_desc)

    _block.launch_cached(_LAUNCHERS, key, FAST_LAUNCH, _fp8_block_gemm_rescaled_kernel, (a, b, out),
                         (a_scale, b_scale, res, g, *ints), make, consts, num_warps=4, maxnreg=MAXNREG)  # fmt: skip
    return out
