"""fp8_block_gemm_sm90 (Gluon, Hopper): launcher validation on CPU, maths against fp8_gemm_ref on sm_90."""

import gc
import weakref

import pytest
import torch

from flux2_bench.kernels import fp8_block_gemm_sm90 as G
from flux2_bench.kernels.fp8_matmul import fp8_gemm_ref

E4M3 = torch.float8_e4m3fn


def _operands(M, N, K, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(M, K, generator=g) * 2).clamp(-448, 448).to(E4M3)
    b = (torch.randn(N, K, generator=g) * 2).clamp(-448, 448).to(E4M3)
    kb, nb = -(-K // 128), -(-N // 128)
    sa = torch.rand(M, kb, generator=g) + 0.5  # scales differ per block: a wrong block index shows
    sb = torch.rand(nb, kb, generator=g) + 0.5
    return a.to(device), b.to(device), sa.to(device), sb.to(device)


# --- CPU: validation and availability (no GPU needed) ------------------------------------------


def test_cached_launcher_keeps_no_tensor():
    """``cache_launcher`` keeps the first launch's descriptors without their tensors: a cached descriptor that held
    its tensor kept that activation or output alive for the process's life (reports/h100, session 18: every
    peak of a FLUX.2 run up to 5.8 GiB higher). The template is re-pointed per call (``_rebased``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: None

    class Kernel:
        arg_names = ["a_desc", "M", "BLOCK"]

    t = torch.zeros(64, 64)
    ref = weakref.ref(t)
    cache = {}
    G.cache_launcher(
        cache, "k", Kernel, Compiled(), (1, 1, 1), 2, {"BLOCK": 64}, (TensorDescriptor.from_tensor(t, [16, 16]),)
    )
    del t
    gc.collect()
    assert ref() is None, "the cache kept the first launch's tensor alive"
    runner, desc, tail = cache["k"]
    assert tail == (64,) and list(desc.block_shape) == [16, 16] and list(desc.shape) == [64, 64]
    other = torch.ones(64, 64)
    assert G._rebased(desc, other).base is other


def test_is_available_false_off_cuda():
    assert G.is_available("cpu") is False


def test_rejects_non_fp8_and_shape_errors():
    a, b, sa, sb = _operands(32, 128, 256)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        G.fp8_block_gemm_sm90(a.float(), b, sa, sb)
    with pytest.raises(ValueError, match="K mismatch"):
        G.fp8_block_gemm_sm90(a, b[:, :128], sa, sb)
    with pytest.raises(ValueError, match=r"a_scale must have the block-scale shape \(32, 2\)"):
        G.fp8_block_gemm_sm90(a, b, sa[:, :1], sb)
    with pytest.raises(ValueError, match=r"b_scale must have the block-scale shape \(1, 2\)"):
        G.fp8_block_gemm_sm90(a, b, sa, sb.expand(2, 2))
    with pytest.raises(TypeError, match="float32"):
        G.fp8_block_gemm_sm90(a, b, sa.double(), sb)
    with pytest.raises(TypeError, match="out_dtype"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"residual must have shape \(32, 128\)"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, residual=torch.zeros(32, 64))
    with pytest.raises(ValueError, match=r"gate must have shape \(128,\)"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, gate=torch.zeros(64))
    with pytest.raises(ValueError, match="num_stages"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, num_stages=1)
    with pytest.raises(ValueError, match="num_stages"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, num_stages=7)
    with pytest.raises(ValueError, match="contiguous along K"):
        G.fp8_block_gemm_sm90(a.t().contiguous().t(), b, sa, sb)


def test_rejects_cpu_tensors():
    a, b, sa, sb = _operands(32, 128, 256)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        G.fp8_block_gemm_sm90(a, b, sa, sb)


@pytest.mark.gpu
def test_rejects_unaligned_rows_for_tma():
    if not G.is_available():
        pytest.skip("needs sm_90 and Gluon")
    a, b, sa, sb = _operands(64, 128, 264, "cuda")  # K = 264: rows of 264 B, not a multiple of 16
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        G.fp8_block_gemm_sm90(a[:, :260], b[:, :260], sa[:, :3], sb[:, :3])
    with pytest.raises(ValueError, match="16-byte aligned address"):
        G.fp8_block_gemm_sm90(a.view(-1)[1 : 1 + 64 * 256].view(64, 256), b[:, :256], sa[:, :2], sb[:, :2])


@pytest.mark.gpu
def test_refuses_other_architectures():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("needs a CUDA GPU other than sm_90")
    a, b, sa, sb = _operands(64, 128, 256, "cuda")
    with pytest.raises(RuntimeError, match=r"needs sm_90 \(Hopper\)"):
        G.fp8_block_gemm_sm90(a, b, sa, sb)


# --- GPU: maths against the fp32 reference ------------------------------------------------------

needs_sm90 = pytest.mark.skipif(not G.is_available(), reason="needs an sm_90 GPU and triton.experimental.gluon")


# Hopper's FP8 MMA keeps about 14 bits while it accumulates inside one 128-wide K block (DeepSeek-V3
# report, 3.3.2); the kernel adds each block in fp32. Bound: 2^-12 of sum |a*b*scales| (4x margin) plus
# the output rounding (bf16: 2^-8 relative). A wrong scale block or K step errs by O(sum |terms|).
MMA_REL = 2.0**-12
OUT_REL = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8}


def _check(out, ref, abs_sum, out_dtype, what):
    err = (out.float() - ref.float()).abs()
    bound = MMA_REL * abs_sum + OUT_REL[out_dtype] * ref.float().abs() + 1e-6
    bad = err > bound
    n = int(bad.sum())
    assert n == 0 and not out.isnan().any(), (
        f"{what}: {n} of {out.numel()} beyond the bound, first at {bad.nonzero()[:5].tolist()}, "
        f"max err/bound {(err / bound).max().item():.3g}, NaNs {int(out.isnan().sum())}"
    )


def _abs_sum(a, b, sa, sb, gate):
    g = gate.float().abs() if gate is not None else None
    return fp8_gemm_ref(a.float().abs().to(E4M3), b.float().abs().to(E4M3), sa, sb, out_dtype=torch.float32, gate=g)


# the schedules under test (keywords of fp8_block_gemm_sm90): two consumers, ordered (the default) or not, and
# three consumers on 192-row tiles
VARIANTS = {"ordered": {}, "unordered": dict(ordered=False), "c3": dict(consumers=3)}


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize(
    "M, N, K",
    # (40, 384, 640): the second consumer warpgroup (rows 64..127) has no valid row
    [(256, 512, 384), (1000, 1111, 768), (64, 128, 128), (77, 300, 1040), (40, 384, 640)],
)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "out_dtype, epilogue", [(torch.bfloat16, False), (torch.float32, True), (torch.bfloat16, True)]
)
def test_matches_reference(M, N, K, variant, out_dtype, epilogue):
    a, b, sa, sb = _operands(M, N, K, "cuda")
    res = (torch.randn(M, N, device="cuda") * 10).to(out_dtype) if epilogue else None
    gate = torch.randn(N, device="cuda").to(torch.bfloat16) if epilogue else None
    out = G.fp8_block_gemm_sm90(a, b, sa, sb, out_dtype=out_dtype, residual=res, gate=gate, **VARIANTS[variant])
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32, residual=res, gate=gate)
    _check(out, ref, _abs_sum(a, b, sa, sb, gate), out_dtype, f"{M}x{N}x{K} {variant} {out_dtype} ep={epilogue}")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("num_stages", [2, 3, 6])
def test_ring_depths(num_stages):
    """The ready/empty phases with other ring depths, K steps not a multiple of the depth, and more tiles than
    SMs (each persistent program walks several tiles through one ring)."""
    M, N, K = 1100, 2 * 1024 + 40, 7 * 128 + 32
    a, b, sa, sb = _operands(M, N, K, "cuda", seed=2)
    out = G.fp8_block_gemm_sm90(a, b, sa, sb, out_dtype=torch.float32, num_stages=num_stages)
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32)
    _check(out, ref, _abs_sum(a, b, sa, sb, None), torch.float32, f"num_stages={num_stages}")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("variant", ["ordered", "c3"])
def test_flux2_shape_sampled_rows(variant):
    """FLUX.2-dev double.img.qkv at 1024^2 (4096 x 6144 -> 18432); the ref on 256 sampled rows."""
    M, N, K = 4096, 18432, 6144
    a, b, sa, sb = _operands(M, N, K, "cuda", seed=1)
    out = G.fp8_block_gemm_sm90(a, b, sa, sb, out_dtype=torch.float32, **VARIANTS[variant])
    rows = torch.randperm(M, generator=torch.Generator().manual_seed(0))[:256].cuda()
    ref = fp8_gemm_ref(a[rows], b, sa[rows], sb, out_dtype=torch.float32)
    _check(out[rows], ref, _abs_sum(a[rows], b, sa[rows], sb, None), torch.float32, f"{variant} 4096x18432x6144 rows")
    rel = ((out[rows] - ref).norm() / ref.norm()).item()
    assert rel < 1e-3, f"{variant}: rel L2 error {rel:.3g} on 256 sampled rows"


def test_option_combinations_are_checked():
    a = torch.zeros(64, 128, dtype=E4M3)
    b = torch.zeros(128, 128, dtype=E4M3)
    sa, sb = torch.ones(64, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="consumers must be one of"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, consumers=4)
    with pytest.raises(ValueError, match="needs consumers=2"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, consumers=3, ordered=True)
    with pytest.raises(ValueError, match="2-byte outputs"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, tma_store=True, out_dtype=torch.float32)


def test_shared_memory_budget():
    """The ring, the TMA-store buffers and the barriers; the launcher refuses what sm_90 cannot hold."""
    assert G._ws_smem_bytes(3, 2, 0) == 3 * 256 * 128 + 72
    assert G._ws_smem_bytes(4, 3, 2) == 4 * 320 * 128 + 3 * 64 * 128 * 2 + 96
    assert G._ws_smem_bytes(4, 3, 2) <= G.SMEM_BYTES < G._ws_smem_bytes(5, 3, 2)


@pytest.mark.gpu
@needs_sm90
def test_refuses_a_ring_that_does_not_fit():
    a, b, sa, sb = _operands(256, 256, 256, "cuda")
    with pytest.raises(ValueError, match="shared memory"):
        G.fp8_block_gemm_sm90(a, b, sa, sb, consumers=3, tma_store=True, num_stages=6)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize(
    "kw",
    [dict(ordered=True), dict(ordered=True, tma_store=True), dict(consumers=3), dict(consumers=3, tma_store=True)],
    ids=["ordered", "ordered+tma", "c3", "c3+tma"],
)
@pytest.mark.parametrize(
    "M, N, K, num_stages",
    [(1000, 1111, 768, 4), (40, 384, 640, 3), (1100, 2 * 1024 + 40, 7 * 128 + 32, 3), (300, 640, 1040, 2)],
)
def test_schedules_are_bit_identical(kw, M, N, K, num_stages):
    """The wgmma issue order, three consumers (192-row tiles) and the TMA-store epilogue change who computes a row
    and how it leaves, not the fp32 operations on it: bf16 outputs (ragged M, N, K, with and without the gated
    residual) must match the unordered two-consumer kernel bit for bit."""
    a, b, sa, sb = _operands(M, N, K, "cuda", seed=6)
    res = (torch.randn(M, N, device="cuda") * 10).to(torch.bfloat16)
    gate = torch.randn(N, device="cuda").to(torch.bfloat16)
    for epi in ({}, {"residual": res, "gate": gate}):
        base = G.fp8_block_gemm_sm90(a, b, sa, sb, num_stages=num_stages, ordered=False, **epi)
        out = G.fp8_block_gemm_sm90(a, b, sa, sb, num_stages=num_stages, **kw, **epi)
        assert torch.equal(out, base), f"max |diff| {(out.float() - base.float()).abs().max().item():.3g}"
    ref = fp8_gemm_ref(a, b, sa, sb, out_dtype=torch.float32)
    out = G.fp8_block_gemm_sm90(a, b, sa, sb, **kw)
    _check(out, ref, _abs_sum(a, b, sa, sb, None), torch.bfloat16, str(kw))


@pytest.mark.gpu
@needs_sm90
def test_cached_launch_matches_a_fresh_one(monkeypatch):
    """After the first launch of a specialization the kernel is launched through its cached
    launcher with the first launch's TMA descriptors re-pointed: other tensors of the same shape must
    give the bits of a launch through Gluon's JIT path."""
    G._WS_LAUNCHERS.clear()
    M, N, K = 700, 1024 + 40, 1040
    for seed in (4, 5):
        a, b, sa, sb = _operands(M, N, K, "cuda", seed=seed)
        res = (torch.randn(M, N, device="cuda") * 10).to(torch.bfloat16)
        gate = torch.randn(N, device="cuda").to(torch.bfloat16)
        kw = dict(out_dtype=torch.float32, residual=res, gate=gate)
        fast = G.fp8_block_gemm_sm90(a, b, sa, sb, **kw)
        monkeypatch.setattr(G, "FAST_LAUNCH", False)
        fresh = G.fp8_block_gemm_sm90(a, b, sa, sb, **kw)
        monkeypatch.setattr(G, "FAST_LAUNCH", True)
        assert torch.equal(fast, fresh), f"seed {seed}: max |diff| {(fast - fresh).abs().max().item():.3g}"
    assert len(G._WS_LAUNCHERS) == 1, "both calls should share one cached specialization"
