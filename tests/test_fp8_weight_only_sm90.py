"""fp8_weight_only_sm90 (Gluon, Hopper, warp-specialized, e4m3 weights decoded in registers): launcher
validation on CPU; on sm_90 the maths against fp8_weight_only_linear_ref for every scale granularity, ragged
shapes, the gated residual, fp16 output, bit equality with the Triton fused kernel and the cached launch."""

import pytest
import torch

from flux2_bench.kernels import fp8_matmul as F
from flux2_bench.kernels import fp8_weight_only_sm90 as W

E4M3 = torch.float8_e4m3fn


def _operands(M, N, K, mode="row", device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 64).clamp(-448, 448).to(E4M3)  # normals and subnormals of e4m3
    if mode == "tensor":
        s = torch.tensor(0.01)
    elif mode == "row":  # differs per output channel: a wrong row index shows
        s = torch.rand(N, generator=g) * 0.01 + 0.005
    else:  # 128 x 128 blocks
        s = torch.rand(-(-N // 128), -(-K // 128), generator=g) * 0.01 + 0.005
    return x.to(device), w.to(device), s.to(device)


# --- CPU: validation (no GPU needed) -------------------------------------------------------------


def test_rejects_bad_arguments():
    x, w, s = _operands(32, 128, 256)
    with pytest.raises(TypeError, match="x must be a 2-D bf16"):
        W.fp8_weight_only_sm90(x.half(), w, s)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        W.fp8_weight_only_sm90(x, w.float(), s)
    with pytest.raises(ValueError, match="K mismatch"):
        W.fp8_weight_only_sm90(x, w[:, :128], s)
    with pytest.raises(ValueError, match="contiguous along K"):
        W.fp8_weight_only_sm90(x.t().contiguous().t(), w, s)
    with pytest.raises(TypeError, match="w_scale must be a float32"):
        W.fp8_weight_only_sm90(x, w, s.double())
    with pytest.raises(ValueError, match="w_scale shape"):
        W.fp8_weight_only_sm90(x, w, s[:64])
    with pytest.raises(ValueError, match="writes bf16 or fp16"):
        W.fp8_weight_only_sm90(x, w, s, out_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"residual must have shape \(32, 128\)"):
        W.fp8_weight_only_sm90(x, w, s, residual=torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="residual must be in out_dtype"):
        W.fp8_weight_only_sm90(x, w, s, residual=torch.zeros(32, 128))
    with pytest.raises(ValueError, match="block_t must be 128 or 256"):
        W.fp8_weight_only_sm90(x, w, s, block_t=64)
    with pytest.raises(ValueError, match="num_stages must be in 2..8"):
        W.fp8_weight_only_sm90(x, w, s, num_stages=1)
    with pytest.raises(ValueError, match="shared memory"):
        W.fp8_weight_only_sm90(x, w, s, block_t=256, num_stages=5)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        W.fp8_weight_only_sm90(x, w, s)


def test_shared_memory_budget():
    """The default configurations fit sm_90's 227 KB; 256-token tiles fit 4 stages, not 5."""
    for M in (512, 4096):
        bt, st = W.default_config(M)
        assert W.smem_bytes(st, bt) <= W.SMEM_BYTES
    assert W.smem_bytes(8, 128) <= W.SMEM_BYTES
    assert W.smem_bytes(4, 256) <= W.SMEM_BYTES < W.smem_bytes(5, 256)


def _sk_model(M, N, K, block_t, grid):
    """The stream-K split as the kernel computes it (``_sk_share``, ``_sk_owner`` and the slot formulas of
    ``_wo_sk_consumer``), in Python: per program its segments as (tile row, tile, k_lo, k_hi, slot)."""
    lanes, tiles_w, k_tiles = -(-M // block_t), -(-N // (2 * W.ROWS)), -(-K // W.BLOCK_K)
    lane, work = grid // lanes, tiles_w * k_tiles
    segs = {}
    for pid in range(grid):
        pid_t, j = pid % lanes, pid // lanes
        first, end = j * work // lane, (j + 1) * work // lane
        g, out = first, []
        while g < end:
            pid_w, k_lo = divmod(g, k_tiles)
            k_hi = min(k_tiles, k_lo + end - g)
            out.append((pid_t, pid_w, k_lo, k_hi, 2 * pid + (g != first)))
            g += k_hi - k_lo
        segs[pid] = out
    return segs, lanes, lane, work, k_tiles


@pytest.mark.parametrize(
    "M, N, K, block_t",
    [(512, 6144, 6144, 256), (512, 18432, 6144, 256), (512, 36864, 6144, 256), (512, 6144, 18432, 256),
     (300, 136, 1040, 256), (40, 384, 640, 128), (1, 4096, 3072, 256), (1000, 1112, 784, 128)],
)  # fmt: skip
def test_stream_k_split(M, N, K, block_t):
    """Every (token tile, weight tile, K step) falls in exactly one program's share, no share is empty, at most
    two segments per program are partial (its first and last: two workspace slots), and for every split tile
    the programs the fixup sums (``_sk_owner`` of the tile's first and last step, slot by the kernel's formula)
    are exactly those that stored a partial of it."""
    grid = W.stream_k_grid(M, N, K, block_t, num_sms=132)
    assert grid is not None and grid <= 132
    segs, lanes, lane, work, k_tiles = _sk_model(M, N, K, block_t, grid)
    seen = {}
    stored = {}
    for pid, ss in segs.items():
        assert ss, f"program {pid} has an empty share"
        partial = [s for s in ss if not (s[2] == 0 and s[3] == k_tiles)]
        assert all(s in (ss[0], ss[-1]) for s in partial)
        for pid_t, pid_w, k_lo, k_hi, slot in ss:
            for k in range(k_lo, k_hi):
                assert (pid_t, pid_w, k) not in seen
                seen[(pid_t, pid_w, k)] = pid
            if (pid_t, pid_w, k_lo, k_hi, slot) in partial:
                stored.setdefault((pid_t, pid_w), set()).add(slot)
    assert len(seen) == lanes * work
    owner = lambda it: ((it + 1) * lane + work - 1) // work - 1  # noqa: E731 (the kernel's _sk_owner)
    for (pid_t, pid_w), slots in stored.items():
        t0 = pid_w * k_tiles
        summed = {
            2 * (jj * lanes + pid_t) + (jj * work // lane < t0) for jj in range(owner(t0), owner(t0 + k_tiles - 1) + 1)
        }
        assert summed == slots, (pid_t, pid_w)
        assert len(slots) >= 2


def test_stream_k_grid_and_choice():
    """One lane per token tile; no split with more token tiles than SMs; the default takes stream-K where whole
    tiles fill less than SK_MIN_FILL of the data-parallel waves and shares are at least SK_MIN_STEPS K steps: three
    of the four M = 512 text GEMMs of FLUX.2-dev on 132 SMs, not the M = 4096 image GEMMs."""
    assert W.stream_k_grid(512, 6144, 6144, 256, 132) == 132
    assert W.stream_k_grid(768, 6144, 6144, 256, 132) == 132
    assert W.stream_k_grid(1000, 6144, 6144, 128, 132) == 128  # 8 lanes of 16
    assert W.stream_k_grid(40, 384, 640, 256, 132) == 30  # 3 x 10 iterations: one each
    assert W.stream_k_grid(133 * 128, 256, 64, 128, 132) is None
    for N, K in ((18432, 6144), (36864, 6144), (6144, 18432)):
        assert W.use_stream_k(512, N, K, 256, 132), (N, K)
        assert not W.use_stream_k(4096, N, K, 256, 132), (N, K)
    # txt.proj: 96 tiles (fill 0.73) but 70 K steps per program, too short to pay for the fixup
    assert not W.use_stream_k(512, 6144, 6144, 256, 132)


# --- GPU: maths against the reference -------------------------------------------------------------

needs_sm90 = pytest.mark.skipif(not W.is_available(), reason="needs an sm_90 GPU and triton.experimental.gluon")

# Exact products of bf16 x and exact e4m3 weights, summed in fp32 by the MMA (about 2^-23 relative per add of
# sum |x w|; bounded loosely here), then one rounding to bf16 (2^-8 relative). Block scales: the weights are
# rounded to bf16 after scaling, as the reference does. A wrong row, column, tile or K step errs by O(sum |terms|).
SUM_REL = 2.0**-14
OUT_REL = 2.0**-8


def _check(out, x, w, s, res, gate, what):
    ref = F.fp8_weight_only_linear_ref(x, w, s, out_dtype=torch.float32, residual=res, gate=gate)
    g = gate.float().abs() if gate is not None else None
    abs_sum = F.fp8_weight_only_linear_ref(x.abs(), w.float().abs().to(E4M3), s, out_dtype=torch.float32, gate=g)
    err = (out.float() - ref).abs()
    bound = SUM_REL * abs_sum + OUT_REL * ref.abs() + 1e-6
    bad = err > bound
    assert int(bad.sum()) == 0 and not out.isnan().any(), (
        f"{what}: {int(bad.sum())} of {out.numel()} beyond the bound, first at {bad.nonzero()[:5].tolist()}, "
        f"max err/bound {(err / bound).max().item():.3g}"
    )


CONFIGS = {"bt256_s4": dict(block_t=256, num_stages=4, stream_k=False),
           "bt128_s6": dict(block_t=128, num_stages=6, stream_k=False),
           "bt128_s2": dict(block_t=128, num_stages=2, stream_k=False),
           "bt256_s4_sk": dict(block_t=256, num_stages=4, stream_k=True),
           "bt128_s3_sk": dict(block_t=128, num_stages=3, stream_k=True)}  # fmt: skip
DATA_PARALLEL = [k for k in CONFIGS if not CONFIGS[k]["stream_k"]]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["tensor", "row", "block"])
@pytest.mark.parametrize(
    "M, N, K",
    # (40, 384, 640): most token rows of the tile empty; (300, 136, 1040): consumer 1 has 8 valid rows, 17 K
    # steps (odd); (1000, 1112, 784): ragged M, N and K tails; (512, 2048, 6144): the text GEMMs' M and K
    [(256, 512, 384), (1000, 1112, 784), (40, 384, 640), (300, 136, 1040), (512, 2048, 6144)],
)
def test_matches_reference(config, mode, M, N, K):
    x, w, s = _operands(M, N, K, mode, "cuda", seed=M + N)
    out = W.fp8_weight_only_sm90(x, w, s, **CONFIGS[config])
    _check(out, x, w, s, None, None, f"{config} {mode} {M}x{N}x{K}")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("config", ["bt256_s4", "bt128_s6", "bt256_s4_sk"])
def test_gated_residual_and_fp16(config):
    x, w, s = _operands(1000, 1112, 784, "row", "cuda", seed=2)
    res = (torch.randn(1000, 1112, device="cuda") * 10).to(torch.bfloat16)
    gate = torch.randn(1112, device="cuda").to(torch.bfloat16)
    out = W.fp8_weight_only_sm90(x, w, s, residual=res, gate=gate, **CONFIGS[config])
    _check(out, x, w, s, res, gate, f"{config} gated residual")
    out = W.fp8_weight_only_sm90(x, w, s, out_dtype=torch.float16, residual=res.half(), **CONFIGS[config])
    assert out.dtype == torch.float16
    _check(out, x, w, s, res.half(), None, f"{config} fp16")
    out = W.fp8_weight_only_sm90(x, w.view(torch.uint8), s.reshape(-1, 1), **CONFIGS[config])  # uint8, (N, 1)
    _check(out, x, w, s, None, None, f"{config} uint8 weights")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("decode", [0, 1])
def test_decodes_every_e4m3_value(decode, monkeypatch):
    """All 254 finite e4m3 codes (subnormals, both zeros) through either weight decode (uint8 elements or
    uint16 pairs): with x the identity and a unit scale, out[m, n] = w[n, m] exactly. Each code sits at both
    byte positions of a pair and in every row class of the A fragment (rows r and r + 8, pairs p and p + 4)."""
    monkeypatch.setattr(W, "_DECODE", decode)
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[~torch.isnan(codes.view(E4M3).float())]
    idx = torch.arange(128 * 256).reshape(128, 256)
    w = codes[(idx * 7 + idx // 256) % codes.numel()].view(E4M3).cuda()  # N = 128, K = 256
    x = torch.eye(256, dtype=torch.bfloat16, device="cuda")
    for cfg in (CONFIGS["bt256_s4"], CONFIGS["bt128_s6"]):
        out = W.fp8_weight_only_sm90(x, w, torch.tensor(1.0, device="cuda"), **cfg)
        assert torch.equal(out.T.float(), w.float()), f"decode {decode} {cfg}: {(out.T.float() != w.float()).sum()}"


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("decode", [0, 1])
@pytest.mark.parametrize("mode", ["row", "block"])
def test_bits_equal_the_triton_fused_kernel(decode, mode, monkeypatch):
    """Same decode, the same wgmma K order (k16 steps from 0 up, one fp32 accumulator) and the same epilogue
    order as fp8_matmul's fused weight-only kernel: the bf16 outputs agree bit for bit. With the gated residual
    the two compilers may contract ``acc * gate + residual`` into an FMA or not (one fp32 rounding apart), so
    there the outputs may differ by one bf16 step in a few elements (H100, run 1: max 0.125 at |out| ~ 30)."""
    x, w, s = _operands(512, 1536, 2048, mode, "cuda", seed=7)
    res = (torch.randn(512, 1536, device="cuda") * 10).to(torch.bfloat16)
    gate = torch.randn(1536, device="cuda").to(torch.bfloat16)
    monkeypatch.setattr(F, "WO_DEQUANT_MIN_M", 1 << 62)
    monkeypatch.setattr(F, "WO_SM90", False)
    monkeypatch.setattr(W, "_DECODE", decode)
    for epi in ({}, {"residual": res, "gate": gate}):
        triton_out = F.fp8_weight_only_linear(x, w, s, **epi)
        for cfg in (CONFIGS[k] for k in DATA_PARALLEL):
            ours = W.fp8_weight_only_sm90(x, w, s, **cfg, **epi)
            diff = (ours.float() - triton_out.float()).abs().max().item()
            if not epi:
                assert torch.equal(ours, triton_out), f"{mode} {cfg}: max |diff| {diff:.3g}"
                continue
            # one bf16 step: the spacing of bf16 values at |out| (2^(exponent - 7))
            step = torch.exp2(torch.floor(torch.log2(triton_out.float().abs().clamp(min=1e-30))) - 7)
            far = (ours.float() - triton_out.float()).abs() > step
            near = int((ours != triton_out).sum())
            assert not far.any(), f"{mode} {cfg} gated residual: {int(far.sum())} beyond one bf16 step"
            assert near <= ours.numel() // 100, f"{mode} {cfg} gated residual: {near} of {ours.numel()} differ"


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("stream_k", [False, True])
def test_cached_launch_matches_a_fresh_one(stream_k, monkeypatch):
    """After the first launch of a specialization the cached launcher re-points the first launch's TMA
    descriptors: other tensors of the same shape must give the bits of a launch through Gluon's JIT path."""
    W._LAUNCHERS.clear()
    for seed in (4, 5):
        x, w, s = _operands(700, 1064, 1040, "row", "cuda", seed=seed)
        res = torch.randn(700, 1064, device="cuda").to(torch.bfloat16)
        fast = W.fp8_weight_only_sm90(x, w, s, residual=res, stream_k=stream_k)
        monkeypatch.setattr(W, "FAST_LAUNCH", False)
        fresh = W.fp8_weight_only_sm90(x, w, s, residual=res, stream_k=stream_k)
        monkeypatch.setattr(W, "FAST_LAUNCH", True)
        assert torch.equal(fast, fresh)
    assert len(W._LAUNCHERS) == 1, "both calls should share one cached specialization"


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("M, N, K", [(512, 6144, 6144), (300, 136, 1040), (1, 4096, 3072)])
def test_stream_k_is_deterministic_and_resets_its_counters(M, N, K):
    """The last program to reach a split tile sums the partials in program order whoever arrives last, and zeroes
    the tile's counter: repeated launches give the same bits, and leave every counter at zero (a counter left
    non-zero would skip or repeat the next launch's fixup). (300, 136, 1040): one K step per program, 17
    programs per tile; (1, 4096, 3072): one token."""
    x, w, s = _operands(M, N, K, "row", "cuda", seed=11)
    res = torch.randn(M, N, device="cuda").to(torch.bfloat16)
    gate = torch.randn(N, device="cuda").to(torch.bfloat16)
    first = W.fp8_weight_only_sm90(x, w, s, residual=res, gate=gate, stream_k=True)
    _check(first, x, w, s, res, gate, f"stream-K {M}x{N}x{K}")
    for _ in range(3):
        assert torch.equal(W.fp8_weight_only_sm90(x, w, s, residual=res, gate=gate, stream_k=True), first)
    _, cnt = W._stream_k_buffers(x.device)
    torch.cuda.synchronize()
    assert int(cnt.count_nonzero()) == 0


@pytest.mark.gpu
@needs_sm90
def test_stream_k_refused_where_there_is_no_split():
    """More token tiles than SMs: no lane per token tile, so stream-K cannot be asked for (the default then
    runs data-parallel)."""
    M = (W._block._num_sms(torch.cuda.current_device()) + 1) * 128
    x, w, s = _operands(M, 128, 64, "row", "cuda")
    with pytest.raises(ValueError, match="no stream-K split"):
        W.fp8_weight_only_sm90(x, w, s, block_t=128, stream_k=True)
    _check(W.fp8_weight_only_sm90(x, w, s, block_t=128), x, w, s, None, None, "data-parallel fallback")


@pytest.mark.gpu
@needs_sm90
def test_library_dispatch_runs_the_sm90_kernel(monkeypatch):
    """fp8_weight_only_linear on sm_90 with bf16 x takes this kernel (WO_SM90) where it applies, and falls back
    to the Triton kernel where it does not (fp16 x, a residual in another dtype)."""
    calls = []
    real = W.fp8_weight_only_sm90
    monkeypatch.setattr(W, "fp8_weight_only_sm90", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, s = _operands(512, 1024, 768, "row", "cuda", seed=1)
    out = F.fp8_weight_only_linear(x, w, s)
    assert calls == [1]
    _check(out, x, w, s, None, None, "dispatch")
    F.fp8_weight_only_linear(x.half(), w, s)
    F.fp8_weight_only_linear(x, w, s, residual=torch.zeros(512, 1024, device="cuda"))
    assert calls == [1]
    # large M too (from run 6 on: no dequantize + cuBLAS on sm_90), as a 3-D activation
    x, w, s = _operands(4352, 1024, 768, "row", "cuda", seed=3)
    out = F.fp8_weight_only_linear(x.reshape(2, 2176, 768), w, s)
    assert calls == [1, 1] and out.shape == (2, 2176, 1024)
    _check(out.reshape(4352, 1024), x, w, s, None, None, "dispatch, M = 4352")
