"""kernels/fused_modulate.py against its pure-torch references (the model's unfused eager ops).

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1; the kernels then
round to bf16 / e4m3 in integer arithmetic, so the roundings are exact there too). `pytest -m gpu`
repeats the checks on the FLUX.2-dev shapes with the hardware casts.
"""

import pytest
import torch

from flux2_bench.kernels import fused_modulate as FM
from flux2_bench.kernels.fp8_matmul import quantize_fp8_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (dtype, atol, rtol, max fraction of elements not bit-equal): the kernels round where the eager ops
# round, so the only differences are fp32 reduction-order / exp ulps that move a rounding by one ulp.
TOL = {
    torch.float32: (1e-5, 1e-5, 1.0),  # fp32 output: LN mean/var summation order and rsqrt, ~1e-7 relative
    torch.bfloat16: (0.0, 2.0**-7, 0.01),  # at most 1 bf16 ulp (<= 2^-7 relative), on < 1% of elements
    torch.float16: (0.0, 2.0**-10, 0.01),  # at most 1 fp16 ulp (<= 2^-10 relative), on < 1% of elements
}
# norm_modulate: one ulp of the LayerNorm output y (|y| < 8 here) times (1 + scale) is the absolute error
# a flipped rounding of y carries into shift + y * (1 + scale), whatever the size of the result.
Y_ULP = {torch.float32: 1e-6, torch.bfloat16: 2.0**-5, torch.float16: 2.0**-8}
DTYPES = list(TOL)
QUANTS = [None, "row", "block"]


def assert_close(out, ref, dtype, what="", atol=None):
    """Within (atol, rtol) everywhere and bit-equal on all but a `frac` of elements; the message says
    how many differ, where, and whether there are NaNs. `atol` may be a tensor (per channel)."""
    atol0, rtol, frac = TOL[dtype]
    atol = atol0 if atol is None else atol.float().cpu() + atol0
    out, ref = out.float().cpu(), ref.float().cpu()
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    nan = torch.isnan(out) & ~torch.isnan(ref)
    bad = ((out - ref).abs() > atol + rtol * ref.abs()) | nan
    ne = int((out != ref).sum())
    if bad.any() or ne > frac * out.numel():
        idx = (bad if bad.any() else out != ref).nonzero()[:5].tolist()
        vals = [(tuple(i), out[tuple(i)].item(), ref[tuple(i)].item()) for i in idx]
        pytest.fail(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements outside (atol={float(torch.as_tensor(atol).max()):.3g}, "
            f"rtol={rtol:.3g}), "
            f"{ne} not bit-equal (limit {frac:.0%}), {int(nan.sum())} NaN; first (index, out, ref): {vals}"
        )


def assert_bits_equal(q, ref, what="", max_frac=0.0):
    """fp8 payloads equal bit for bit (or on all but `max_frac` of the values)."""
    qb, rb = q.view(torch.uint8).cpu(), ref.view(torch.uint8).cpu()
    assert q.shape == ref.shape, f"{what}: shape {tuple(q.shape)} != {tuple(ref.shape)}"
    bad = qb != rb
    if int(bad.sum()) > max_frac * bad.numel():
        idx = bad.nonzero()[:5].tolist()
        vals = [(tuple(i), q.float().cpu()[tuple(i)].item(), ref.float().cpu()[tuple(i)].item()) for i in idx]
        pytest.fail(f"{what}: {int(bad.sum())}/{bad.numel()} fp8 values differ; first (index, out, ref): {vals}")


def sqnr_db(x, ref):
    x, ref = x.float(), ref.float()
    return (10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum().clamp(min=1e-30))).item()


def dequant(q, s):
    """(B, L, N) e4m3 and row (B, L, 1) / block (B, L, ceil(N/128)) scales -> fp32."""
    s = s.repeat_interleave(128, -1)[..., : q.shape[-1]] if s.shape[-1] > 1 else s
    return q.float() * s


