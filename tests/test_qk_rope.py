"""kernels/qk_rope.py: fused QK-RMSNorm + RoPE against the model's unfused ops and near-exact math.

Inputs are what the model feeds: strided (B, H, L, D) views of a (B, L, 3*H*D) QKV output (from
model._split_heads) and RoPE tables from model.EmbedND over sampling's text-then-image ids.

Error bounds are per rotation pair: RoPE preserves the norm of each pair (y[2j], y[2j+1]), so an
error made before the rotation (a flipped rounding of y) moves an output element by at most that
error measured against the pair's norm, wherever the element itself sits (near zero included).
"""

from __future__ import annotations

import pytest
import torch

from flux2_bench.kernels.qk_rope import (
    joint_buffers,
    qk_norm_rope,
    qk_norm_rope_fp32_ref,
    qk_norm_rope_ref,
    rope_cos_sin,
)
from flux2_bench.model import EmbedND, _split_heads
from flux2_bench.sampling import image_ids, text_ids

# unit roundoff u (half the spacing at 1): bf16 2^-8, fp16 2^-11, fp32 2^-24
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}

# vs the model's unfused ops, (dtype, atol per unit of pair norm, min bit-exact fraction):
# the kernel rounds at the same points as the model, so only a changed fp32 summation order or rsqrt
# can flip an intermediate rounding: 1 ulp (<= 2u of the value) on y0 and on y1 plus 1 ulp on the output,
# 2u*sqrt(2) + 2u < 6u of the pair norm. Flips are rare, so most elements must be bit-identical
# (fp32 has no rounding to hide fp32 reassociation, so no bit-exact floor there; 6u in fp32 is 3.6e-7).
VS_MODEL = {
    torch.bfloat16: (torch.bfloat16, 6 * UNIT[torch.bfloat16], 0.99),
    torch.float16: (torch.float16, 6 * UNIT[torch.float16], 0.99),
    torch.float32: (torch.float32, 64 * UNIT[torch.float32], 0.0),  # fp32 ulps of sum order and rsqrt
}
# vs near-exact math (fp64, one rounding): three roundings (norm, * weight, output), each <= u of its
# value, so <= 3u of the pair norm; +1u for the fp32 cos/sin tables and fp32 arithmetic.
VS_EXACT_UNITS = 4


def _rope_tables(B: int, n_txt: int, grid: tuple[int, int], axes: tuple[int, ...]):
    ids = torch.cat([text_ids(n_txt, batch=B), image_ids(*grid, batch=B)], dim=1)  # text first, as the model
    return rope_cos_sin(EmbedND(2000, axes)(ids))


def _qkv(B: int, H: int, L: int, D: int, dtype: torch.dtype):
    """Strided Q/K/V views of a (B, L, 3*H*D) projection output, not zero-mean, with outlier channels."""
    qkv = torch.randn(B, L, 3 * H * D) * 1.5 + 0.2
    qkv[..., ::37] *= 6
    q, k, v = _split_heads(qkv.to(dtype), H)
    return q, k, v


def _weights(D: int, dtype: torch.dtype):
    return (1 + 0.4 * torch.randn(D)).to(dtype), (0.8 + 0.3 * torch.randn(D)).to(dtype)


def _pair_norm(x: torch.Tensor) -> torch.Tensor:
    """Per element, the norm of its rotation pair (same shape as x)."""
    p = x.double().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True)
    return p.expand(*p.shape[:-1], 2).flatten(-2)


