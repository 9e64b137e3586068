"""The warp-specialized sm_90 FP8 attention kernel (kernels/fp8_attention_sm90.py): validation on the CPU; on an
H100 the maths against the emulating reference with the same key tiling, the Triton kernel and fp32 attention,
on ragged and FLUX.2 lengths, every schedule and scale layout."""

import pytest
import torch
from test_fp8_attention import describe, flux_like, rel_l2

from flux2_bench.kernels import fp8_attention as FA
from flux2_bench.kernels import fp8_attention_sm90 as A
from flux2_bench.kernels.fp8_attention import (
    V_PERM16,
    attention_fp32_ref,
    fp8_attention,
    fp8_attention_quantized,
    fp8_attention_ref,
    quantize_qkv,
)

HOPPER = A.is_available()


@pytest.mark.parametrize(
    "args,match",
    [
        ((32, 64, 128, 2), "head dim"),
        ((128, 64, 256, 2), "block_n"),
        ((128, 32, 128, 2), "scale_block"),
        ((128, 64, 128, 1), "num_stages"),
        ((128, 64, 128, 7), "num_stages"),
    ],
)
def test_check_config_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        A.check_config(*args)


def test_check_config_accepts_the_defaults_and_smem_fits():
    A.check_config(128, 64, 128, 2)
    A.check_config(64, 128, 64, 6)
    assert A.smem_bytes(2, 128) == 2 * 64 * 128 + 2 * 2 * 128 * 128 + 8 * (1 + 6 + 2)
    assert A.smem_bytes(6, 128) < A.SMEM_BYTES


def test_rejects_bad_quant_and_cpu_tensors():
    q, k, v = flux_like(1, 2, 100, 64, device="cpu")
    with pytest.raises(ValueError, match="v_perm16=True"):
        A.fp8_attention_sm90(quantize_qkv(q, k, v), v)  # Vᵀ in natural token order
    with pytest.raises(ValueError, match="needs pv='fp8'"):
        quantize_qkv(q, k, v, pv="bf16", v_perm16=True)
    quant = quantize_qkv(q, k, v, v_perm16=True)
    with pytest.raises(ValueError, match="token order"):
        fp8_attention_quantized(quant, v)  # the Triton kernel reads the natural order
    with pytest.raises(ValueError, match="another scale_block"):
        A.fp8_attention_sm90(quant, v, scale_block=64)
    with pytest.raises(ValueError, match="quant does not match"):
        A.fp8_attention_sm90(quant, v[:, :1])
    with pytest.raises(ValueError, match="out must be"):
        A.fp8_attention_sm90(quant, v, out=torch.empty(1, 2, 100, 32))
    with pytest.raises(ValueError, match="CUDA"):
        A.fp8_attention_sm90(quant, v)


