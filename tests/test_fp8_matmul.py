"""kernels/fp8_matmul.py against its pure-torch references.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); the GPU tests
(`pytest -m gpu`) repeat the checks on hardware, where the fp8 cast is the hardware's own.
"""

import math

import pytest
import torch

from flux2_bench.kernels import fp8_matmul as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# aligned, odd (K not a multiple of 16), "+17" and multi-block (K and N spanning several 128 blocks)
SHAPES = [(64, 64, 64), (5, 123, 123), (81, 145, 81), (33, 273, 145)]  # (M, K, N)
GRANULARITIES = ["tensor", "row", "block"]


def assert_close(out, ref, atol, rtol, what=""):
    """allclose that says how many elements differ, where, and whether there are NaNs."""
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan = torch.isnan(out) & ~torch.isnan(ref)
    bad = ((out - ref).abs() > atol + rtol * ref.abs()) | nan
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        vals = [(tuple(i), out[tuple(i)].item(), ref[tuple(i)].item()) for i in idx]
        pytest.fail(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol:.3g}, rtol={rtol:.3g}), "
            f"{int(nan.sum())} NaN; first (index, out, ref): {vals}"
        )


def assert_bits_equal(q, ref, what=""):
    qb, rb = q.view(torch.uint8).cpu(), ref.view(torch.uint8).cpu()
    bad = qb != rb
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        vals = [(tuple(i), q.float().cpu()[tuple(i)].item(), ref.float().cpu()[tuple(i)].item()) for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())}/{bad.numel()} fp8 values differ; first (index, out, ref): {vals}")


def sqnr_db(x, ref):
    x, ref = x.float(), ref.float()
    return (10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum())).item()


def make_weight(N, K, granularity, seed=1):
    """e4m3 weights (N, K) and their fp32 scales in the layout `granularity` asks for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    if granularity == "tensor":
        s = (w.abs().amax() * (1.0 / F.FP8_MAX)).reshape(())
        q = (w / s).clamp(-F.FP8_MAX, F.FP8_MAX).to(torch.float8_e4m3fn)
    elif granularity == "row":
        q, s = F.quantize_fp8_ref(w, "row")
        s = s.reshape(N)
    else:
        nb, kb = math.ceil(N / 128), math.ceil(K / 128)
        wp = torch.nn.functional.pad(w, (0, kb * 128 - K, 0, nb * 128 - N))
        s = wp.reshape(nb, 128, kb, 128).abs().amax(dim=(1, 3)).clamp(min=F.AMAX_EPS) * (1.0 / F.FP8_MAX)
        q = (w / F._expand_blocks(s, N, K, 128)).clamp(-F.FP8_MAX, F.FP8_MAX).to(torch.float8_e4m3fn)
    return w.to(DEV), q.to(DEV), s.to(DEV)


def act(M, K, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2
    x[:, :7] *= 30  # a few outlier channels, as FLUX.2 activations have
    return x.to(torch.bfloat16).to(DEV)


# ---------------------------------------------------------------------------------------------
# quantize_fp8


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_quantize_matches_ref_bit_exact(M, K, N, granularity):
    x = act(M, K)
    scale = torch.tensor(0.05, device=DEV) if granularity == "tensor" else None  # saturates the outliers
    q, s = F.quantize_fp8(x, granularity, scale)
    q_ref, s_ref = F.quantize_fp8_ref(x, granularity, scale)
    # scales are computed with the same IEEE operations: exact
    assert s.shape == s_ref.shape and torch.equal(s.cpu(), s_ref.cpu()), f"scales differ: {s} vs {s_ref}"
    # values: exact (interpreter: kernel rounds in fp32 first; GPU: cvt.rn.satfinite)
    assert_bits_equal(q, q_ref, f"quantize_fp8 {granularity} {M}x{K}")


def test_quantize_rounding_saturation_subnormals():
    """Every e4m3 value, every tie between neighbours, values past 448 and in the subnormal range."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[~torch.isnan(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2  # exact ties: round to even
    extra = torch.tensor([448.5, 464.0, 500.0, 1e6, -1e6, 2.0**-10, 3 * 2.0**-11, 1e-30])
    x = torch.cat([vals, mids, mids.nextafter(torch.tensor(1e9)), extra]).to(DEV)
    x = x.reshape(1, -1)
    q, _ = F.quantize_fp8(x, "tensor", torch.tensor(1.0, device=DEV))
    assert_bits_equal(q, x.clamp(-448, 448).to(torch.float8_e4m3fn), "rounding")
    assert not torch.isnan(q.float()).any(), "saturation failed: NaN in fp8 output"


def test_quantize_row_two_pass_path(monkeypatch):
    """Rows longer than the single-pass limit take the two-pass loop: same bits."""
    monkeypatch.setattr(F, "_ROW_SINGLE_PASS_MAX_K", 64)
    x = act(7, 273)
    q, s = F.quantize_fp8(x, "row")
    q_ref, s_ref = F.quantize_fp8_ref(x, "row")
    assert torch.equal(s.cpu(), s_ref.cpu())
    assert_bits_equal(q, q_ref, "two-pass row quantization")


def test_quantize_zero_rows_and_leading_dims():
    x = torch.zeros(2, 3, 130, dtype=torch.bfloat16, device=DEV)
    x[1, 2, 5] = 3.0
    for g in ("row", "block"):
        q, s = F.quantize_fp8(x, g)
        q_ref, s_ref = F.quantize_fp8_ref(x, g)
        assert s.shape == s_ref.shape == (2, 3, 1 if g == "row" else 2)
        assert torch.equal(s.cpu(), s_ref.cpu()) and (s > 0).all(), f"{g}: zero rows must get a positive scale"
        assert_bits_equal(q, q_ref, f"{g} zero rows")


# ---------------------------------------------------------------------------------------------
# fp8_gemm

# fp32 output: products of e4m3 values are exact in fp32, so only the summation order differs
# (K <= 273 terms of fp32 rounding): 1e-5 relative to the output's magnitude.
FP32_TOL = 1e-5


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fast_accum", [True, False])
def test_fp8_gemm_matches_ref(M, K, N, granularity, fast_accum):
    x = act(M, K)
    xq, xs = (
        F.quantize_fp8_ref(x, granularity, torch.tensor(0.05, device=DEV))
        if granularity == "tensor"
        else (F.quantize_fp8_ref(x, granularity))
    )
    _, wq, ws = make_weight(N, K, granularity)
    out = F.fp8_gemm(xq, wq, xs, ws, out_dtype=torch.float32, fast_accum=fast_accum)
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32)
    scale = ref.abs().max().item()
    assert_close(out, ref, FP32_TOL * scale, FP32_TOL, f"fp8_gemm {granularity} {M}x{K}x{N}")


