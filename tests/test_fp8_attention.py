"""FP8 flash attention: kernel vs its emulating reference (tight), vs exact fp32 attention (loose, but
able to fail), input validation, and the tiny FLUX.2 model with the fp8 backend. On CPU the kernels run
in Triton's interpreter, whose fp32->fp8 cast is replaced by an exact emulation (see the kernel file);
the hardware cast is checked bit-for-bit by the GPU tests."""

import pytest
import torch
import triton
import triton.language as tl

from flux2_bench.attention import use_backend
from flux2_bench.kernels import fp8_attention as fa
from flux2_bench.kernels.fp8_attention import (
    _exp2_fma,
    attention_fp32_ref,
    fp8_attention,
    fp8_attention_ref,
    quantize_qkv,
    sample_tokens,
)
from flux2_bench.sampling import image_ids, text_ids
from flux2_bench.weights import synthetic_transformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def flux_like(B, H, L, D, *, gain=1.0, offset=2.0, seed=0, device=DEVICE, dtype=torch.float32):
    """Q and K as after FLUX.2's QK-RMSNorm: unit RMS per token times a per-channel learned-scale-like
    factor (gain * U(0.75, 1.25)); K also carries a per-channel offset (removed by the kernel's
    smoothing); V has three outlier channels at 20x. Logit std is about gain**2."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    def factor():
        return gain * (0.75 + 0.5 * torch.rand(H, 1, D, generator=g, device=device))

    q = rms(randn(B, H, L, D)) * factor()
    k = rms(randn(B, H, L, D)) * factor() + offset * randn(H, 1, D)
    v = randn(B, H, L, D)
    v[..., :3] *= 20
    return q.to(dtype), k.to(dtype), v.to(dtype)


def rel_l2(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def describe(out, ref, atol):
    """Failure message: relative L2, NaNs, count and first indices/values of elements beyond atol."""
    diff = (out.float() - ref.float()).abs()
    bad = (diff > atol).nonzero()
    first = [(tuple(i.tolist()), out[tuple(i)].item(), ref[tuple(i)].item()) for i in bad[:4]]
    return (
        f"rel L2 {rel_l2(out, ref):.3e}, max abs {diff.max().item():.3e}, NaNs {out.isnan().sum().item()}, "
        f"{len(bad)}/{diff.numel()} beyond {atol}: first {first}"
    )


# (L, D, qk, pv, scale_block, block_n): aligned, short tail, long tail, 128-token scales with 64-wide
# key tiles (scalar K scale per tile), 64-token scales with 128-wide key tiles (per-column K scale).
CASES = [
    (128, 64, "fp8", "fp8", 64, None),
    (100, 64, "fp8", "fp8", 64, None),
    (130, 128, "fp8", "fp8", 128, None),
    (130, 64, "fp8", "bf16", 64, None),
    (200, 32, "fp8", "fp8", 64, 128),
    (130, 64, "int8", "fp8", 64, None),
    (100, 64, "int8", "bf16", 128, None),
]


@pytest.mark.parametrize("L,D,qk,pv,scale_block,block_n", CASES)
def test_matches_emulating_ref(L, D, qk, pv, scale_block, block_n):
    q, k, v = flux_like(1, 2, L, D, seed=L + D)
    kw = dict(qk=qk, pv=pv, scale_block=scale_block, block_n=block_n)
    out = fp8_attention(q, k, v, **kw)
    ref = fp8_attention_ref(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    # (fp32, rel L2 5e-3, atol 0.05): same quantization, but the K mean is summed in another order, so
    # a K element sitting on an fp8 rounding boundary may round the other way (seen: 1 in 8192 -> 2e-3)
    assert not out.isnan().any() and rel_l2(out, ref) < 5e-3, describe(out, ref, 0.05)
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item(), describe(out, ref, 0.05)


@pytest.mark.parametrize("qk,pv,bound", [("fp8", "fp8", 0.08), ("fp8", "bf16", 0.06), ("int8", "bf16", 0.025)])
def test_close_to_fp32_attention(qk, pv, bound):
    # (fp32 ref, rel L2 8 % / 6 % / 2.5 %): e4m3 keeps 3 mantissa bits, 2.6 % RMS error per element; on
    # random inputs with logit std 1 that is ~4 % output error from Q·K and ~3.5 % more from fp8 P·V
    # (measured 4.1 % and 5.4 %); int8 Q·K with block scales: 1.3 %. Unsmoothed K fails the fp8 cases.
    q, k, v = flux_like(1, 2, 256, 64, gain=1.0)
    out = fp8_attention(q, k, v, qk=qk, pv=pv)
    ref = attention_fp32_ref(q, k, v)
    assert rel_l2(out, ref) < bound, describe(out, ref, 0.5)


def test_k_offset_is_removed():
    # softmax is invariant to a per-channel K offset and the kernel subtracts K's mean: adding a large
    # offset must not change the result beyond the mean's rounding (fp32 sums of different values)
    q, k, v = flux_like(1, 2, 130, 64, offset=0.0)
    base = fp8_attention(q, k, v)
    shifted = fp8_attention(q, k + 50.0 * torch.randn(1, 2, 1, 64, device=DEVICE), v)
    assert rel_l2(shifted, base) < 5e-3, describe(shifted, base, 0.05)


def test_scale_argument():
    q, k, v = flux_like(1, 2, 96, 64)
    out = fp8_attention(q, k, v, scale=0.05)
    ref = attention_fp32_ref(q, k, v, scale=0.05)
    # (fp32 ref, rel L2 8 %): as test_close_to_fp32_attention; the error relative to the output does
    # not shrink with the scale (logit noise and the logit-driven part of the output shrink together)
    assert rel_l2(out, ref) < 0.08, describe(out, ref, 0.5)
    assert rel_l2(out, attention_fp32_ref(q, k, v)) > 0.1  # the scale is really used


def test_bf16_inputs_fp8_path():
    # the fp8 path converts bf16 to fp32 right after loading, so it runs in the interpreter too
    q, k, v = flux_like(1, 2, 100, 64, dtype=torch.bfloat16)
    out = fp8_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = fp8_attention_ref(q, k, v)
    # (bf16 out, rel L2 1e-2): both sides round the same fp32 result to bf16 (2**-9 relative)
    assert rel_l2(out, ref) < 1e-2, describe(out, ref, 0.1)


def test_non_contiguous_heads():
    # the model hands V (and Q, K in other paths) as permuted views of a (B, L, 3, H, D) buffer
    B, H, L, D = 1, 2, 80, 64
    qkv = torch.randn(B, L, 3, H, D, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    out = fp8_attention(q, k, v)
    ref = fp8_attention_ref(q.contiguous(), k.contiguous(), v.contiguous())
    assert rel_l2(out, ref) < 5e-3, describe(out, ref, 0.05)


def test_quantize_qkv_layout():
    q, k, v = flux_like(1, 2, 100, 64)
    quant = quantize_qkv(q, k, v, scale_block=64)
    assert quant["q8"].shape == (1, 2, 128, 64) and quant["q8"].dtype == torch.float8_e4m3fn
    assert quant["vt8"].shape == (1, 2, 64, 128)
    assert quant["qs"].shape == (1, 2, 2) and quant["vs"].shape == (1, 2, 64)
    # padding rows are zero, so unmasked loads in the main loop read nothing stale
    assert (quant["q8"][:, :, 100:].float() == 0).all() and (quant["vt8"][..., 100:].float() == 0).all()
    # dequantized V matches V within e4m3's half-ulp (2**-4 relative) plus the subnormal step
    v_deq = quant["vt8"].float().transpose(-1, -2)[:, :, :100] * quant["vs"][:, :, None, :]
    tol = v.abs() * 2**-4 + quant["vs"][:, :, None, :] * 2**-9
    assert ((v_deq - v).abs() <= tol).all()


def test_sample_tokens():
    assert sample_tokens(100).tolist() == list(range(100))  # short sequences: every token
    idx = sample_tokens(4608)
    assert len(idx) == fa.SAMPLE and idx[0] == 0 and idx[-1] < 4608 and (idx.diff() > 0).all()


def test_long_sequence_uses_the_sample_estimates():
    # L > SAMPLE: K's mean and V's scale estimate come from every 2nd-3rd token; kernel and reference agree
    q, k, v = flux_like(1, 2, 600, 32, seed=5)
    out, ref = fp8_attention(q, k, v), fp8_attention_ref(q, k, v)
    assert rel_l2(out, ref) < 5e-3, describe(out, ref, 0.05)
    quant = quantize_qkv(q, k, v)
    idx = sample_tokens(600)
    est = v[:, :, idx].abs().amax(2) * fa.V_HEADROOM / fa.FP8_MAX  # no token exceeds 64x the sample's max here
    assert torch.equal(quant["vs"], est)


def test_v_outlier_outside_the_sample_is_recast():
    """A token the sample misses, 100x the sampled ones in one channel: the quant kernel's cast saturates it,
    the fixup re-casts the head with the true |max|. The other head is left as the quant kernel wrote it."""
    q, k, v = flux_like(1, 2, 600, 32, seed=6)
    assert 1 not in sample_tokens(600).tolist()
    big = 100.0 * fa.V_HEADROOM * v[0, 0].abs().max()
    v[0, 0, 1, 5] = big
    quant = quantize_qkv(q, k, v)
    assert torch.equal(quant["vs"][0, 0, 5], big / fa.FP8_MAX)
    v_deq = quant["vt8"].float().transpose(-1, -2)[:, :, :600] * quant["vs"][:, :, None, :]
    tol = v.abs() * 2**-4 + quant["vs"][:, :, None, :] * 2**-9
    assert ((v_deq - v).abs() <= tol).all(), "V not within e4m3's half-ulp of the input after the fixup"
    est = v[0, 1, sample_tokens(600)].abs().amax(0) * fa.V_HEADROOM / fa.FP8_MAX
    assert torch.equal(quant["vs"][0, 1], est)
    out, ref = fp8_attention(q, k, v), fp8_attention_ref(q, k, v)
    assert rel_l2(out, ref) < 5e-3, describe(out, ref, 0.05)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(shape=(2, 64, 64)), ValueError, "B, H, L, D"),
        (dict(D=48), ValueError, "head dim"),
        (dict(pv="fp16"), ValueError, "pv must be"),
        (dict(scale_block=32), ValueError, "scale_block"),
        (dict(qk="int4"), ValueError, "qk must be"),
        (dict(dtype=torch.int32), TypeError, "bf16, fp16 or fp32"),
        (dict(k_len=65), ValueError, "shapes differ"),
        (dict(strided=True), ValueError, "contiguous last dim"),
    ],
)
def test_rejects_bad_input(kwargs, err, match):
    D = kwargs.get("D", 64)
    shape = kwargs.get("shape", (1, 2, 64, D))
    dtype = kwargs.get("dtype", torch.float32)
    q = torch.ones(shape, dtype=dtype)
    k = torch.ones(shape[:-2] + (kwargs.get("k_len", shape[-2]), shape[-1]), dtype=dtype)
    v = torch.ones(shape, dtype=dtype)
    if kwargs.get("strided"):
        q = torch.ones(1, 2, D, 64).transpose(-1, -2)
    with pytest.raises(err, match=match):
        fp8_attention(
            q, k, v, pv=kwargs.get("pv", "fp8"), scale_block=kwargs.get("scale_block", 64), qk=kwargs.get("qk", "fp8")
        )


def test_tiny_flux2_with_fp8_backend():
    """The whole tiny model (head dim 32, 64 image + 16 text tokens) through flux2_bench.attention."""
    torch.manual_seed(0)
    model = synthetic_transformer("tiny", dtype=torch.float32)
    cfg = model.config
    img = torch.randn(1, 64, cfg.in_channels)
    txt = torch.randn(1, 16, cfg.context_in_dim)
    args = (img, image_ids(8, 8), txt, text_ids(16), torch.tensor([0.5]), torch.tensor([4.0]))
    with torch.no_grad():
        ref = model(*args)
        with use_backend("fp8"):
            out = model(*args)
    # (fp32 model, rel L2 1e-2): measured 4.5e-4; attention errors of a few % are diluted by the
    # residual stream, and the output differs from SDPA's at all (no silent fallback: > 1e-6)
    err = rel_l2(out, ref)
    assert not out.isnan().any() and 1e-6 < err < 1e-2, f"rel L2 vs SDPA {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("L", [4608, 1000])
def test_gpu_flux_shapes(L):
    """Hardware casts and tiles on FLUX.2 shapes (H=48, D=128): vs the emulating ref and vs fp32."""
    q, k, v = flux_like(1, 48, L, 128, dtype=torch.bfloat16)
    for qk, pv in (("fp8", "fp8"), ("fp8", "bf16"), ("int8", "fp8")):
        out = fp8_attention(q, k, v, qk=qk, pv=pv)
        ref = fp8_attention_ref(q, k, v, qk=qk, pv=pv)
        # (bf16 out, rel L2 1e-2): same quantization; exp2 is approximate on the GPU and P or K can
        # round the other way at fp8 boundaries
        assert rel_l2(out, ref) < 1e-2, describe(out, ref, 0.1)
        assert rel_l2(out, attention_fp32_ref(q, k, v)) < 0.08


@pytest.mark.gpu
def test_gpu_quantize_bit_exact():
    """The in-kernel fp32->e4m3 casts (saturating, round-to-nearest-even) equal torch's, bit for bit."""
    q, k, v = flux_like(1, 4, 1000, 128)
    # every V channel's amax is exactly 448 (token 1, outside the sample, so the fixup re-casts every head) and
    # the sampled tokens stay below 448 / V_HEADROOM: the channel scale is exactly 1 and the kernel casts V itself;
    # values span normals and e4m3 subnormals (|x| < 2**-6)
    v = (torch.rand_like(v) * 2 - 1) * torch.logspace(-4, 0.8, 1000, device=v.device)[:, None]
    v[:, :, 1] = 448.0
    assert 1 not in sample_tokens(1000).tolist()
    quant = quantize_qkv(q, k, v, scale_block=64)
    assert (quant["vs"] == 1.0).all()
    v8 = v.to(torch.float8_e4m3fn)
    got = quant["vt8"].transpose(-1, -2)[:, :, :1000]
    mismatch = (got.view(torch.uint8) != v8.view(torch.uint8)).sum().item()
    assert mismatch == 0, f"{mismatch} of {v8.numel()} V bytes differ from torch's cast"