def check_quant(got, out_plain, ref_plain, dtype, quant, what, row_reduction=False):
    """Quantized kernel output: bit-identical to quantizing the kernel's own x.dtype output (same
    values, same convention), and near the reference's quantization (SQNR of e4m3, ~30 dB floor).

    row_reduction (norm_modulate on the GPU): the quant and plain variants are separate compilations
    whose LayerNorm sums may associate differently, so a rare element moves by one ulp; when it is a
    row's amax, that row's scale and values move too (seen on the H100: 1 row in 4096). Then at most
    one row's scales may differ, and the other rows' values must match but for 1 %."""
    q, s = got
    q_own, s_own = quantize_fp8_ref(out_plain, quant)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous(), f"{what}: q {q.dtype}, contiguous {q.is_contiguous()}"
    assert s.dtype == torch.float32 and s.shape == s_own.shape, f"{what}: s {s.dtype} {tuple(s.shape)}"
    rows_off = (s != s_own).any(-1)
    if row_reduction and not FM._INTERPRET:
        assert int(rows_off.sum()) <= 1, f"{what}: scales of {int(rows_off.sum())}/{rows_off.numel()} rows differ"
        keep = ~rows_off
        assert_bits_equal(q[keep], q_own[keep], f"{what} vs quantize_fp8_ref(kernel output)", max_frac=0.01)
    else:
        assert not rows_off.any(), f"{what}: {int((s != s_own).sum())}/{s.numel()} scales differ"
        assert_bits_equal(q, q_own, f"{what} vs quantize_fp8_ref(kernel output)")
    q_ref, s_ref = quantize_fp8_ref(ref_plain, quant)
    assert_bits_equal(q, q_ref, f"{what} vs ref", max_frac=TOL[dtype][2] if dtype != torch.float32 else 0.05)
    db = sqnr_db(dequant(q, s), ref_plain)
    assert db > 28.0, f"{what}: dequantized SQNR {db:.1f} dB below the 28 dB floor of e4m3 (3 mantissa bits)"


def make_mod(B, C, dtype, kind):
    """shift, scale as the model slices them: (B, 1, C) views into one (B, 1, 3C) modulation output."""
    mod = torch.randn(B, 1, 3 * C, device=DEV).to(dtype) * 0.5
    shift, scale, _ = mod.chunk(3, dim=-1)
    if kind == "1,1,C":
        return shift[:1], scale[:1]
    if kind == "C":
        return shift[0, 0].float(), scale[0, 0].float()  # fp32 modulation on a bf16/fp16 x: cast inside
    return shift, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [96, 200])
@pytest.mark.parametrize("quant", QUANTS)
def test_norm_modulate(dtype, C, quant):
    B, L = 2, 5
    big = torch.randn(B, 2 * L, C + 16, device=DEV) * 2 + 0.3
    x = big[:, ::2, :C].to(dtype) if dtype == torch.float32 else big.to(dtype)[:, ::2, :C]  # strided rows
    x[1, 3] = 0.5  # a constant row (exact mean in any summation order): variance 0, LN output 0, out = shift
    shift, scale = make_mod(B, C, dtype, "B,1,C")
    out = FM.norm_modulate(x, shift, scale)
    ref = FM.norm_modulate_ref(x, shift, scale)
    assert out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out[1, 3], shift[1, 0]), "constant row: LN output is exactly 0, so out must equal shift"
    # The constant row is left out of the comparison with torch: on the H100 its fp32 LayerNorm (Welford
    # partial means merged with weights n_a/n, n_b/n that need not sum to 1 in fp32) leaves an ulp in the
    # mean that 1/sqrt(eps) = 1000 amplifies to ~1e-4 in y.
    keep = torch.ones(B, L, dtype=torch.bool, device=DEV)
    keep[1, 3] = False
    atol = (Y_ULP[dtype] * (1 + scale.abs())).expand(B, L, C)[keep]
    assert_close(out[keep], ref[keep], dtype, f"norm_modulate {dtype} C={C}", atol=atol)
    if quant is not None:
        got = FM.norm_modulate(x, shift, scale, quant=quant)
        what = f"norm_modulate {quant} {dtype} C={C}"
        check_quant(got, out, ref, dtype, quant, what, row_reduction=True)


@pytest.mark.parametrize("kind", ["1,1,C", "C"])
def test_norm_modulate_broadcast_modulation(kind):
    """Modulation shared by the batch, (1, 1, C) or (C,) (fp32 on a bf16 x: cast to bf16 first)."""
    B, L, C = 2, 3, 136
    x = (torch.randn(B, L, C, device=DEV) * 3).to(torch.bfloat16)
    shift, scale = make_mod(B, C, torch.bfloat16, kind)
    out = FM.norm_modulate(x, shift, scale, eps=1e-5)
    ref = FM.norm_modulate_ref(x, shift, scale, eps=1e-5)
    atol = Y_ULP[torch.bfloat16] * (1 + scale.to(torch.bfloat16).abs())
    assert_close(out, ref, torch.bfloat16, f"norm_modulate shift {kind}", atol=atol)
    assert torch.equal(out[0], FM.norm_modulate(x[:1], shift, scale, eps=1e-5)[0]), "batch rows are independent"