def test_v_perm16_is_the_p_register_order():
    """quantize_qkv(v_perm16=True) stores the same Vᵀ bytes with token c of every 16 at V_PERM16[c]: the key
    order of the sm_90 kernel's P operand (thread t of a quad holds accumulator columns 2t, 2t+1, 2t+8, 2t+9 of
    every 16 and the e4m3 A fragment keys 4t .. 4t+3), a permutation of the 16."""
    assert sorted(V_PERM16) == list(range(16))
    for t in range(4):
        assert [V_PERM16[c] for c in (2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)] == [4 * t + i for i in range(4)]
    q, k, v = flux_like(1, 2, 100, 64, device="cpu")
    plain = quantize_qkv(q, k, v)["vt8"]
    perm = quantize_qkv(q, k, v, v_perm16=True)["vt8p"]
    Lp = plain.shape[-1]
    dst = torch.tensor([16 * (c // 16) + V_PERM16[c % 16] for c in range(Lp)])
    assert torch.equal(perm[..., dst].view(torch.uint8), plain.view(torch.uint8))


needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU and Gluon")

# (B, H, L, D, qk, scale_block, block_n, num_stages, pingpong): one tile, a ragged tail inside the first
# tile, tails of 1 and 127 keys, two K scales per tile and one, 64-wide tiles, deeper rings, both ping-pong
# modes, int8 Q·K, head dim 64, two batches
GPU_CASES = [
    (1, 3, 128, 128, "fp8", 64, 128, 2, False),
    (1, 3, 100, 128, "fp8", 64, 128, 2, False),
    (1, 3, 1025, 128, "fp8", 64, 128, 2, False),
    (1, 3, 1151, 128, "fp8", 128, 128, 3, False),
    (1, 3, 1000, 128, "fp8", 64, 64, 3, False),
    (1, 3, 1000, 128, "fp8", 64, 128, 2, True),
    (1, 3, 1000, 128, "fp8", 128, 64, 4, True),
    (1, 3, 1151, 128, "fp8", 128, 128, 2, 2),
    (1, 3, 1000, 128, "fp8", 64, 64, 3, 2),
    (1, 3, 1000, 128, "int8", 64, 128, 2, False),
    (2, 2, 777, 64, "fp8", 64, 128, 2, False),
    (2, 2, 777, 64, "int8", 128, 64, 2, True),
]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("B,H,L,D,qk,scale_block,block_n,num_stages,pingpong", GPU_CASES)
def test_gpu_matches_refs(B, H, L, D, qk, scale_block, block_n, num_stages, pingpong):
    q, k, v = flux_like(B, H, L, D, seed=L + D, dtype=torch.bfloat16)
    quant = quantize_qkv(q, k, v, qk=qk, scale_block=scale_block, v_perm16=True)
    out = A.fp8_attention_sm90(quant, v, scale_block=scale_block, block_n=block_n, num_stages=num_stages,
                               pingpong=pingpong)  # fmt: skip
    assert out.shape == v.shape and out.dtype == v.dtype
    ref = fp8_attention_ref(q, k, v, qk=qk, scale_block=scale_block, block_n=block_n)
    # (bf16 out, rel L2 1e-2): the same quantization and key tiling; exp2 is approximate on the GPU and
    # P can round the other way at e4m3 boundaries (as test_fp8_attention's GPU test of the Triton kernel)
    assert not out.isnan().any() and rel_l2(out, ref) < 1e-2, describe(out, ref, 0.1)
    triton_out = fp8_attention_quantized(quantize_qkv(q, k, v, qk=qk, scale_block=scale_block), v,
                                         scale_block=scale_block, block_n=block_n)  # fmt: skip
    assert rel_l2(out, triton_out) < 1e-2, describe(out, triton_out, 0.1)
    assert rel_l2(out, attention_fp32_ref(q, k, v)) < 0.08


@pytest.mark.gpu
@needs_hopper
def test_gpu_flux_length_and_out_argument():
    """FLUX.2's 1024² length with all 48 heads, written into a (B, L, H, D) buffer's (B, H, L, D) view (the
    model's layout), and the cached launcher (second call, other tensors) giving the same bits."""
    q, k, v = flux_like(1, 48, 4608, 128, dtype=torch.bfloat16)
    quant = quantize_qkv(q, k, v, v_perm16=True)
    buf = torch.full((1, 4608, 48, 128), float("nan"), device=q.device, dtype=q.dtype)
    out = A.fp8_attention_sm90(quant, v, out=buf.transpose(1, 2))
    ref = fp8_attention_ref(q, k, v, block_n=128)
    assert not buf.isnan().any() and rel_l2(out, ref) < 1e-2, describe(out, ref, 0.1)
    quant2 = {name: t.clone() for name, t in quant.items()}
    again = A.fp8_attention_sm90(quant2, v.clone())
    assert torch.equal(again, out.contiguous())


@pytest.mark.gpu
@needs_hopper
def test_gpu_schedules_agree():
    """Ping-pong (either mode) only reorders wgmma issue and the late rescale only moves O's multiply by alpha
    between the same two wgmmas: the same bits as the free-running consumers. The row trees change the order
    of the row sum only (the max is exact in any order)."""
    q, k, v = flux_like(1, 4, 2000, 128, dtype=torch.bfloat16)
    quant = quantize_qkv(q, k, v, v_perm16=True)
    free = A.fp8_attention_sm90(quant, v, pingpong=False)
    for kw in (dict(pingpong=True, num_stages=3), dict(pingpong=2), dict(late_rescale=True),
               dict(pingpong=2, late_rescale=True)):  # fmt: skip
        assert torch.equal(free, A.fp8_attention_sm90(quant, v, **kw)), kw
    tree = A.fp8_attention_sm90(quant, v, row_tree=True)
    assert rel_l2(tree, free) < 2e-3
    assert rel_l2(tree, fp8_attention_ref(q, k, v, block_n=128)) < 1e-2
    assert torch.equal(tree, A.fp8_attention_sm90(quant, v, row_tree=True, pingpong=2, late_rescale=True))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("L,block_n", [(100, 64), (1000, 64), (1151, 128), (4608, 64)])
def test_gpu_three_consumers_same_bits(L, block_n):
    """Three consumer warpgroups (192 query rows per program; the last program's rows can run past the padded
    length) compute every row exactly as two do: the same bits."""
    q, k, v = flux_like(1, 3, L, 128, seed=L, dtype=torch.bfloat16)
    quant = quantize_qkv(q, k, v, v_perm16=True)
    two = A.fp8_attention_sm90(quant, v, block_n=block_n)
    three = A.fp8_attention_sm90(quant, v, block_n=block_n, consumers=3)
    assert torch.equal(two, three)
    assert rel_l2(three, fp8_attention_ref(q, k, v, block_n=block_n)) < 1e-2


def test_rejects_unknown_pingpong_mode():
    q, k, v = flux_like(1, 2, 100, 64, device="cpu")
    with pytest.raises(ValueError, match="pingpong must be one of"):
        A.fp8_attention_sm90(quantize_qkv(q, k, v, v_perm16=True), v, pingpong=3)
    with pytest.raises(ValueError, match="consumers must be one of"):
        A.fp8_attention_sm90(quantize_qkv(q, k, v, v_perm16=True), v, consumers=4)
    with pytest.raises(ValueError, match="needs consumers=2"):
        A.fp8_attention_sm90(quantize_qkv(q, k, v, v_perm16=True), v, consumers=3, pingpong=1)


def test_dispatch_rule_on_cpu():
    """Off a Hopper GPU fp8_attention keeps the Triton kernel and its 64-key tiles (the reference follows)."""
    q = torch.zeros(1, 1, 8, 128)
    assert not FA._use_sm90(q, "fp8", None, (None, None, None))
    assert FA._default_block_n(q, "fp8", None, (None, None, None)) == 64
    assert FA._default_block_n(q, "fp8", 32, (None, None, None)) == 32


@pytest.mark.gpu
@needs_hopper
def test_gpu_fp8_attention_dispatches_to_sm90(monkeypatch):
    """On an H100 fp8_attention (as the model calls it) is the sm_90 kernel after the permuting pre-pass, bit for
    bit; a Triton launch knob, bf16 P·V or FLUX2_ATTN_SM90=0 (FA.SM90) keep the Triton kernel; the emulating
    reference tiles keys as the kernel that runs."""
    q, k, v = flux_like(1, 4, 1000, 128, dtype=torch.bfloat16)
    assert FA._use_sm90(q, "fp8", None, (None, None, None))
    assert not FA._use_sm90(q, "bf16", None, (None, None, None))
    assert not FA._use_sm90(q, "fp8", None, (128, None, None))
    out = fp8_attention(q, k, v)
    direct = A.fp8_attention_sm90(quantize_qkv(q, k, v, v_perm16=True), v)
    assert torch.equal(out, direct)
    assert rel_l2(out, fp8_attention_ref(q, k, v)) < 1e-2
    monkeypatch.setattr(FA, "SM90", False)
    assert torch.equal(fp8_attention(q, k, v), fp8_attention_quantized(quantize_qkv(q, k, v), v))


@pytest.mark.gpu
@needs_hopper
def test_gpu_exp2_split_matches_ref():
    """exp_split: half the exp2 from the degree-2 polynomial (1.7e-3 relative) before P's e4m3 rounding."""
    q, k, v = flux_like(1, 3, 1500, 128, dtype=torch.bfloat16)
    quant = quantize_qkv(q, k, v, v_perm16=True)
    out = A.fp8_attention_sm90(quant, v, exp_split=True)
    ref = fp8_attention_ref(q, k, v, block_n=128)
    assert rel_l2(out, ref) < 1e-2, describe(out, ref, 0.1)
    assert rel_l2(out, A.fp8_attention_sm90(quant, v)) < 1e-2