@pytest.mark.parametrize("gate_shape", ["N", "1N", None])
def test_fp8_gemm_gated_residual_epilogue(gate_shape):
    M, K, N = 5, 123, 145
    x = act(M, K)
    xq, xs = F.quantize_fp8_ref(x, "row")
    _, wq, ws = make_weight(N, K, "row")
    residual = torch.randn(M, N, device=DEV).to(torch.bfloat16)
    gate = {"N": torch.randn(N), "1N": torch.randn(1, N), None: None}[gate_shape]
    gate = gate.to(DEV, torch.bfloat16) if gate is not None else None
    out = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate)
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, residual=residual, gate=gate)
    assert out.dtype == torch.bfloat16
    # bf16 output: fp32 values that differ in the last bits can round to neighbouring bf16 values
    # (one bf16 ulp = 2^-8 relative)
    assert_close(out, ref, 1e-3, 2.0**-7, f"epilogue gate={gate_shape}")
    # and the epilogue really is residual + gate * acc (not e.g. the residual dropped)
    plain = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32)
    g = gate.float() if gate is not None else 1.0
    assert_close(out, residual.float() + g * plain, 1e-3, 2.0**-7, "epilogue formula")


def test_fp8_gemm_mixed_static_activation_scale_per_channel_weight():
    """A scalar activation scale with per-channel weight scales runs the row kernel with stride 0."""
    M, K, N = 17, 64, 81
    xq, xs = F.quantize_fp8_ref(act(M, K), "tensor", torch.tensor(0.05, device=DEV))
    _, wq, ws = make_weight(N, K, "row")
    out = F.fp8_gemm(xq, wq, xs, ws.reshape(N, 1), out_dtype=torch.float32)
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32)
    assert_close(out, ref, FP32_TOL * ref.abs().max().item(), FP32_TOL, "mixed scales")


# persistent TMA kernel (sm_90 path; in the interpreter it runs wherever TMA alignment holds)
# (81, 256, 200): ragged M and N, 2 K blocks, 2 N blocks; 12 tiles over 4 interpreter "SMs"
PERSISTENT_SHAPES = [(64, 64, 64), (81, 256, 200)]


@pytest.mark.parametrize("M,K,N", PERSISTENT_SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fast_accum", [True, False])
def test_fp8_gemm_persistent_matches_ref_and_classic(M, K, N, granularity, fast_accum, monkeypatch):
    monkeypatch.setattr(F, "PERSISTENT", True)  # opt-in kernel
    x = act(M, K)
    static = torch.tensor(0.05, device=DEV)
    xq, xs = (
        F.quantize_fp8_ref(x, granularity, static) if granularity == "tensor" else F.quantize_fp8_ref(x, granularity)
    )
    _, wq, ws = make_weight(N, K, granularity)
    out = F.fp8_gemm(xq, wq, xs, ws, out_dtype=torch.float32, fast_accum=fast_accum)
    if DEV == "cpu" or torch.cuda.get_device_capability()[0] == 9:
        assert F._use_persistent(xq, wq, out), "TMA-aligned shape did not take the persistent kernel"
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32)
    assert_close(out, ref, FP32_TOL * ref.abs().max().item(), FP32_TOL, f"persistent {granularity} {M}x{K}x{N}")
    monkeypatch.setattr(F, "PERSISTENT", False)
    classic = F.fp8_gemm(xq, wq, xs, ws, out_dtype=torch.float32, fast_accum=fast_accum)
    assert_close(out, classic, FP32_TOL * ref.abs().max().item(), FP32_TOL, "persistent vs classic kernel")


def test_fp8_gemm_persistent_epilogue_and_unaligned_fallback(monkeypatch):
    monkeypatch.setattr(F, "PERSISTENT", True)  # opt-in kernel
    M, K, N = 17, 128, 72  # bf16 out: 72 * 2 bytes per row is TMA-aligned
    xq, xs = F.quantize_fp8_ref(act(M, K), "row")
    _, wq, ws = make_weight(N, K, "row")
    residual = torch.randn(M, N, device=DEV).to(torch.bfloat16)
    gate = torch.randn(N, device=DEV).to(torch.bfloat16)
    out = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate)
    assert F._use_persistent(xq, wq, out)
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, residual=residual, gate=gate)
    assert_close(out, ref, 1e-3, 2.0**-7, "persistent gated residual")  # bf16 output rounding
    # contiguous K = 120: 120 bytes per row is not 16-byte aligned for TMA: the classic kernel takes it
    assert not F._use_persistent(xq[:, :120].contiguous(), wq[:, :120].contiguous(), out)


# stream-K (persistent kernel, STREAM_K configs) over the interpreter's 4 "SMs", one lane of programs
# per row of tiles, each sharing its row's N x K iterations: (64, 640, 264) in 32x64 tiles: 2 lanes of
# 2 programs, 5 N-tiles x 5 K steps per lane; (17, 640, 192): 1 lane of 4 programs; (32, 1280, 96) in
# 16x32 tiles: 10 K steps; (81, 640, 192): 3 rows of tiles, one program idle, tiles run whole
STREAMK_CASES = [((64, 640, 264), (32, 64), True), ((17, 640, 192), (32, 64), True),
                 ((32, 1280, 96), (16, 32), True), ((81, 640, 192), (32, 64), False)]  # fmt: skip


