"""fp8_block_gemm_rescaled_sm90 (Gluon, Hopper): launcher validation on CPU, maths against fp8_gemm_ref on sm_90."""

import pytest
import torch

from flux2_bench.kernels import fp8_block_rescale_sm90 as R
from flux2_bench.kernels.fp8_matmul import fp8_gemm_ref

E4M3 = torch.float8_e4m3fn


def _operands(M, N, K, device="cpu", seed=0, spread=None):
    """Random e4m3 operands and block scales. ``spread``: scales log-uniform over 10**-spread .. 10**spread
    (the accumulator then changes units by up to 10**(4 spread) between K steps), else uniform in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(M, K, generator=g) * 2).clamp(-448, 448).to(E4M3)
    b = (torch.randn(N, K, generator=g) * 2).clamp(-448, 448).to(E4M3)
    kb, nb = -(-K // 128), -(-N // 128)
    if spread is None:
        sa = torch.rand(M, kb, generator=g) + 0.5  # scales differ per block: a wrong block index shows
        sb = torch.rand(nb, kb, generator=g) + 0.5
    else:
        sa = 10.0 ** ((torch.rand(M, kb, generator=g) * 2 - 1) * spread)
        sb = 10.0 ** ((torch.rand(nb, kb, generator=g) * 2 - 1) * spread)
    return a.to(device), b.to(device), sa.to(device), sb.to(device)


# --- CPU: validation (no GPU needed) ----------------------------------------------------------


def test_rejects_bad_operands_and_scales():
    a, b, sa, sb = _operands(32, 256, 256)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        R.fp8_block_gemm_rescaled_sm90(a.float(), b, sa, sb)
    with pytest.raises(ValueError, match="K mismatch"):
        R.fp8_block_gemm_rescaled_sm90(a, b[:, :128], sa, sb)
    with pytest.raises(ValueError, match=r"a_scale must have the block-scale shape \(32, 2\)"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa[:, :1], sb)
    with pytest.raises(ValueError, match=r"b_scale must have the block-scale shape \(2, 2\)"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb[:1])
    with pytest.raises(TypeError, match="float32"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa.double(), sb)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="contiguous along K"):
        R.fp8_block_gemm_rescaled_sm90(a.t().contiguous().t(), b, sa, sb)
    a2, b2, sa2, sb2 = _operands(32, 300, 256)
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        R.fp8_block_gemm_rescaled_sm90(a2, b2, sa2, sb2)  # 600-byte bf16 rows: no TMA store


def test_shared_memory_budget():
    assert R.smem_bytes(3) <= R.SMEM_BYTES < R.smem_bytes(4)  # 3 stages is the deepest ring that fits
    a, b, sa, sb = _operands(32, 256, 256)
    with pytest.raises(ValueError, match="shared memory"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, num_stages=4)
    with pytest.raises(ValueError, match="num_stages must be in 2..8"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, num_stages=1)
    assert R.smem_bytes(6, 128) <= R.SMEM_BYTES < R.smem_bytes(7, 128)
    # one output buffer per consumer frees a fourth stage at 128 x 256
    assert R.smem_bytes(4, share_out_buffer=True) <= R.SMEM_BYTES < R.smem_bytes(5, share_out_buffer=True)
    with pytest.raises(ValueError, match="shared memory"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, num_stages=5, share_out_buffer=True)
    with pytest.raises(ValueError, match="block_n must be 128 or 256"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, block_n=64)
    with pytest.raises(ValueError, match="wide=True"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, block_n=128, wide=False)


def test_rejects_cpu_tensors():
    a, b, sa, sb = _operands(32, 256, 256)
    with pytest.raises(ValueError, match="CUDA"):
        R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb)


# --- GPU (sm_90): maths ----------------------------------------------------------------------

needs_sm90 = pytest.mark.skipif(not R.is_available(), reason="needs an sm_90 GPU and triton.experimental.gluon")


def _rel_l2(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# Fast accumulation (the wgmma chain across K, as _scaled_mm(use_fast_accum=True)): test_fp8_matmul measured
# 2e-3..4e-3 rel L2 against fp32 at K = 1111 and bounds it by 6e-3; the bf16 output adds ~1.5e-3. A wrong scale
# block, half or K step errs by O(1).
BOUND = {torch.bfloat16: 8e-3, torch.float16: 7e-3}


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize(
    "M, N, K",
    # (40, 384, 640): consumer 1 has no valid row, and the last 256-column tile has no second weight block;
    # (77, 296, 1040): ragged M, N (a half tile past N) and K (a K tail). N keeps the bf16 rows 16-byte aligned
    # (the TMA store)
    [(256, 512, 384), (1000, 1112, 768), (64, 128, 128), (77, 296, 1040), (40, 384, 640), (300, 640, 4096)],
)
@pytest.mark.parametrize("wide, block_n, share", [(False, 256, False), (True, 256, False), (True, 128, False),
                                                  (True, 256, True)])  # fmt: skip
@pytest.mark.parametrize(
    "out_dtype, epilogue", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]
)
def test_matches_reference(M, N, K, out_dtype, epilogue, wide, block_n, share):
    a, b, sa, sb = _operands(M, N, K, "cuda")
    res = (torch.randn(M, N, device="cuda") * 10).to(out_dtype) if epilogue else None
    gate = torch.randn(N, device="cuda").to(torch.bfloat16) if epilogue else None
    out = R.fp8_block_gemm_rescaled_sm90(
        a, b, sa, sb, out_dtype=out_dtype, residual=res, gate=gate, wide=wide, block_n=block_n,
        num_stages=6 if block_n == 128 else 4 if share else 3, share_out_buffer=share,
    )  # fmt: skip
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32, residual=res, gate=gate)
    assert out.dtype == out_dtype and out.shape == (M, N)
    assert not out.isnan().any()
    err = _rel_l2(out, ref)
    assert err < BOUND[out_dtype], f"{M}x{N}x{K} {out_dtype} epilogue={epilogue}: rel L2 {err:.2e}"


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("spread", [3.0, 8.0])
@pytest.mark.parametrize("wide", [False, True])
def test_scales_spanning_many_decades(spread, wide):
    """Each rescale divides one step's scale by the next's: a spread of 10^8 per scale (10^32 between two steps'
    products) stays finite and as exact as uniform scales."""
    a, b, sa, sb = _operands(192, 512, 1536, "cuda", seed=1, spread=spread)
    out = R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, wide=wide)
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert _rel_l2(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("wide", [False, True])
def test_zero_scales_and_zero_blocks(wide):
    """A zero weight block (scale 0) or zero activation row-block contributes nothing and poisons nothing: the
    step scale is clamped to SCALE_FLOOR instead of dividing by 0."""
    M, N, K = 130, 512, 1024
    a, b, sa, sb = _operands(M, N, K, "cuda", seed=2)
    sb[1, 3] = 0.0  # weight block (rows 128..255, K step 3)
    b[128:256, 384:512] = 0
    sa[5, :4] = 0.0  # the first four K steps of row 5
    a[5, :512] = 0
    sa[7, 2] = 0.0  # a zero scale on non-zero data: contributes nothing in the reference either
    out = R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, wide=wide)
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32)
    assert torch.isfinite(out).all()
    assert _rel_l2(out, ref) < BOUND[torch.bfloat16]
    assert _rel_l2(out[5], ref[5]) < BOUND[torch.bfloat16]


@pytest.mark.gpu
@needs_sm90
def test_cached_launch_matches_a_fresh_one(monkeypatch):
    a, b, sa, sb = _operands(300, 640, 1024, "cuda", seed=3)
    first = R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb)
    a2, b2, sa2, sb2 = _operands(300, 640, 1024, "cuda", seed=4)
    cached = R.fp8_block_gemm_rescaled_sm90(a2, b2, sa2, sb2)  # the launcher of the first call, re-pointed
    monkeypatch.setattr(R, "FAST_LAUNCH", False)
    fresh = R.fp8_block_gemm_rescaled_sm90(a2, b2, sa2, sb2)
    assert torch.equal(cached, fresh) and not torch.equal(first, fresh)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("wide", [False, True])
def test_flux2_shape_sampled_rows(wide):
    """double.img.qkv at 1024² (4096 x 6144 x 18432): rows sampled across the grid against the reference."""
    M, N, K = 4096, 18432, 6144
    a, b, sa, sb = _operands(M, N, K, "cuda", seed=5)
    out = R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, wide=wide)
    rows = torch.tensor([0, 63, 64, 127, 2047, 4095], device="cuda")
    ref = fp8_gemm_ref(a[rows], b, sa[rows], sb, out_dtype=torch.float32)
    assert _rel_l2(out[rows], ref) < BOUND[torch.bfloat16]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("M, N, K", [(4096, 1024, 768), (512, 18432, 512), (200, 4096, 1152)])
def test_fp8_gemm_dispatch(M, N, K):
    """fp8_gemm with block scales: fast accumulation and a bf16 output run this kernel with
    ``BLOCK_RESCALE_OPTIONS`` (the same bits); ``fast_accum=False`` and fp32 outputs keep the promotion kernel
    (more accurate)."""
    from flux2_bench.kernels import fp8_matmul as F

    a, b, sa, sb = _operands(M, N, K, "cuda", seed=6)
    res = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    gate = torch.randn(N, device="cuda").to(torch.bfloat16)
    out = F.fp8_gemm(a, b, sa, sb, residual=res, gate=gate)
    opts = F.BLOCK_RESCALE_OPTIONS
    assert torch.equal(out, R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, residual=res, gate=gate, **opts))
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32, residual=res, gate=gate)
    promoted = F.fp8_gemm(a, b, sa, sb, residual=res, gate=gate, fast_accum=False)
    assert not torch.equal(promoted, out)
    assert _rel_l2(promoted, ref) < _rel_l2(out, ref) < BOUND[torch.bfloat16]
    fp32 = F.fp8_gemm(a, b, sa, sb, out_dtype=torch.float32)
    assert _rel_l2(fp32, fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32)) < 1e-3  # promoted, fp32 output


@pytest.mark.gpu
@needs_sm90
def test_shared_output_buffer_gives_the_same_bits():
    """The fourth stage and the shared output buffer change when data moves, not the maths."""
    a, b, sa, sb = _operands(1000, 1112, 1536, "cuda", seed=7)
    res = (torch.randn(1000, 1112, device="cuda") * 10).to(torch.bfloat16)
    gate = torch.randn(1112, device="cuda").to(torch.bfloat16)
    for epi in ({}, {"residual": res, "gate": gate}):
        base = R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, **epi)
        shared = R.fp8_block_gemm_rescaled_sm90(a, b, sa, sb, num_stages=4, share_out_buffer=True, **epi)
        assert torch.equal(base, shared)