def _check_pairs(name: str, out: torch.Tensor, ref: torch.Tensor, units: float, min_exact: float = 0.0):
    """|out - ref| <= units * pair_norm(ref) everywhere, at least min_exact of the elements bit-identical."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (name, out.shape, ref.shape, out.dtype, ref.dtype)
    assert not out.isnan().any(), (
        f"{name}: {int(out.isnan().sum())} NaNs, first at {out.isnan().nonzero()[:3].tolist()}"
    )
    err = (out.double() - ref.double()).abs()
    bound = units * _pair_norm(ref) + 1e-30
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = float((err / bound).max())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{out.numel()} elements beyond {units:.3g} x pair norm "
            f"(worst {worst:.2f}x the bound); first {idx}: out {[float(out[tuple(i)]) for i in idx]} "
            f"ref {[float(ref[tuple(i)]) for i in idx]}"
        )
    exact = float((out == ref).double().mean())
    assert exact >= min_exact, f"{name}: only {exact:.4f} of elements bit-identical to the reference (< {min_exact})"


def _rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def _check_all(outs, refs, exacts, dtype):
    dt, units, min_exact = VS_MODEL[dtype]
    for name, o, r, e in zip(("q", "k"), outs, refs, exacts, strict=True):
        assert o.dtype == dt
        _check_pairs(f"{name} vs model ops", o, r, units, min_exact)
        _check_pairs(f"{name} vs exact", o, e, VS_EXACT_UNITS * UNIT[dtype])
        # not less accurate than the unfused model path (same roundings; 2% slack for the rare flips)
        assert _rel_l2(o, e) <= 1.02 * _rel_l2(r, e) + 1e-12, (name, _rel_l2(o, e), _rel_l2(r, e))


CASES = [  # dtype, B, H, n_txt, image grid, D, axes   (L = n_txt + h*w: 37)
    (torch.bfloat16, 2, 3, 5, (4, 8), 32, (8, 8, 8, 8)),  # the tiny preset's head dim
    (torch.bfloat16, 1, 4, 5, (4, 8), 128, (32, 32, 32, 32)),  # FLUX.2's head dim
    (torch.float16, 1, 2, 9, (4, 7), 32, (8, 8, 8, 8)),
    (torch.float32, 1, 2, 9, (4, 7), 128, (32, 32, 32, 32)),
    (torch.bfloat16, 1, 3, 3, (2, 4), 48, (8, 8, 16, 16)),  # D not a power of two: masked tail
]


@pytest.mark.parametrize("dtype,B,H,n_txt,grid,D,axes", CASES)
def test_matches_model_ops(dtype, B, H, n_txt, grid, D, axes):
    cos, sin = _rope_tables(B, n_txt, grid, axes)
    L = cos.shape[1]
    q, k, _ = _qkv(B, H, L, D, dtype)
    qw, kw = _weights(D, dtype)
    outs = qk_norm_rope(q, k, qw, kw, cos, sin)
    # default outputs: physical (B, L, H, D), so attention's transpose(1, 2).flatten(2) is free
    for o in outs:
        assert o.shape == (B, H, L, D) and o.transpose(1, 2).is_contiguous(), o.stride()
    refs = qk_norm_rope_ref(q, k, qw, kw, cos, sin)
    exacts = qk_norm_rope_fp32_ref(q, k, qw, kw, cos, sin)
    _check_all(outs, refs, exacts, dtype)


def test_ref_is_the_model():
    """qk_norm_rope_ref == the model's QKNorm + attention.apply_rope on EmbedND's pe, bit for bit."""
    from flux2_bench.attention import apply_rope
    from flux2_bench.model import QKNorm

    B, H, D, axes = 2, 2, 32, (8, 8, 8, 8)
    ids = torch.cat([text_ids(4, batch=B), image_ids(3, 5, batch=B)], dim=1)
    pe = EmbedND(2000, axes)(ids)
    q, k, v = _qkv(B, H, ids.shape[1], D, torch.bfloat16)
    norm = QKNorm(D).to(torch.bfloat16)
    with torch.no_grad():
        norm.query_norm.scale.copy_(1 + 0.4 * torch.randn(D))
        norm.key_norm.scale.copy_(1 + 0.4 * torch.randn(D))
        model_q, model_k = apply_rope(*norm(q, k, v), pe)
    ref_q, ref_k = qk_norm_rope_ref(q, k, norm.query_norm.scale, norm.key_norm.scale, *rope_cos_sin(pe))
    assert torch.equal(ref_q, model_q) and torch.equal(ref_k, model_k)


def test_joint_buffer_with_v_copy():
    """The double-stream block: txt then img written into slices of one joint (B, L, H, D) buffer, V copied."""
    dtype, B, H, D, axes, n_txt, grid = torch.bfloat16, 2, 2, 32, (8, 8, 8, 8), 7, (5, 6)
    cos, sin = _rope_tables(B, n_txt, grid, axes)
    L = cos.shape[1]
    n_img = L - n_txt
    tq, tk, tv = _qkv(B, H, n_txt, D, dtype)
    iq, ik, iv = _qkv(B, H, n_img, D, dtype)
    (tqw, tkw), (iqw, ikw) = _weights(D, dtype), _weights(D, dtype)

    joint = joint_buffers(B, H, L, D, dtype=dtype, device="cpu")
    for buf in joint:
        assert buf.shape == (B, H, L, D) and buf.transpose(1, 2).is_contiguous()
        buf.fill_(float("nan"))
    txt_out = tuple(buf[:, :, :n_txt] for buf in joint)
    img_out = tuple(buf[:, :, n_txt:] for buf in joint)

    ret = qk_norm_rope(tq, tk, tqw, tkw, cos[:, :n_txt], sin[:, :n_txt], v=tv, out=txt_out)
    assert all(r.data_ptr() == o.data_ptr() for r, o in zip(ret, txt_out, strict=True))
    assert all(buf[:, :, n_txt:].isnan().all() for buf in joint), "the txt call wrote outside its slice"
    qk_norm_rope(iq, ik, iqw, ikw, cos[:, n_txt:], sin[:, n_txt:], v=iv, out=img_out)

    ref = joint_buffers(B, H, L, D, dtype=dtype, device="cpu")
    qk_norm_rope_ref(tq, tk, tqw, tkw, cos[:, :n_txt], sin[:, :n_txt], v=tv, out=tuple(b[:, :, :n_txt] for b in ref))
    qk_norm_rope_ref(iq, ik, iqw, ikw, cos[:, n_txt:], sin[:, n_txt:], v=iv, out=tuple(b[:, :, n_txt:] for b in ref))
    # the model's path: per-stream norm, torch.cat along L, then RoPE on the joint sequence
    exact = [
        torch.cat(p, dim=2)
        for p in zip(
            qk_norm_rope_fp32_ref(tq, tk, tqw, tkw, cos[:, :n_txt], sin[:, :n_txt]),
            qk_norm_rope_fp32_ref(iq, ik, iqw, ikw, cos[:, n_txt:], sin[:, n_txt:]),
            strict=True,
        )
    ]
    _check_all(joint[:2], ref[:2], exact, dtype)
    assert torch.equal(joint[2], torch.cat((tv, iv), dim=2)), "v was not copied bit for bit"


def test_batch_shared_table_and_in_place():
    """cos/sin with batch 1 broadcast over B=2; out=(q, k) normalizes in place."""
    dtype, B, H, D = torch.bfloat16, 2, 2, 32
    cos, sin = _rope_tables(1, 3, (3, 4), (8, 8, 8, 8))
    L = cos.shape[1]
    q, k, _ = _qkv(B, H, L, D, dtype)
    qw, kw = _weights(D, dtype)
    refs = qk_norm_rope_ref(q, k, qw, kw, cos, sin)
    exacts = qk_norm_rope_fp32_ref(q, k, qw, kw, cos, sin)
    outs = qk_norm_rope(q, k, qw, kw, cos, sin, out=(q, k))
    assert outs[0] is q and outs[1] is k
    _check_all((q, k), refs, exacts, dtype)


def test_v_without_out_allocates_v_out():
    dtype, B, H, D = torch.float16, 1, 2, 32
    cos, sin = _rope_tables(B, 2, (2, 3), (8, 8, 8, 8))
    q, k, v = _qkv(B, H, cos.shape[1], D, dtype)
    qw, kw = _weights(D, dtype)
    qo, ko, vo = qk_norm_rope(q, k, qw, kw, cos, sin, v=v)
    assert torch.equal(vo, v) and vo.transpose(1, 2).is_contiguous()
    _check_all((qo, ko), qk_norm_rope_ref(q, k, qw, kw, cos, sin), qk_norm_rope_fp32_ref(q, k, qw, kw, cos, sin), dtype)


def test_rope_cos_sin_matches_pe():
    pe = EmbedND(2000, (8, 8, 8, 8))(torch.cat([text_ids(3), image_ids(2, 3)], dim=1))
    cos, sin = rope_cos_sin(pe)
    assert cos.shape == sin.shape == (1, 9, 16) and cos.is_contiguous() and sin.is_contiguous()
    assert torch.equal(cos, pe[:, 0, ..., 1, 1]) and torch.equal(sin, -pe[:, 0, ..., 0, 1])
    with pytest.raises(ValueError, match=r"\(B, 1, L, D/2, 2, 2\)"):
        rope_cos_sin(pe[:, 0])
    with pytest.raises(TypeError, match="float32"):
        rope_cos_sin(pe.double())


def _args(B=1, H=2, L=5, D=32, dtype=torch.bfloat16):
    q, k, v = _qkv(B, H, L, D, dtype)
    qw, kw = _weights(D, dtype)
    cos, sin = torch.rand(1, L, D // 2), torch.rand(1, L, D // 2)
    return q, k, v, qw, kw, cos, sin


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=a["q"][..., :31], k=a["k"][..., :31]), ValueError, "even"),
        (lambda a: a.update(k=a["k"][:, :1]), ValueError, r"k shape \(1, 1, 5, 32\) != q shape \(1, 2, 5, 32\)"),
        (lambda a: a.update(k=a["k"].half()), TypeError, "k dtype torch.float16 != q dtype torch.bfloat16"),
        (lambda a: a.update(q=a["q"].int(), k=a["k"].int()), TypeError, "q dtype must be one of"),
        (lambda a: a.update(q=a["q"][0], k=a["k"][0]), ValueError, r"q must be \(B, H, L, D\)"),
        (lambda a: a.update(q_weight=a["q_weight"][:16]), ValueError, r"q_weight must be \(32,\), got shape \(16,\)"),
        (lambda a: a.update(cos=a["cos"][:, :4]), ValueError, r"cos must be \(1 or 1, 5, 16\).*got \(1, 4, 16\)"),
        (lambda a: a.update(sin=a["sin"].half()), TypeError, "sin must be float32"),
        (lambda a: a.update(out=(a["q"].clone(),)), ValueError, "out must be a tuple"),
        (lambda a: a.update(out=(a["q"].clone(), a["k"].clone(), a["_v"].clone())), ValueError, "v is None"),
        (lambda a: a.update(v=a["_v"], out=(a["q"].clone(), a["k"].clone())), ValueError, "no v_out entry"),
        (
            lambda a: a.update(out=(a["q"].clone(), a["k"][:, :, :4].clone())),
            ValueError,
            r"k_out must be \(1, 2, 5, 32\)",
        ),
        (lambda a: a.update(out=(a["q"].float(), a["k"].clone())), ValueError, r"q_out must be .* torch.bfloat16"),
        (lambda a: a.update(v=a["_v"][:, :, :4]), ValueError, "v must match q"),
    ],
)
def test_bad_input(mutate, exc, match):
    q, k, v, qw, kw, cos, sin = _args()
    a = {"q": q, "k": k, "q_weight": qw, "k_weight": kw, "cos": cos, "sin": sin, "_v": v}
    mutate(a)
    a.pop("_v")
    with pytest.raises(exc, match=match):
        qk_norm_rope(**a)


def test_bad_input_strides_and_head_dim():
    q, k, v, qw, kw, cos, sin = _args(L=4, D=4)
    # a (B, H, L, D) view whose last dim is strided (every other element)
    wide = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)[..., ::2]
    with pytest.raises(ValueError, match=r"q needs a contiguous last dim, got strides \(64, 32, 8, 2\)"):
        qk_norm_rope(wide, k, qw, kw, cos, sin)
    big = torch.randn(1, 1, 2, 258, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 256, got 258"):
        qk_norm_rope(big, big, torch.ones(258), torch.ones(258), torch.rand(1, 2, 129), torch.rand(1, 2, 129))


@pytest.mark.gpu
def test_flux2_dev_shapes_gpu():
    """FLUX.2-dev: single block (B=1, H=48, L=5120, D=128) and a double block into a joint buffer."""
    dtype, B, H, D, n_txt, grid = torch.bfloat16, 1, 48, 128, 512, (72, 64)
    cos, sin = (t.cuda() for t in _rope_tables(B, n_txt, grid, (32, 32, 32, 32)))
    L = cos.shape[1]
    assert L == 5120
    q, k, v = (t.cuda() for t in _qkv(B, H, L, D, dtype))
    qw, kw = (w.cuda() for w in _weights(D, dtype))
    outs = qk_norm_rope(q, k, qw, kw, cos, sin)
    torch.cuda.synchronize()
    _check_all(outs, qk_norm_rope_ref(q, k, qw, kw, cos, sin), qk_norm_rope_fp32_ref(q, k, qw, kw, cos, sin), dtype)

    joint = joint_buffers(B, H, L, D, dtype=dtype, device="cuda")
    ref = joint_buffers(B, H, L, D, dtype=dtype, device="cuda")
    for sl in (slice(0, n_txt), slice(n_txt, L)):
        args = (q[:, :, sl], k[:, :, sl], qw, kw, cos[:, sl], sin[:, sl])
        qk_norm_rope(*args, v=v[:, :, sl], out=tuple(b[:, :, sl] for b in joint))
        qk_norm_rope_ref(*args, v=v[:, :, sl], out=tuple(b[:, :, sl] for b in ref))
    torch.cuda.synchronize()
    dt, units, min_exact = VS_MODEL[dtype]
    for name, o, r in zip("qk", joint[:2], ref[:2], strict=True):
        _check_pairs(f"joint {name}", o, r, units, min_exact)
    assert torch.equal(joint[2], v)
