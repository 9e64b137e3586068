"""fp8_row_gemm_sm90 (Gluon, Hopper, warp-specialized): launcher validation on CPU, maths against
fp8_gemm_ref on sm_90 for both schedules, ragged shapes, per-tensor scales and the gated residual."""

import pytest
import torch

from flux2_bench.kernels import fp8_row_gemm_sm90 as R
from flux2_bench.kernels.fp8_matmul import fp8_gemm_ref

E4M3 = torch.float8_e4m3fn


def _operands(M, N, K, device="cpu", seed=0, per_tensor=False):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(M, K, generator=g) * 2).clamp(-448, 448).to(E4M3)
    b = (torch.randn(N, K, generator=g) * 2).clamp(-448, 448).to(E4M3)
    if per_tensor:
        sa, sb = torch.tensor(0.75), torch.tensor(1.25)
    else:  # scales differ per row / column: a wrong row or column index shows
        sa, sb = torch.rand(M, 1, generator=g) + 0.5, torch.rand(1, N, generator=g) + 0.5
    return a.to(device), b.to(device), sa.to(device), sb.to(device)


# --- CPU: validation (no GPU needed) -------------------------------------------------------------


def test_rejects_bad_arguments():
    a, b, sa, sb = _operands(32, 128, 256)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        R.fp8_row_gemm_sm90(a.float(), b, sa, sb)
    with pytest.raises(ValueError, match="K mismatch"):
        R.fp8_row_gemm_sm90(a, b[:, :128], sa, sb)
    with pytest.raises(ValueError, match=r"a_scale must be one element \(per-tensor\) or of shape \(32,\)"):
        R.fp8_row_gemm_sm90(a, b, sa[:16], sb)
    with pytest.raises(ValueError, match=r"b_scale must be one element"):
        R.fp8_row_gemm_sm90(a, b, sa, sb[:, :64])
    with pytest.raises(TypeError, match="float32"):
        R.fp8_row_gemm_sm90(a, b, sa.double(), sb)
    with pytest.raises(ValueError, match="writes bf16 or fp16"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, out_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"residual must have shape \(32, 128\)"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, residual=torch.zeros(32, 64))
    with pytest.raises(ValueError, match="block_n must be 128 or 256"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, block_n=64)
    with pytest.raises(ValueError, match="pingpong tiles are 128 x 128"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, pingpong=True, block_n=256)
    with pytest.raises(ValueError, match="epilogue_subtile is for the cooperative schedule"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, pingpong=True, block_n=128, epilogue_subtile=True)
    with pytest.raises(ValueError, match="num_stages must be in 2..8"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, num_stages=1)
    with pytest.raises(ValueError, match="shared memory"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, block_n=256, num_stages=4)
    with pytest.raises(ValueError, match="shared memory"):
        R.fp8_row_gemm_sm90(a, b, sa, sb, block_n=256, num_stages=5, epilogue_subtile=True)
    with pytest.raises(ValueError, match="contiguous along K"):
        R.fp8_row_gemm_sm90(a.t().contiguous().t(), b, sa, sb)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        R.fp8_row_gemm_sm90(a, b, sa, sb)


def test_shared_memory_budget():
    """The configurations the benchmark runs fit sm_90's 227 KB; one more stage of each does not."""
    assert R.smem_bytes(3, 256, False) <= R.SMEM_BYTES < R.smem_bytes(4, 256, False)
    assert R.smem_bytes(5, 128, True) <= R.SMEM_BYTES < R.smem_bytes(6, 128, True)
    assert R.smem_bytes(6, 128, False) <= R.SMEM_BYTES < R.smem_bytes(7, 128, False)
    # the half-width output buffer frees a fourth stage at 128 x 256, with room for the prefetched scales
    assert (
        R.smem_bytes(4, 256, False, subtile=True, prefetch=True)
        <= R.SMEM_BYTES
        < R.smem_bytes(5, 256, False, subtile=True)
    )


# --- GPU: maths against the fp32 reference ------------------------------------------------------

needs_sm90 = pytest.mark.skipif(not R.is_available(), reason="needs an sm_90 GPU and triton.experimental.gluon")

# Fast accumulation: the FP8 MMA adds its products into the fp32 accumulator with ~14 bits kept, over the
# whole K (no promotion). Bound: 2^-10 of sum |a*b*scales| (loose by ~16x for these K) plus the bf16 output
# rounding (2^-8 relative). A wrong row / column scale, tile or K step errs by O(sum |terms|).
MMA_REL = 2.0**-10
OUT_REL = 2.0**-8


def _check(out, a, b, sa, sb, res, gate, what):
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32, residual=res, gate=gate)
    g = gate.float().abs() if gate is not None else None
    abs_sum = fp8_gemm_ref(a.float().abs().to(E4M3), b.float().abs().to(E4M3), sa, sb, out_dtype=torch.float32, gate=g)
    err = (out.float() - ref).abs()
    bound = MMA_REL * abs_sum + OUT_REL * ref.abs() + 1e-6
    bad = err > bound
    assert int(bad.sum()) == 0 and not out.isnan().any(), (
        f"{what}: {int(bad.sum())} of {out.numel()} beyond the bound, first at {bad.nonzero()[:5].tolist()}, "
        f"max err/bound {(err / bound).max().item():.3g}"
    )