@pytest.mark.parametrize("case", STREAMK_CASES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_gemm_stream_k_matches_ref(case, granularity, monkeypatch):
    (M, K, N), (bm, bn), splits = case
    bn = 128 if granularity == "block" else bn  # block scales: one weight scale per tile column
    monkeypatch.setattr(F, "PERSISTENT", True)
    cfg = F._pcfg(bm, bn, 1, 4, bn == 64, group=2, stream_k=True)
    monkeypatch.setattr(F._fp8_gemm_persistent, "configs", [cfg])
    monkeypatch.setattr(F._fp8_gemm_persistent, "cache", {})
    monkeypatch.setattr(F, "_FAST_LAUNCHERS", {})
    x = act(M, K)
    static = torch.tensor(0.05, device=DEV)
    xq, xs = F.quantize_fp8_ref(x, granularity, static if granularity == "tensor" else None)
    _, wq, ws = make_weight(N, K, granularity)
    residual = torch.randn(M, N, device=DEV).to(torch.bfloat16)
    gate = torch.randn(N, device=DEV).to(torch.bfloat16)
    work, counters = F._streamk_buffers(xq.device)
    work.fill_(float("nan"))  # a partial tile read before this launch wrote it would put NaN in the output
    kw = dict(out_dtype=torch.float32, residual=residual, gate=gate)
    out = F.fp8_gemm(xq, wq, xs, ws, **kw)
    assert F._use_persistent(xq, wq, out) and F._fp8_gemm_persistent.best_config is cfg
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, **kw)
    assert_close(out, ref, FP32_TOL * ref.abs().max().item(), FP32_TOL, f"stream-K {granularity} {M}x{K}x{N}")
    if DEV == "cpu":  # 4 programs (a GPU has more, and shares these shapes differently)
        assert work.isnan().all() != splits, f"partial tiles written: {not work.isnan().all()}, expected {splits}"
    assert not counters.any(), f"arrival counters not reset: {counters.tolist()}"
    again = F.fp8_gemm(xq, wq, xs, ws, **kw)
    assert torch.equal(again, out), "second launch on reset counters differs"


def test_stream_k_workspace_fits_the_current_configs(monkeypatch):
    """The workspace follows the configs' largest stream-K tile even when the list object is reused (edited in
    place here; a freed list's id() recurs too): it was keyed by id(configs), and a 16x32 workspace served a
    32x128 launch, an out-of-bounds write that crashed CI (stop 24)."""
    monkeypatch.setattr(F, "_STREAMK_BUFFERS", {})
    configs = [F._pcfg(16, 32, 1, 4, False, stream_k=True)]
    monkeypatch.setattr(F._fp8_gemm_persistent, "configs", configs)
    slots = 2 * F._num_sms(torch.device(DEV))
    assert F._streamk_buffers(torch.device(DEV))[0].numel() >= slots * 16 * 32
    configs[:] = [F._pcfg(32, 128, 1, 4, False, stream_k=True), F._pcfg(128, 256, 1, 4, True)]  # data-parallel
    assert F._streamk_buffers(torch.device(DEV))[0].numel() >= slots * 32 * 128


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(512, 6144, 18432), (512, 6144, 6144), (512, 18432, 6144)])
@pytest.mark.parametrize("granularity", ["row", "block"])
def test_gpu_stream_k_flux_text_shapes(M, K, N, granularity, monkeypatch):
    """FLUX.2's M = 512 text GEMMs, where stream-K is meant to pay: 288, 96 and 96 tiles of 128x256
    (block: 128x128) on the GPU's SMs, against the fp32 reference and the data-parallel kernel."""
    bn = 128 if granularity == "block" else 256
    monkeypatch.setattr(F, "PERSISTENT", True)
    monkeypatch.setattr(F, "BLOCK_GLUON", False)  # this test is about the Triton kernel's stream-K
    monkeypatch.setattr(F, "_FAST_LAUNCHERS", {})
    x = act(M, K)
    _, wq, ws = make_weight(N, K, granularity)
    xq, xs = F.quantize_fp8(x, granularity)
    residual = torch.randn(M, N, device=DEV).to(torch.bfloat16)
    gate = torch.randn(N, device=DEV).to(torch.bfloat16)
    outs = {}
    for sk in (False, True):
        cfg = F._pcfg(128, bn, 3, 8, bn == 256, stream_k=sk)
        monkeypatch.setattr(F._fp8_gemm_persistent, "configs", [cfg])
        monkeypatch.setattr(F._fp8_gemm_persistent, "cache", {})
        for fast in (True, False):
            out = F.fp8_gemm(xq, wq, xs, ws, out_dtype=torch.float32, fast_accum=fast)
            ref = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32)
            err = (out - ref).norm().item() / ref.norm().item()
            bound = 6e-3 if fast and granularity != "block" else 1e-3  # as test_gpu_medium_shape_all_paths
            assert not torch.isnan(out).any() and err < bound, f"stream-K={sk} fast={fast}: rel L2 {err:.2e}"
            outs[sk, fast] = out
        gated = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate, fast_accum=False)
        ref = F.fp8_gemm_ref(xq, wq, xs, ws, residual=residual, gate=gate, out_dtype=torch.float32)
        err = (gated.float() - ref).norm().item() / ref.norm().item()
        assert err < 4e-3, f"stream-K={sk} gated residual: rel L2 {err:.2e}"
        assert torch.equal(F.fp8_gemm(xq, wq, xs, ws, out_dtype=torch.float32, fast_accum=False), outs[sk, False])
    assert not F._streamk_buffers(xq.device)[1].any(), "arrival counters not reset"
    # promoted accumulation sums the same fp32 K-step products; stream-K only regroups the sum
    err = (outs[True, False] - outs[False, False]).norm().item() / outs[False, False].norm().item()
    assert err < 1e-6, f"stream-K vs data-parallel (promoted accumulation): rel L2 {err:.2e}"


def test_block_gluon_options_follow_the_measured_dispatch():
    """Three consumers only where M is a multiple of 192 from 4608 rows (no padded tile rows; measured
    faster on FLUX.2's single-stream linears), the TMA store only for 2-byte outputs."""
    opts = F._block_gluon_options(4608, torch.bfloat16)
    assert opts == dict(tma_store=True, consumers=3, num_stages=4)
    assert F._block_gluon_options(4096, torch.bfloat16)["consumers"] == 2
    assert F._block_gluon_options(16896, torch.float32) == dict(tma_store=False, consumers=3, num_stages=4)
    small = F._block_gluon_options(512, torch.float16)
    assert small == dict(tma_store=True, consumers=2, ordered=True, num_stages=5)
    assert F._block_gluon_options(1152, torch.bfloat16)["consumers"] == 2  # a multiple of 192 below 4096