@triton.jit
def _apply_exp2_fma(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, _exp2_fma(x), mask=offs < n)


def test_exp2_fma_accuracy():
    """`_exp2_fma` (2**x on the FMA pipe): relative error <= 2e-3 (the fitted polynomial's 1.7e-3) for
    normal results, and (near) zero below 2**-126 instead of garbage from exponent underflow."""
    x = torch.cat([torch.linspace(-125.0, 8.0, 4000), torch.tensor([-126.5, -200.0, -1e30])]).to(DEVICE)
    y = torch.empty_like(x)
    _apply_exp2_fma[(1,)](x, y, x.numel(), BLOCK=4096)
    exact = torch.exp2(x.double())
    normal = x >= -125.0
    rel = ((y.double() - exact) / exact)[normal].abs().max().item()
    assert rel < 2e-3, f"max relative error {rel:.2e}"
    assert (y[~normal].abs() < 2.0**-120).all() and (y[~normal] >= 0).all(), y[~normal].tolist()


@pytest.mark.parametrize("L", [128, 200])
def test_exp2_split_matches_mufu_path(L):
    """Half of each tile's exp2 through `_exp2_fma` (EXP_SPLIT) against the all-MUFU kernel: the same
    quantization, P differing by the polynomial's 1.7e-3 before its e4m3 rounding."""
    from flux2_bench.kernels.fp8_attention import fp8_attention_quantized

    q, k, v = flux_like(1, 2, L, 64, seed=3)
    quant = quantize_qkv(q, k, v, pv="fp8")
    base = fp8_attention_quantized(quant, v, exp_split=False)
    split = fp8_attention_quantized(quant, v, exp_split=True)
    # (fp32, rel L2 1e-2): a P element near an e4m3 rounding boundary may round the other way (one
    # e4m3 step is 6-12 %); on random inputs ~2e-3 of the output norm
    assert not split.isnan().any() and rel_l2(split, base) < 1e-2, describe(split, base, 0.05)