SCHEDULES = {
    "coop_bn256_s3": dict(block_n=256, num_stages=3),
    "coop_bn128_s6": dict(block_n=128, num_stages=6),
    "coop_bn256_s3_pre": dict(block_n=256, num_stages=3, prefetch_scales=True),
    "coop_bn256_s4_sub_pre": dict(block_n=256, num_stages=4, epilogue_subtile=True, prefetch_scales=True),
    "coop_bn128_s6_sub": dict(block_n=128, num_stages=6, epilogue_subtile=True),
    "pingpong_s5": dict(pingpong=True, block_n=128, num_stages=5),
    "pingpong_s2": dict(pingpong=True, block_n=128, num_stages=2),
}


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize(
    "M, N, K",
    # (40, 384, 640): the second consumer (cooperative: rows 64..127) has no valid row; (300, 136, 1040): one
    # N tile, ping-pong consumer 1 idle on 3 of the programs; (1000, 1112, 784): ragged M, N and K tails
    [(256, 512, 384), (1000, 1112, 784), (40, 384, 640), (300, 136, 1040), (2048, 1536, 2048)],
)
@pytest.mark.parametrize("epilogue", [False, True])
def test_matches_reference(schedule, M, N, K, epilogue):
    a, b, sa, sb = _operands(M, N, K, "cuda", seed=M + N)
    res = (torch.randn(M, N, device="cuda") * 10).to(torch.bfloat16) if epilogue else None
    gate = torch.randn(N, device="cuda").to(torch.bfloat16) if epilogue else None
    out = R.fp8_row_gemm_sm90(a, b, sa, sb, residual=res, gate=gate, **SCHEDULES[schedule])
    _check(out, a, b, sa, sb, res, gate, f"{schedule} {M}x{N}x{K} ep={epilogue}")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("schedule", ["coop_bn256_s3", "pingpong_s5"])
def test_per_tensor_scales_and_fp16(schedule):
    a, b, sa, sb = _operands(1000, 1112, 784, "cuda", per_tensor=True)
    out = R.fp8_row_gemm_sm90(a, b, sa, sb, out_dtype=torch.float16, **SCHEDULES[schedule])
    assert out.dtype == torch.float16
    _check(out, a, b, sa, sb, None, None, schedule)
    # (N,) and (M,) scale vectors read like (1, N) and (M, 1)
    a, b, sa, sb = _operands(300, 256, 512, "cuda", seed=3)
    out = R.fp8_row_gemm_sm90(a, b, sa.reshape(-1), sb.reshape(-1), **SCHEDULES[schedule])
    _check(out, a, b, sa, sb, None, None, schedule + " vector scales")


@pytest.mark.gpu
@needs_sm90
def test_schedules_are_bit_identical():
    """The schedules change which warpgroup computes a tile and its width, not the order of the wgmma
    chain over K nor the epilogue: their bf16 outputs must agree bit for bit."""
    a, b, sa, sb = _operands(1000, 1112, 784, "cuda", seed=9)
    res = (torch.randn(1000, 1112, device="cuda") * 10).to(torch.bfloat16)
    gate = torch.randn(1112, device="cuda").to(torch.bfloat16)
    for epi in ({}, {"residual": res, "gate": gate}):
        outs = {s: R.fp8_row_gemm_sm90(a, b, sa, sb, **kw, **epi) for s, kw in SCHEDULES.items()}
        base = outs.pop("coop_bn256_s3")
        for s, o in outs.items():
            assert torch.equal(o, base), f"{s}: max |diff| {(o.float() - base.float()).abs().max().item():.3g}"


@pytest.mark.gpu
@needs_sm90
def test_cached_launch_matches_a_fresh_one(monkeypatch):
    """After the first launch of a specialization the cached launcher re-points the first launch's TMA
    descriptors: other tensors of the same shape must give the bits of a launch through Gluon's JIT path."""
    R._LAUNCHERS.clear()
    for seed in (4, 5):
        a, b, sa, sb = _operands(700, 1064, 1040, "cuda", seed=seed)
        fast = R.fp8_row_gemm_sm90(a, b, sa, sb, pingpong=True, block_n=128, num_stages=5)
        monkeypatch.setattr(R, "FAST_LAUNCH", False)
        fresh = R.fp8_row_gemm_sm90(a, b, sa, sb, pingpong=True, block_n=128, num_stages=5)
        monkeypatch.setattr(R, "FAST_LAUNCH", True)
        assert torch.equal(fast, fresh)
    assert len(R._LAUNCHERS) == 1, "both calls should share one cached specialization"