def test_norm_modulate_uses_each_batch_modulation():
    """B=2 with different shift/scale per batch: swapping the modulation rows swaps the outputs."""
    B, L, C = 2, 4, 64
    x = torch.randn(1, L, C, device=DEV).expand(B, L, C).to(torch.float32)
    shift, scale = make_mod(B, C, torch.float32, "B,1,C")
    out = FM.norm_modulate(x, shift, scale)
    assert (out[0] - out[1]).abs().max() > 0.1, "both batches got the same modulation"
    swapped = FM.norm_modulate(x, shift.flip(0), scale.flip(0))
    assert torch.equal(out, swapped.flip(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", QUANTS)
def test_swiglu_no_prefix(dtype, quant):
    """x as the single block's `mlp` split of linear1's output: rows strided, last dim contiguous."""
    B, L, Fh = 2, 3, 100
    lin1 = (torch.randn(B, L, 48 + 2 * Fh, device=DEV) * 3).to(dtype)
    x = lin1[..., 48:]
    out = FM.swiglu(x)
    ref = FM.swiglu_ref(x)
    assert out.shape == (B, L, Fh) and out.dtype == dtype
    assert_close(out, ref, dtype, f"swiglu {dtype}")
    if quant is not None:
        check_quant(FM.swiglu(x, quant=quant), out, ref, dtype, quant, f"swiglu {quant} {dtype}")


@pytest.mark.parametrize("shape", [(7, 64), (64,), (2, 2, 3, 40)])
def test_swiglu_other_ranks(shape):
    x = torch.randn(*shape, device=DEV, dtype=torch.bfloat16)
    out, s = FM.swiglu(x, quant="row")
    ref = FM.swiglu_ref(x)
    assert out.shape == ref.shape and s.shape == (*shape[:-1], 1)
    check_quant((out, s), FM.swiglu(x), ref, torch.bfloat16, "row", f"swiglu {shape}")


@pytest.mark.parametrize("prefix_kind", ["3d", "4d-transpose"])
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_prefix(prefix_kind, quant, dtype):
    """cat([prefix.flatten(2), silu(gate) * value]); P = 96 is not a multiple of 128, so the
    first 1x128 block straddles the prefix and the SwiGLU part."""
    B, L, H, D, Fh = 2, 5, 3, 32, 100
    x = (torch.randn(B, L, 2 * Fh, device=DEV) * 2).to(dtype)
    if prefix_kind == "3d":
        prefix = (torch.randn(B, L, H * D + 8, device=DEV)).to(dtype)[..., : H * D]  # strided rows
    else:
        prefix = torch.randn(B, H, L, D, device=DEV).to(dtype).transpose(1, 2)  # SDPA output (B, L, H, D)
    prefix[0, 1] = 50.0  # an outlier row: the row amax must see the prefix
    out = FM.swiglu(x, prefix=prefix)
    ref = FM.swiglu_ref(x, prefix=prefix)
    assert out.shape == (B, L, H * D + Fh)
    assert torch.equal(out[..., : H * D].cpu(), prefix.flatten(2).cpu()), "prefix must be copied exactly"
    assert_close(out, ref, dtype, f"swiglu prefix {prefix_kind} {dtype}")
    if quant is not None:
        got = FM.swiglu(x, prefix=prefix, quant=quant)
        check_quant(got, out, ref, dtype, quant, f"swiglu prefix {prefix_kind} {quant} {dtype}")
        if quant == "row":
            assert torch.allclose(got[1][0, 1], torch.tensor(50.0 / 448, device=DEV)), "row scale ignores the prefix"


# Launch configurations that must all give the same bits: chunk narrower than the row (several
# chunks, a chunk straddling the prefix end, a masked tail), several rows per persistent program, and
# the scratch-row variant of quant="row".
CONFIGS = [
    FM.SwigluConfig(block=128, warps=4, programs_per_sm=1, use_tmp=False),
    FM.SwigluConfig(block=256, warps=2, programs_per_sm=2, use_tmp=True),
]


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("config", CONFIGS, ids=["b128", "b256-tmp"])
def test_swiglu_chunked_configs(config, quant):
    """P = 160 (a chunk wholly inside the prefix, then one straddling it), F = 300 (masked tail);
    7 rows over 3-6 persistent programs. Bit-identical to the default launch and to the eager ops'
    roundings; quant matches quantize_fp8_ref of the plain output."""
    B, L, H, D, Fh = 1, 7, 5, 32, 300
    dtype = torch.float16  # exact bf16-like roundings in the interpreter too, and a second activation dtype
    x = (torch.randn(B, L, 2 * Fh, device=DEV) * 3).to(dtype)
    prefix = torch.randn(B, H, L, D, device=DEV).to(dtype).transpose(1, 2)
    prefix[0, 4, 1, 7] = -70.0  # row 4's amax sits in the first (prefix-only) chunk
    ref = FM.swiglu_ref(x, prefix=prefix)
    plain = FM._swiglu(x, prefix=prefix, config=config)
    assert_close(plain, ref, dtype, f"swiglu {config}")
    assert torch.equal(plain, FM.swiglu(x, prefix=prefix)), f"{config}: bits differ from the default launch"
    if quant is not None:
        got = FM._swiglu(x, prefix=prefix, quant=quant, config=config)
        check_quant(got, plain, ref, dtype, quant, f"swiglu {quant} {config}")
        if quant == "row":
            assert got[1][0, 4, 0].item() == 70.0 / 448, "row scale misses the prefix-only chunk"


def test_swiglu_long_row():
    """A row longer than the old 32768-element register tile (and than one chunk): row quant."""
    x = torch.randn(2, 2 * 33000, device=DEV) * 2
    q, s = FM._swiglu(x, quant="row", config=FM.SwigluConfig(block=8192))
    ref = FM.swiglu_ref(x)
    check_quant((q, s), FM._swiglu(x, config=FM.SwigluConfig(block=8192)), ref, torch.float32, "row", "long row")


def test_empty_rows():
    x = torch.randn(2, 0, 64, device=DEV)
    assert FM.norm_modulate(x, torch.zeros(64, device=DEV), torch.zeros(64, device=DEV)).shape == (2, 0, 64)
    q, s = FM.swiglu(torch.randn(0, 64, device=DEV), quant="block")
    assert q.shape == (0, 32) and s.shape == (0, 1)


def _bad(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_input_errors():
    x = torch.randn(2, 3, 64, device=DEV)
    sh = torch.zeros(2, 1, 64, device=DEV)
    nm, sg = FM.norm_modulate, FM.swiglu
    _bad(lambda: nm(x.to(torch.int32), sh, sh), TypeError, "bf16, fp16 or fp32, got torch.int32")
    _bad(lambda: nm(x[0], sh, sh), ValueError, r"\(B, L, C\).*\(3, 64\)")
    _bad(lambda: nm(x.transpose(1, 2), sh[..., :3], sh[..., :3]), ValueError, "contiguous in its last dim")
    _bad(lambda: nm(x, torch.zeros(3, 1, 64), sh), ValueError, r"shift must have shape \(2, 1, 64\).*\(3, 1, 64\)")
    _bad(lambda: nm(x, sh, torch.zeros(2, 64)), ValueError, r"scale must have shape.*\(2, 64\)")
    _bad(lambda: nm(x, sh, torch.zeros(2, 1, 64, dtype=torch.int64)), TypeError, "scale must be a float")
    _bad(lambda: nm(x, sh, sh, quant="tensor"), ValueError, "quant must be one of.*'tensor'")
    _bad(lambda: nm(x, sh, sh, eps=-1.0), ValueError, "eps")
    _bad(lambda: nm(torch.zeros(1, 1, 40000), torch.zeros(40000), torch.zeros(40000)), ValueError, "40000.*32768")
    _bad(lambda: sg(torch.randn(2, 3, 63)), ValueError, r"even.*\(2, 3, 63\)")
    _bad(lambda: sg(x, prefix=torch.randn(2, 4, 8)), ValueError, r"\(B, L\) = \(2, 3\).*\(2, 4, 8\)")
    _bad(lambda: sg(x, prefix=torch.randn(2, 3, 8, dtype=torch.float16)), TypeError, "prefix dtype torch.float16")
    _bad(lambda: sg(x[0], prefix=torch.randn(3, 8)), ValueError, r"x must be \(B, L, 2F\)")
    _bad(lambda: sg(x, prefix=torch.randn(2, 8, 3).transpose(1, 2)), ValueError, "prefix must be contiguous")
    _bad(lambda: FM._swiglu(x, config=FM.SwigluConfig(block=192)), ValueError, "power of two >= 128, got 192")


# ---------------------------------------------------------------------------------------------
# GPU: FLUX.2-dev shapes (1 batch, 4608 image + 512 text rows, C = 6144, F = 18432, 48 heads x 128)
# ---------------------------------------------------------------------------------------------


def _ulps_bf16(a, b):
    """|a - b| in bf16 ulps (ordered integer distance of the bit patterns)."""

    def ordered(t):
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return (ordered(a) - ordered(b)).abs()


def _check_gpu(out, ref, got_row, what, scale=None):
    """bf16 output: bit-equal to the eager ops on > 99.9 % of elements; the rest within one ulp (SwiGLU:
    two, the product of a flipped silu rounding) or, for norm_modulate, one ulp of the LayerNorm
    output times (1 + scale) (|y| < 16 at these sizes: ulp <= 2^-4). fp8 row output: bit-identical to
    quantize_fp8_ref of the kernel's own bf16 output (norm_modulate: but for <= 1e-4, LayerNorm sums
    associating differently in the quant variant; the H100 run showed 5 in 31M), and to the eager
    chain's but for <= 1e-4."""
    ulps = _ulps_bf16(out, ref)
    frac = (ulps > 0).float().mean().item()
    assert frac < 1e-3, f"{what}: {frac:.2e} of the elements differ from the eager ops (max {ulps.max().item()} ulp)"
    if scale is None:
        assert ulps.max().item() <= 2, f"{what}: max {ulps.max().item()} ulp, {int((ulps > 2).sum())} elements > 2"
    else:
        err = (out.float() - ref.float()).abs()
        bad = err > 2.0**-7 * ref.float().abs() + 2.0**-4 * (1 + scale.float().abs())
        assert not bad.any(), f"{what}: {int(bad.sum())} elements beyond one ulp of y; max err {err.max().item():.3g}"
    q, s = got_row
    q_own, s_own = quantize_fp8_ref(out, "row")
    if scale is None:  # SwiGLU: no reduction before the rounding, so the variants agree exactly
        assert torch.equal(s, s_own), f"{what}: row scales differ from quantize_fp8_ref(kernel output)"
        assert_bits_equal(q, q_own, f"{what} row vs quantize_fp8_ref(kernel output)")
    else:  # LayerNorm sums may associate differently in the quant variant (see check_quant)
        rows_off = (s != s_own).any(-1)
        assert rows_off.float().mean() < 1e-3, f"{what}: scales of {int(rows_off.sum())} rows differ"
        assert_bits_equal(q, q_own, f"{what} row vs quantize_fp8_ref(kernel output)", max_frac=1e-4)
    assert_bits_equal(q, quantize_fp8_ref(ref, "row")[0], f"{what} row vs ref", max_frac=1e-4)


@pytest.mark.gpu
def test_flux2_dev_shapes_gpu():
    B, L, C, H, D, Fh = 1, 4608 + 512, 6144, 48, 128, 18432
    x = torch.randn(B, L, C, device="cuda", dtype=torch.bfloat16) * 2 + 0.1
    mod = torch.randn(B, 1, 3 * C, device="cuda", dtype=torch.bfloat16)
    shift, scale, _ = mod.chunk(3, dim=-1)
    out = FM.norm_modulate(x, shift, scale)
    ref = FM.norm_modulate_ref(x, shift, scale)
    _check_gpu(out, ref, FM.norm_modulate(x, shift, scale, quant="row"), "norm_modulate", scale=scale)

    lin1 = torch.randn(B, L, 3 * C + 2 * Fh, device="cuda", dtype=torch.bfloat16) * 2
    mlp = lin1[..., 3 * C :]
    prefix = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    out = FM.swiglu(mlp, prefix=prefix)
    ref = FM.swiglu_ref(mlp, prefix=prefix)
    _check_gpu(out, ref, FM.swiglu(mlp, prefix=prefix, quant="row"), "swiglu+prefix")
    qb, sb = FM.swiglu(mlp, prefix=prefix, quant="block")
    qr, sr = quantize_fp8_ref(out, "block")
    assert torch.equal(sb, sr), "block scales differ from quantize_fp8_ref(kernel output)"
    assert_bits_equal(qb, qr, "swiglu+prefix block vs quantize_fp8_ref(kernel output)")
    for cfg in (
        FM.SwigluConfig(block=1024, warps=4, programs_per_sm=2),
        FM.SwigluConfig(block=4096, warps=8, programs_per_sm=8, use_tmp=True),
    ):  # other launch configurations: the same bits on the hardware
        assert torch.equal(FM._swiglu(mlp, prefix=prefix, config=cfg), out), f"{cfg}: plain output differs"
        for q in ("row", "block"):
            qc, sc = FM._swiglu(mlp, prefix=prefix, quant=q, config=cfg)
            qd, sd = FM.swiglu(mlp, prefix=prefix, quant=q)
            assert torch.equal(sc, sd), f"{cfg} {q}: scales differ from the default launch"
            assert_bits_equal(qc, qd, f"{cfg} {q} vs the default launch")