@pytest.mark.gpu
@pytest.mark.parametrize(
    "M, K, N, gluon",
    # FLUX.2 txt.qkv and img.proj: the Gluon kernel; txt.mlp_out (192 tiles, K = 18432): stream-K;
    # K = 1040 + 8 (rows not 16-byte aligned for TMA): the classic kernel
    [(512, 6144, 18432, True), (1024, 6144, 6144, True), (512, 18432, 6144, False), (300, 1048, 640, False),
     (4608, 1024, 768, True)],
)  # fmt: skip
def test_gpu_block_scales_dispatch(M, K, N, gluon, monkeypatch):
    """fp8_gemm with block scales on sm_90 takes the Gluon warp-specialized kernel where it was
    measured faster, and gives the Triton kernel's result within promoted-accumulation noise."""
    from flux2_bench.kernels import fp8_block_gemm_sm90 as G

    if not G.is_available():
        pytest.skip("needs sm_90 and Gluon")
    calls = []
    real = G.fp8_block_gemm_sm90
    monkeypatch.setattr(G, "fp8_block_gemm_sm90", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = act(M, K)
    _, wq, ws = make_weight(N, K, "block")
    xq, xs = F.quantize_fp8(x, "block")
    residual = torch.randn(M, N, device=DEV).to(torch.bfloat16)
    gate = torch.randn(N, device=DEV).to(torch.bfloat16)
    out = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate, out_dtype=torch.float32)
    assert bool(calls) == gluon, f"Gluon kernel called: {bool(calls)}, expected {gluon}"
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, residual=residual, gate=gate, out_dtype=torch.float32)
    err = (out - ref).norm().item() / ref.norm().item()
    assert not out.isnan().any() and err < 1e-3, f"rel L2 {err:.2e}"
    if gluon:  # the schedule chosen for this M and a 4-byte output (no TMA store)
        opts = F._block_gluon_options(M, torch.float32)
        assert {k: calls[0].get(k) for k in opts} == opts, calls[0]
    # 2-byte output, promoted: the TMA store (with fast accumulation: the rescaled kernel, test_fp8_block_rescale_sm90)
    out_bf16 = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate, fast_accum=False)
    fast_bf16 = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate)
    monkeypatch.setattr(F, "BLOCK_GLUON", False)
    tri = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate, out_dtype=torch.float32)
    err = (out - tri).norm().item() / tri.norm().item()
    assert err < 1e-5, f"Gluon vs Triton block path: rel L2 {err:.2e}"
    err = (out_bf16.float() - tri).norm().item() / tri.norm().item()
    assert err < 4e-3, f"Gluon (bf16 out) vs Triton block path: rel L2 {err:.2e}"
    err = (fast_bf16.float() - tri).norm().item() / tri.norm().item()
    assert err < 8e-3, f"fast accumulation (bf16 out) vs Triton block path: rel L2 {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "M, K, N, gluon",
    # txt.qkv and txt.mlp_in shapes (smaller K): the 128 x 128 schedule; N = 16392 (rows of 32784 B: aligned) at
    # M = 300 too; txt.proj (N = 6144): the persistent kernel; from 1024 rows: the 128 x 256 schedule (ragged M, N)
    [(512, 1024, 18432, "text"), (300, 512, 16392, "text"), (512, 1024, 6144, None), (1024, 512, 18432, "main"),
     (1100, 640, 1112, "main")],
)  # fmt: skip
def test_gpu_row_scales_dispatch(M, K, N, gluon, monkeypatch):
    """fp8_gemm with row scales on sm_90 takes the Gluon warp-specialized kernel where it was measured faster,
    with the persistent kernel's bits (both chain the same wgmmas over K and share the epilogue's order)."""
    from flux2_bench.kernels import fp8_row_gemm_sm90 as R

    if not R.is_available():
        pytest.skip("needs sm_90 and Gluon")
    calls = []
    real = R.fp8_row_gemm_sm90
    monkeypatch.setattr(R, "fp8_row_gemm_sm90", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = act(M, K)
    _, wq, ws = make_weight(N, K, "row")
    xq, xs = F.quantize_fp8(x, "row")
    residual = torch.randn(M, N, device=DEV).to(torch.bfloat16)
    gate = torch.randn(N, device=DEV).to(torch.bfloat16)
    for epi in ({}, dict(residual=residual, gate=gate)):
        calls.clear()
        out = F.fp8_gemm(xq, wq, xs, ws, **epi)
        assert bool(calls) == (gluon is not None), f"Gluon kernel called: {bool(calls)}, expected schedule {gluon}"
        if gluon:
            want = F.ROW_GLUON_OPTIONS if gluon == "main" else F.ROW_GLUON_OPTIONS_TEXT
            assert {k: calls[0].get(k) for k in want} == want
        monkeypatch.setattr(F, "ROW_GLUON", False)
        tri = F.fp8_gemm(xq, wq, xs, ws, **epi)
        monkeypatch.setattr(F, "ROW_GLUON", True)
        assert torch.equal(out, tri), f"max |diff| vs the persistent kernel {(out.float() - tri.float()).abs().max()}"
        ref = F.fp8_gemm_ref(xq, wq, xs, ws, out_dtype=torch.float32, **epi)
        err = (out.float() - ref).norm().item() / ref.norm().item()
        assert err < 8e-3, f"rel L2 {err:.2e}"
    calls.clear()
    F.fp8_gemm(xq, wq, xs, ws, out_dtype=torch.float32)  # 4-byte output: no TMA-store kernel
    F.fp8_gemm(xq, wq, xs, ws, fast_accum=False)  # promoted accumulation: the Triton kernels
    assert not calls


# ---------------------------------------------------------------------------------------------
# fp8_linear


@pytest.mark.parametrize("M,K,N", SHAPES[:2] + SHAPES[3:])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fuse", [False, True])
def test_fp8_linear_matches_ref(M, K, N, granularity, fuse):
    x = act(M, K)
    _, wq, ws = make_weight(N, K, granularity)
    kw = dict(granularity=granularity, out_dtype=torch.float32, fuse_quant=fuse)
    out = F.fp8_linear(x, wq, ws, **kw)
    ref = F.fp8_linear_ref(x, wq, ws, **kw)
    assert_close(out, ref, FP32_TOL * ref.abs().max().item(), FP32_TOL, f"fp8_linear {granularity} fuse={fuse}")


def test_fp8_linear_static_scale_leading_dims_and_epilogue():
    B, L, K, N = 2, 9, 123, 81
    x = act(B * L, K).reshape(B, L, K)
    _, wq, ws = make_weight(N, K, "tensor")
    residual = torch.randn(B, L, N, device=DEV).to(torch.bfloat16)
    gate = torch.randn(N, device=DEV).to(torch.bfloat16)
    xs = torch.tensor(0.03, device=DEV)
    for fuse in (False, True):
        kw = dict(granularity="tensor", x_scale=xs, residual=residual, gate=gate, fuse_quant=fuse)
        out = F.fp8_linear(x, wq, ws, **kw)
        ref = F.fp8_linear_ref(x, wq, ws, **kw)
        assert out.shape == (B, L, N)
        assert_close(out, ref, 1e-3, 2.0**-7, f"static tensor fuse={fuse}")  # bf16 output rounding


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fp8_linear_sqnr_vs_unquantized(granularity):
    """Quantization error against the bf16-free fp32 product: an SQNR floor, not allclose."""
    M, K, N = 64, 256, 145
    x = act(M, K)
    w, wq, ws = make_weight(N, K, granularity)
    out = F.fp8_linear(x, wq, ws, granularity=granularity, out_dtype=torch.float32)
    exact = x.float() @ w.float().T
    # e4m3 (3 mantissa bits) on both operands measures ~29-30 dB here (tensor ~28.7, row ~29.7,
    # block ~29.4); the floors leave ~2.5 dB and still catch a wrong scale or a lost rounding mode
    floor = {"tensor": 26.0, "row": 27.0, "block": 27.0}[granularity]
    got = sqnr_db(out, exact)
    assert got > floor, f"{granularity}: SQNR {got:.1f} dB below {floor} dB"


# ---------------------------------------------------------------------------------------------
# fp8_weight_only_linear


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_weight_only_matches_ref(M, K, N, granularity):
    x = act(M, K)
    _, wq, ws = make_weight(N, K, granularity)
    out = F.fp8_weight_only_linear(x, wq, ws, out_dtype=torch.float32)
    ref = F.fp8_weight_only_linear_ref(x, wq, ws, out_dtype=torch.float32)
    assert_close(out, ref, FP32_TOL * ref.abs().max().item(), FP32_TOL, f"weight-only {granularity}")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_dequantize_fp8_weight_matches_ref(granularity):
    # fp16 on CPU: the interpreter's fp32 -> bf16 cast truncates (environment.md); bf16 on the GPU
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16
    _, wq, ws = make_weight(145, 273, granularity)
    d = F.dequantize_fp8_weight(wq, ws, dtype)
    ref = F.dequantize_fp8_weight_ref(wq, ws, dtype)
    assert d.dtype == dtype and d.shape == (145, 273)
    bad = d.view(torch.int16) != ref.view(torch.int16)  # one rounding of the same fp32 product: exact
    assert not bad.any(), f"{int(bad.sum())} values differ, first at {bad.nonzero()[:3].tolist()}"


def _dequant_path_bound(x, w_deq, ref, dtype, gate=None):
    """|out - ref| bound for the dequantize + cuBLAS path: each weight is rounded once to x's dtype
    (unit roundoff u), the GEMM's output once (u |x| |w|), the epilogue's result once more (u |ref|);
    fp32 accumulation adds ~1e-5 of sum |x w|. The gate scales the first two."""
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    g = gate.float().abs().reshape(1, -1) if gate is not None else 1.0
    return g * (2 * u + 1e-5) * (x.float().abs() @ w_deq.float().abs().T) + u * ref.abs()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_weight_only_dequant_path_above_threshold(granularity, monkeypatch):
    """M >= WO_DEQUANT_MIN_M dequantizes once and calls torch's GEMM (epilogue in torch)."""
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float16  # CPU: see test above
    M, K, N = 33, 273, 145
    x = act(M, K).to(dtype)
    _, wq, ws = make_weight(N, K, granularity)
    residual = torch.randn(M, N, device=DEV).to(dtype)
    gate = torch.randn(N, device=DEV).to(dtype)
    calls = []
    real = F._dequant_launch
    monkeypatch.setattr(F, "_dequant_launch", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(F, "WO_DEQUANT_MIN_M", M + 1)
    F.fp8_weight_only_linear(x, wq, ws)
    assert not calls, "below the threshold the fused kernel must run"
    monkeypatch.setattr(F, "WO_DEQUANT_MIN_M", M)
    w_deq = F.dequantize_fp8_weight_ref(wq, ws, dtype)
    for kw in ({}, {"residual": residual, "gate": gate}, {"residual": residual}):
        out = F.fp8_weight_only_linear(x, wq, ws, out_dtype=torch.float32, **kw)
        ref = F.fp8_weight_only_linear_ref(x, wq, ws, out_dtype=torch.float32, **kw)
        bound = _dequant_path_bound(x, w_deq, ref, dtype, kw.get("gate"))
        err = (out - ref).abs()
        assert (err <= bound).all(), (
            f"{granularity} {list(kw)}: {int((err > bound).sum())} beyond the bound, max {err.max():.3g}"
        )
    assert calls == [(N, K)] * 3, f"dequant path not taken: {calls}"


def test_weight_only_decodes_every_e4m3_value_and_epilogue():
    """All 254 finite e4m3 codes (subnormals included) go through the in-register decode."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[~torch.isnan(codes.view(torch.float8_e4m3fn).float())]
    w = codes.reshape(2, 127).view(torch.float8_e4m3fn).to(DEV)  # N=2, K=127
    x = torch.eye(127, dtype=torch.bfloat16, device=DEV)  # out[m, n] = w[n, m]
    out = F.fp8_weight_only_linear(x, w, torch.tensor(1.0, device=DEV), out_dtype=torch.float32)
    assert_close(out.T, w.float(), 0, 0, "e4m3 decode")
    residual = torch.randn(127, 2, device=DEV).to(torch.bfloat16)
    gate = torch.randn(1, 2, device=DEV).to(torch.bfloat16)
    out = F.fp8_weight_only_linear(x, w, torch.tensor(0.5, device=DEV), residual=residual, gate=gate)
    ref = F.fp8_weight_only_linear_ref(x, w, torch.tensor(0.5, device=DEV), residual=residual, gate=gate)
    assert_close(out, ref, 1e-3, 2.0**-7, "weight-only epilogue")  # bf16 output rounding


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_raise_with_values():
    M, K, N = 8, 64, 16
    xq, xs = F.quantize_fp8_ref(act(M, K), "row")
    _, wq, ws = make_weight(N, K, "row")
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        F.fp8_gemm(xq.float(), wq, xs, ws)
    with pytest.raises(ValueError, match="K mismatch"):
        F.fp8_gemm(xq[:, :32], wq, xs, ws)
    with pytest.raises(ValueError, match=r"a_scale=\(7,\)"):
        F.fp8_gemm(xq, wq, xs[:7, 0], ws)
    with pytest.raises(TypeError, match="float32"):
        F.fp8_gemm(xq, wq, xs.half(), ws)
    with pytest.raises(ValueError, match="residual must have shape"):
        F.fp8_gemm(xq, wq, xs, ws, residual=torch.zeros(M, N + 1, device=DEV))
    with pytest.raises(ValueError, match="gate must have shape"):
        F.fp8_gemm(xq, wq, xs, ws, gate=torch.zeros(M, N, device=DEV))
    with pytest.raises(ValueError, match="granularity must be one of"):
        F.quantize_fp8(act(M, K), "channel")
    with pytest.raises(ValueError, match="static"):
        F.quantize_fp8(act(M, K), "tensor")
    with pytest.raises(ValueError, match="w_scale for 'block'"):
        F.fp8_linear(act(M, K), wq, ws, granularity="block")
    with pytest.raises(TypeError, match="bf16 or fp16"):
        F.fp8_weight_only_linear(act(M, K).float(), wq, ws)


def test_unsupported_gpu_names_capability_and_weight_only_path(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(F, "_props", lambda index: SimpleNamespace(major=8, minor=6))  # cached device properties
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(RuntimeError, match=r"sm_86.*fp8_weight_only_linear"):
        F._check_fp8_capable(torch.device("cuda", 0))


# ---------------------------------------------------------------------------------------------
# GPU only: hardware compile, hardware fp8 cast, shared-memory pruning


@pytest.mark.gpu
def test_gpu_prune_fits_shared_memory():
    a = torch.empty(1, device="cuda", dtype=torch.float8_e4m3fn)
    kept = F._prune_gemm(F._GEMM_CONFIGS, {"a_ptr": a})
    limit = F._smem_limit(a.device)
    assert kept and all(
        c.num_stages * c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) <= limit for c in kept
    )


@pytest.mark.gpu
@pytest.mark.parametrize("mode,promote", [(F.SCALE_ROW, False), (F.SCALE_ROW, True), (F.SCALE_BLOCK, False)])
def test_gpu_prune_persistent(mode, promote):
    a = torch.empty(16, 16, device="cuda", dtype=torch.float8_e4m3fn)
    desc = F.TensorDescriptor(a, [16, 16], [16, 1], [16, 16])
    sms = F._num_sms(a.device)
    for M, N in ((512, 18432), (128 * sms, 256)):  # 576 tiles of 128x128 on 132 SMs; whole waves
        args = {"a_desc": desc, "M": M, "N": N}
        kw = dict(SCALE_MODE=mode, PROMOTE=promote, C_BYTES=2, NUM_SMS=sms)
        kept = F._prune_persistent(F._PERSISTENT_CONFIGS, args, **kw)
        assert kept, "no persistent config fits this GPU"
        if mode == F.SCALE_BLOCK:
            assert all(c.kwargs["BLOCK_N"] == 128 for c in kept), [str(c) for c in kept]
        # stream-K only for the two-accumulator kernels, only where whole waves would leave SMs idle
        stream_k = [c for c in kept if c.kwargs["STREAM_K"]]
        assert bool(stream_k) == (N == 18432 and (mode == F.SCALE_BLOCK or promote)), [str(c) for c in kept]


@pytest.fixture
def one_config_per_kernel(monkeypatch):
    """GPU correctness tests pin one hardware config per kernel (sized for sm_90's shared memory):
    autotuning every kernel x scale mode x shape took > 2 minutes of the device's time. The benchmark
    checks the autotuned configs on the FLUX.2 shapes."""
    monkeypatch.setattr(F._fp8_gemm, "configs", [F._cfg(64, 128, 128, 3, 4)])
    monkeypatch.setattr(F._fp8_gemm_persistent, "configs", [F._pcfg(128, 128, 3, 8, False)])
    wo = ("BLOCK_N", "BLOCK_M", "BLOCK_K", "GROUP_N")
    monkeypatch.setattr(F._fp8_weight_only, "configs", [F._cfg(128, 128, 64, 3, 8, names=wo)])
    for kern in (F._fp8_gemm, F._fp8_gemm_persistent, F._fp8_weight_only):
        monkeypatch.setattr(kern, "cache", {})
    monkeypatch.setattr(F, "_FAST_LAUNCHERS", {})


@pytest.mark.gpu
@pytest.mark.usefixtures("one_config_per_kernel")
@pytest.mark.parametrize("M,K,N", [(1000, 1111, 777), (1000, 1152, 776)])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gpu_medium_shape_all_paths(M, K, N, granularity):
    # (1000, 1111, 777): several tiles, ragged edges everywhere, classic kernel (no TMA alignment);
    # (1000, 1152, 776): ragged M and N tiles, TMA-aligned rows: the persistent kernel on sm_90
    x = act(M, K)
    _, wq, ws = make_weight(N, K, granularity)
    for fuse, fast in ((False, True), (True, True), (False, False)):
        kw = dict(granularity=granularity, out_dtype=torch.float32, fuse_quant=fuse, fast_accum=fast)
        out = F.fp8_linear(x, wq, ws, **kw)
        ref = F.fp8_linear_ref(x, wq, ws, **kw)
        # Judged by relative L2, not elementwise: Hopper's FP8 MMA accumulates with ~13 mantissa bits.
        # Measured on the H100 (reports/fp8_matmul, K=6144..24576, beyond bf16 output rounding):
        # fast accumulation 2e-3..4e-3; per-128-K promotion (block scaling, fast_accum=False) below
        # the bf16 floor. Bounds: fast 6e-3, promoted 1e-3 (K=1111 here, errors grow with K).
        bound = 6e-3 if fast and granularity != "block" else 1e-3
        err = (out - ref).norm().item() / ref.norm().item()
        assert not torch.isnan(out).any(), f"NaN in gpu {granularity} fuse={fuse} fast={fast}"
        assert err < bound, f"gpu {granularity} fuse={fuse} fast={fast}: rel L2 {err:.2e} >= {bound:.0e}"
    # gated residual epilogue on this shape's kernel (persistent on the aligned one)
    xq, xs = F.quantize_fp8(x, granularity, torch.tensor(0.05, device=DEV) if granularity == "tensor" else None)
    residual = torch.randn(M, N, device=DEV).to(torch.bfloat16)
    gate = torch.randn(N, device=DEV).to(torch.bfloat16)
    out = F.fp8_gemm(xq, wq, xs, ws, residual=residual, gate=gate, fast_accum=False)
    ref = F.fp8_gemm_ref(xq, wq, xs, ws, residual=residual, gate=gate, out_dtype=torch.float32)
    err = (out.float() - ref).norm().item() / ref.norm().item()
    assert err < 4e-3, f"gpu {granularity} gated residual: rel L2 {err:.2e} (bf16 output rounding: ~2e-3)"
    assert M < F.WO_DEQUANT_MIN_M
    out = F.fp8_weight_only_linear(x, wq, ws, out_dtype=torch.float32)
    ref = F.fp8_weight_only_linear_ref(x, wq, ws, out_dtype=torch.float32)
    # bf16 MMA of exact bf16 inputs accumulates in fp32: only the summation order differs
    assert_close(out, ref, 1e-5 * ref.abs().max().item(), 1e-5, f"gpu weight-only {granularity}")
    x2 = torch.cat([x, x[: F.WO_DEQUANT_MIN_M - M]])  # M at the threshold: dequantize + cuBLAS
    out = F.fp8_weight_only_linear(x2, wq, ws, out_dtype=torch.float32)
    ref = F.fp8_weight_only_linear_ref(x2, wq, ws, out_dtype=torch.float32)
    bound = _dequant_path_bound(x2, F.dequantize_fp8_weight_ref(wq, ws, x.dtype), ref, x.dtype)
    bad = (out - ref).abs() > bound
    assert not bad.any(), f"gpu weight-only dequant path {granularity}: {int(bad.sum())} beyond the bound"


@pytest.mark.gpu
@pytest.mark.usefixtures("one_config_per_kernel")
@pytest.mark.parametrize("persistent", [False, True])
def test_gpu_cached_launches_match_ref(monkeypatch, persistent):
    """Repeated calls on one shape: the first goes through Triton, later ones through the cached
    launcher (FAST_LAUNCH). A cached launch must give the uncached one's bits on the same data, and
    new data must still match the reference."""
    monkeypatch.setattr(F, "PERSISTENT", persistent)
    M, K, N = 512, 1152, 640
    first = {}
    for seed in (1, 2, 3):
        x = act(M, K, seed)
        for gran in ("row", "block"):
            _, wq, ws = make_weight(N, K, gran, seed)
            for fuse in (False, True):
                for fast in (True, False):
                    kw = dict(granularity=gran, out_dtype=torch.float32, fuse_quant=fuse, fast_accum=fast)
                    out = F.fp8_linear(x, wq, ws, **kw)
                    if seed == 1:
                        first[gran, fuse, fast] = out
                        again = F.fp8_linear(x, wq, ws, **kw)
                        assert torch.equal(again, out), f"{gran} fuse={fuse} fast={fast}: cached launch differs"
                    if fast:
                        continue  # Hopper's fast accumulation vs fp32 is the medium test's subject
                    ref = F.fp8_linear_ref(x, wq, ws, **kw)
                    err = (out - ref).norm().item() / ref.norm().item()
                    # promoted accumulation: bf16-free fp32 output, bound as in the medium test
                    assert err < 1e-3, f"seed {seed} {gran} fuse={fuse}: rel L2 {err:.2e}"
            out = F.fp8_weight_only_linear(x, wq, ws, out_dtype=torch.float32)
            ref = F.fp8_weight_only_linear_ref(x, wq, ws, out_dtype=torch.float32)
            assert_close(out, ref, 1e-5 * ref.abs().max().item(), 1e-5, f"seed {seed} weight-only {gran}")
    assert F._FAST_LAUNCHERS, "no launch was cached"


@pytest.mark.gpu
def test_gpu_launch_caches_keep_no_tensors(monkeypatch):
    """Every launch cache (the persistent Triton kernel's and the five Gluon kernels') keeps its first launch's
    descriptors without their tensors: the operands and output of a first launch are freed when the caller drops
    them. They were not, and every peak of a FLUX.2 run rose by up to 5.8 GiB (reports/h100, session 18)."""
    import gc
    import weakref

    from flux2_bench.kernels import fp8_attention as FA
    from flux2_bench.kernels import fp8_attention_sm90 as A
    from flux2_bench.kernels import fp8_block_gemm_sm90 as G
    from flux2_bench.kernels import fp8_block_rescale_sm90 as BR
    from flux2_bench.kernels import fp8_row_gemm_sm90 as R
    from flux2_bench.kernels import fp8_weight_only_sm90 as W

    if not G.is_available():
        pytest.skip("needs an sm_90 GPU and Gluon")
    for mod, name in ((F, "_FAST_LAUNCHERS"), (F, "_DESC_TEMPLATES"), (G, "_WS_LAUNCHERS"), (BR, "_LAUNCHERS"),
                      (R, "_LAUNCHERS"), (W, "_LAUNCHERS"), (A, "_LAUNCHERS")):  # fmt: skip
        monkeypatch.setattr(mod, name, {})  # every launch below is its cache's first
    monkeypatch.setattr(F, "PERSISTENT", True)
    monkeypatch.setattr(F, "ROW_GLUON", False)  # fp8_gemm row -> the persistent Triton kernel
    M, K, N = 512, 1152, 640

    def gemm(granularity):
        x = act(M, K)
        xq, xs = F.quantize_fp8(x, granularity)
        _, wq, ws = make_weight(N, K, granularity)
        return xq, wq, xs, ws

    def persistent():
        xq, wq, xs, ws = gemm("row")
        return xq, wq, F.fp8_gemm(xq, wq, xs, ws)

    def row_gluon():
        xq, wq, xs, ws = gemm("row")
        return xq, wq, R.fp8_row_gemm_sm90(xq, wq, xs, ws)

    def block_ws():
        xq, wq, xs, ws = gemm("block")
        return xq, wq, G.fp8_block_gemm_sm90(xq, wq, xs, ws)

    def block_rescaled():
        xq, wq, xs, ws = gemm("block")
        return xq, wq, BR.fp8_block_gemm_rescaled_sm90(xq, wq, xs, ws)

    def weight_only():
        x = act(M, K)
        _, wq, ws = make_weight(N, K, "row")
        return x, wq, W.fp8_weight_only_sm90(x, wq, ws)

    def attention():
        q, k, v = (torch.randn(1, 2, 640, 128, device=DEV).to(torch.bfloat16) for _ in range(3))
        quant = FA.quantize_qkv(q, k, v, v_perm16=True)
        return quant["q8"], quant["k8"], quant["vt8p"], A.fp8_attention_sm90(quant, v)

    for launch in (persistent, row_gluon, block_ws, block_rescaled, weight_only, attention):
        refs = [weakref.ref(t) for t in launch()]
        gc.collect()
        alive = [i for i, r in enumerate(refs) if r() is not None]
        assert not alive, f"{launch.__name__}: tensors {alive} of its first launch are still alive"
    assert F._DESC_TEMPLATES and G._WS_LAUNCHERS and BR._LAUNCHERS and R._LAUNCHERS and W._LAUNCHERS and A._LAUNCHERS


def _recorded_gemm_launch(monkeypatch, M=33, K=145, N=81):
    """(kernel, grid, args, meta) that ``fp8_gemm`` hands ``_launch`` for an (M, K) x (N, K) row-scaled GEMM,
    after a first call that autotuned it (the interpreter launch records the autotuner's best config)."""
    a, b = act(M, K).to(torch.float8_e4m3fn), act(N, K).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(M, device=DEV) + 0.5, torch.rand(N, device=DEV) + 0.5
    F.fp8_gemm(a, b, sa, sb)
    seen = []
    monkeypatch.setattr(F, "_launch", lambda fn, grid, *args, **meta: seen.append((fn, grid, args, meta)))
    F.fp8_gemm(a, b, sa, sb)
    (launch,) = seen
    return launch


def test_fast_launcher_hands_the_compiled_kernel_its_grid_and_constexprs(monkeypatch):
    """The cached launcher bypasses Triton's binder: it must pass the runtime arguments unchanged, then
    every constexpr in signature order (launch keywords, the autotuned config, the EVEN_K heuristic),
    under the grid the autotuned config implies. A stub stands in for the compiled kernel."""
    M, K, N = 33, 145, 81
    fn, grid, args, meta = _recorded_gemm_launch(monkeypatch, M, K, N)
    calls = []

    class CompiledStub:
        def __getitem__(self, g):
            return lambda *all_args: calls.append((g, all_args))

    F._make_fast_launcher(fn, grid, CompiledStub(), args, meta)(*args)
    ((g, all_args),) = calls
    cfg = fn.best_config.kwargs
    assert g == (math.ceil(M / cfg["BLOCK_M"]) * math.ceil(N / cfg["BLOCK_N"]), 1, 1)
    names = F._unwrap(fn)[2].arg_names
    assert len(all_args) == len(names) and all_args[: len(args)] == args
    want = {**meta, **cfg, "EVEN_K": K % cfg["BLOCK_K"] == 0}
    assert dict(zip(names[len(args) :], all_args[len(args) :], strict=True)) == {n: want[n] for n in names[len(args) :]}


def test_fast_launcher_keeps_the_objects_its_key_names_alive(monkeypatch):
    """``_launch_key`` names the autotuner's config list and cache by id(): a list freed while its launcher stayed
    cached could pass its id to a new list (a test pinning another config), which would then get the old config's
    launcher (the stream-K workspace had this bug, CI stop 24). The launcher holds both."""
    import collections
    import gc
    import weakref

    class Configs(list):  # a list that takes weak references
        pass

    fn, grid, args, meta = _recorded_gemm_launch(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(fn, "configs", Configs(fn.configs))
        ref = weakref.ref(fn.configs)
        launcher = F._make_fast_launcher(fn, grid, collections.defaultdict(lambda: None), args, meta)
    gc.collect()
    assert ref() is not None, "the cached launcher let the config list its key names be freed"
    del launcher
    gc.collect()
    assert ref() is None


def test_autotune_graph_timer_refused_with_persistent_kernel(monkeypatch):
    """The CUDA-graph autotune timer together with the persistent kernel returned wrong outputs on the
    H100 (reports/quant_runtime/diag_persistent_bisect): that pair falls back to the eager timer."""
    import triton.testing

    calls = []
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: calls.append("graph") or 1.0)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: calls.append("eager") or 2.0)
    monkeypatch.setattr(F, "_AUTOTUNE_QUEUED", False)  # (on a GPU the queued timer would take the eager case)
    monkeypatch.setattr(F, "_AUTOTUNE_GRAPH", True)
    monkeypatch.setattr(F, "PERSISTENT", True)
    assert F._autotune_bench(lambda: None) == 2.0
    monkeypatch.setattr(F, "PERSISTENT", False)
    assert F._autotune_bench(lambda: None) == 1.0
    monkeypatch.setattr(F, "_AUTOTUNE_GRAPH", False)
    assert F._autotune_bench(lambda: None) == 2.0
    assert calls == ["eager", "graph", "eager"]


def test_rebased_descriptor_points_at_the_new_tensor_and_keeps_the_rest():
    from triton.tools.tensor_descriptor import TensorDescriptor

    a, b = torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.ones(32, 64, dtype=torch.float8_e4m3fn)
    d = TensorDescriptor(a, [32, 64], [64, 1], [16, 32])
    r = F._rebased(d, b)
    assert r.base is b and d.base is a, "the template must keep its own base"
    assert {k: v for k, v in vars(r).items() if k != "base"} == {k: v for k, v in vars(d).items() if k != "base"}


@pytest.mark.gpu
def test_gpu_queued_timer_measures_the_kernel_not_the_launch():
    """The autotuner's queued timer against a CUDA-graph replay of the same call: a short GEMM behind a
    slow Python launch (1 ms of host work per call, 10x the kernel) must still time as the kernel."""
    import time as _time

    import triton.testing

    a = torch.randn(512, 6144, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(6144, 6144, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(512, 6144, device="cuda", dtype=torch.bfloat16)

    def slow_launch():
        t0 = _time.perf_counter()
        while _time.perf_counter() - t0 < 1e-3:
            pass
        torch.mm(a, b)

    graph = triton.testing.do_bench_cudagraph(lambda: torch.mm(a, b), rep=50)
    med, lo, hi = F._queued_gpu_time(slow_launch, quantiles=(0.5, 0.2, 0.8))
    assert lo <= med <= hi
    # the graph replays back to back with L2 warm; the queued timer flushes L2 before every call
    assert 0.8 * graph < med < 1.3 * graph, f"queued {med * 1e3:.0f} us vs graph {graph * 1e3:.0f} us"
    assert med < 0.5, f"queued timer measured the 1 ms host launch: {med * 1e3:.0f} us"
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    F._queued_gpu_time(lambda: torch.mm(a, b, out=c), reps=3)
    torch.cuda.synchronize()
    # its 256 MB L2-flush buffer was module-level: 0.25 GiB on every peak after the first autotune (reports/h100)
    assert torch.cuda.memory_allocated() == before, "the timer kept memory allocated after it returned"