def _raw_qk_and_rope(B, H, L, D, dtype, seed=3):
    """q, k as they leave the QKV projection (before QK-norm and RoPE), v, the QKNorm weights and
    FLUX.2's RoPE tables for a text+image sequence (one table for the batch)."""
    from flux2_bench.kernels.qk_rope import rope_cos_sin
    from flux2_bench.model import EmbedND

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device=DEVICE) * 3 for _ in range(3))
    k = k + 2 * torch.randn(1, H, 1, D, generator=g, device=DEVICE)  # a per-channel offset, as in FLUX.2
    qw, kw = (0.5 + torch.rand(D, generator=g, device=DEVICE) for _ in range(2))
    n_txt = L // 3
    ids = torch.cat([text_ids(n_txt), image_ids((L - n_txt + 15) // 16, 16)[:, : L - n_txt]], dim=1)
    pe = EmbedND(2000, (D // 4,) * 4)(ids.to(DEVICE))
    cos, sin = rope_cos_sin(pe)
    return q.to(dtype), k.to(dtype), v.to(dtype), qw.to(dtype), kw.to(dtype), cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L,qk,pv", [(200, "fp8", "fp8"), (130, "int8", "bf16")])
def test_fused_norm_rope_prepass_matches_separate_pass(dtype, L, qk, pv):
    """QK-RMSNorm + RoPE applied while the pre-pass loads Q and K (`norm_rope=`) give the same quantized
    bits, scales and attention output as the separate `qk_norm_rope` pass followed by the plain pre-pass."""
    from flux2_bench.kernels.qk_rope import qk_norm_rope

    B, H, D = 2, 3, 64
    q, k, v, qw, kw, cos, sin = _raw_qk_and_rope(B, H, L, D, dtype)
    qn, kn = qk_norm_rope(q, k, qw, kw, cos, sin)
    fused = quantize_qkv(q, k, v, pv=pv, qk=qk, norm_rope=(qw, kw, cos, sin))
    separate = quantize_qkv(qn, kn, v, pv=pv, qk=qk)
    assert fused.keys() == separate.keys()
    for name in fused:
        a, b = fused[name], separate[name]
        same = a.view(torch.uint8).equal(b.view(torch.uint8)) if a.element_size() == 1 else a.equal(b)
        assert same, f"{name}: fused pre-pass differs from qk_norm_rope + pre-pass"
    out = fp8_attention(q, k, v, pv=pv, qk=qk, norm_rope=(qw, kw, cos, sin))
    assert out.equal(fp8_attention(qn, kn, v, pv=pv, qk=qk))


def test_fused_norm_rope_rejects_bad_tables():
    q, k, v, qw, kw, cos, sin = _raw_qk_and_rope(1, 2, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="cos must be"):
        quantize_qkv(q, k, v, norm_rope=(qw, kw, cos[:, :10], sin[:, :10]))
    with pytest.raises(ValueError, match="norm_rope must be"):
        fp8_attention(q, k, v, norm_rope=(qw, kw, cos))


@pytest.mark.gpu
def test_gpu_fused_norm_rope_prepass_matches_separate_pass():
    """On the GPU in bf16 (the model's dtype) at a FLUX.2 head shape. Not bit for bit: the RMS sum of
    squares is reduced over another thread layout than in qk_norm_rope (a (tokens, D) tile of one head
    instead of a (heads, D) tile of one token), so a normalized value can round to the neighbouring
    bf16 and then e4m3 (reports/fp8_attention/fused_norm_rope.json): a fraction of the fp8 values moves
    by a rounding step; the attention output moves far less than its own error against exact attention
    (~5 %)."""
    from flux2_bench.kernels.qk_rope import qk_norm_rope

    q, k, v, qw, kw, cos, sin = _raw_qk_and_rope(1, 48, 1000, 128, torch.bfloat16)
    qn, kn = qk_norm_rope(q, k, qw, kw, cos, sin)
    fused = quantize_qkv(q, k, v, norm_rope=(qw, kw, cos, sin))
    separate = quantize_qkv(qn, kn, v)
    for name, scale in (("q8", "qs"), ("k8", "ks")):

        def dequant(quant, name=name, scale=scale):
            x = quant[name].float()
            return x * quant[scale].repeat_interleave(x.shape[2] // quant[scale].shape[2], dim=2)[..., None]

        a, b = dequant(fused), dequant(separate)
        differ = (fused[name].float() != separate[name].float()).float().mean().item()
        err = ((a - b).norm() / b.norm()).item()  # e4m3's own rounding is ~2.6 % RMS
        assert err < 0.01, f"{name}: dequantized rel L2 {err:.2e} between the paths, {differ:.2%} values differ"
    out = fp8_attention(q, k, v, norm_rope=(qw, kw, cos, sin))
    ref = fp8_attention(qn, kn, v)
    assert rel_l2(out, ref) < 5e-3, f"fused vs separate attention output: rel L2 {rel_l2(out, ref):.2e}"
