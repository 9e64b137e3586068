"""Quantization primitives: exact inverses, bit layouts, SQNR floors, and bitsandbytes interop."""

import math

import pytest
import torch

from flux2_bench.quantize import formats as F
from flux2_bench.quantize.recipes import Recipe, dequantize_layer, get_recipe, quantize_layer

# Gaussian weights: the SQNR each format reaches on N(0, 1) 1024x1024 (measured 2026-11-22: fp8 31.6,
# nf4 20.7, nvfp4 20.4, int4-g128 18.6 dB). Floors sit ~3 dB under: the recipe floors used by verify.
FLOORS = {r: get_recipe(r).sqnr_floor_db for r in Recipe}


@pytest.mark.parametrize("recipe", list(Recipe), ids=str)
def test_round_trip_above_floor(recipe):
    w = torch.randn(512, 1024, dtype=torch.bfloat16)
    cfg = get_recipe(recipe)
    stored = quantize_layer(cfg, w)
    layout = cfg.layout(tuple(w.shape), w.dtype)
    assert list(stored) == list(layout), "stored tensors must come in declared order"
    for k, (dt, shape) in layout.items():
        assert stored[k].dtype == dt and tuple(stored[k].shape) == shape, (k, stored[k].dtype, stored[k].shape)
    db = F.sqnr(w.float(), dequantize_layer(recipe, stored))
    assert db >= FLOORS[recipe], f"{recipe}: {db:.2f} dB < floor {FLOORS[recipe]} dB"
    # and not absurdly high: a format that returned the input would pass any floor
    assert db < 40.0, f"{recipe}: {db:.2f} dB is more than a 4/8-bit format can give"


@pytest.mark.parametrize("recipe", list(Recipe), ids=str)
def test_dequantize_is_exact_inverse_on_representable_values(recipe):
    """Quantizing a dequantized weight gives back the same stored tensors (a fixed point)."""
    cfg = get_recipe(recipe)
    w = torch.randn(256, 256)
    first = quantize_layer(cfg, w)
    w1 = dequantize_layer(recipe, first)
    second = quantize_layer(cfg, w1)
    w2 = dequantize_layer(recipe, second)
    diff = (w1 - w2).abs()
    assert diff.max() <= 1e-6 * w1.abs().max(), f"{recipe}: {int((diff > 0).sum())} values moved, max {diff.max()}"


def test_fp8_saturates_instead_of_nan():
    x = torch.tensor([1e6, -1e6, 448.0, 500.0])
    q = F.saturate_to_fp8(x).float()
    assert torch.equal(q, torch.tensor([448.0, -448.0, 448.0, 448.0])), q


def test_fp8_scales_shapes_and_zero_rows():
    w = torch.randn(300, 200)
    w[7] = 0
    q, s = F.quantize_fp8_row(w)
    assert s.shape == (300, 1) and s[7].item() == 1.0
    assert torch.equal(F.dequantize_fp8_row(q, s)[7], torch.zeros(200))
    q, s = F.quantize_fp8_block(w)
    assert s.shape == (3, 2)  # ceil(300/128), ceil(200/128): partial edge blocks
    assert F.sqnr(w, F.dequantize_fp8_block(q, s)) > FLOORS[Recipe.FP8_BLOCK]
    q, s = F.quantize_fp8_tensor(torch.zeros(4, 4))
    assert s.shape == () and s.item() == 1.0


def test_int4_layout_bits():
    """Byte j of row n: element 2j in the HIGH nibble, 2j+1 in the LOW nibble, nibble = q + 8."""
    w = torch.zeros(2, 128)
    w[0, :4] = torch.tensor([7.0, -8.0, 1.0, 0.0])  # group amax 8 -> s = 8/7
    w[1, 0] = -7.0  # amax 7 -> s = 1
    packed, scale = F.quantize_int4_g128(w)
    assert packed.shape == (2, 64) and packed.dtype == torch.uint8
    assert scale.shape == (2, 1) and scale.dtype == torch.bfloat16
    s0 = scale[0, 0].float().item()
    q = [round(v / s0) for v in (7.0, -8.0, 1.0, 0.0)]
    q = [max(-8, min(7, v)) for v in q]
    assert packed[0, 0].item() == ((q[0] + 8) << 4) | (q[1] + 8)
    assert packed[0, 1].item() == ((q[2] + 8) << 4) | (q[3] + 8)
    assert packed[1, 0].item() == ((-7 + 8) << 4) | 8
    assert packed[0, 2:].eq(0x88).all()  # zeros are nibble 8
    with pytest.raises(ValueError, match="K divisible by 128"):
        F.quantize_int4_g128(torch.randn(4, 100))


def test_nibble_pack_round_trip():
    codes = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    p = F.pack_nibbles(codes)
    assert p[0, 0].item() == (codes[0, 0].item() << 4) | codes[0, 1].item()
    assert torch.equal(F.unpack_nibbles(p), codes)


def test_nvfp4_layout():
    w = torch.randn(256, 64)
    packed, bs, s2 = F.quantize_nvfp4(w)
    assert packed.shape == (256, 32) and bs.dtype == torch.float8_e4m3fn and bs.shape == (256, 4)
    assert s2.shape == () and math.isclose(s2.item(), F.amax(w).item() / (448 * 6), rel_tol=1e-6)
    # the largest element of the tensor is stored as +-6 (code 7) in a block whose scale is 448
    i = int(w.abs().argmax())
    r, c = divmod(i, 64)
    code = (packed[r, c // 2].item() >> (4 if c % 2 == 0 else 0)) & 0xF
    assert code & 7 == 7, code
    unblocked = F.from_blocked(bs, 256, 4).float()
    assert unblocked[r, c // 16].item() == 448.0


def test_to_blocked_matches_cublas_tile_order():
    """Tile element (row i*32+j, col c) sits at flat offset j*16 + i*4 + c of its 512-entry tile."""
    s = torch.arange(300 * 7, dtype=torch.float32).view(300, 7)
    b = F.to_blocked(s)
    assert b.shape == (384, 8)
    flat = b.flatten()
    for row, col in [(0, 0), (33, 2), (127, 3), (128, 0), (299, 6)]:
        rb, r = divmod(row, 128)
        cb, c = divmod(col, 4)
        i, j = divmod(r, 32)
        tile = rb * 2 + cb
        assert flat[tile * 512 + j * 16 + i * 4 + c].item() == s[row, col].item(), (row, col)
    assert torch.equal(F.from_blocked(b, 300, 7), s)


def test_sqnr():
    x = torch.randn(1000)
    assert F.sqnr(x, x) == math.inf
    # noise = 0.1 x -> 20 dB; 1e-4 dB slack for the fp32 rounding of x * 1.1
    assert abs(F.sqnr(x, x * 1.1) - 20.0) < 1e-4


def test_nf4_codebook_and_packing_match_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu"), F.NF4_CODE)
    assert torch.equal(bnbf.create_dynamic_map(), F.dynamic_map())
    w = torch.randn(192, 320, dtype=torch.bfloat16)
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    packed, absmax = F.quantize_nf4(w)
    assert torch.equal(packed, ref_packed), f"{int((packed != ref_packed).sum())} bytes differ"
    assert torch.equal(absmax, ref_state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_dequantizes_our_nf4_like_we_do(double_quant):
    """bnb's own dequantize_4bit on our stored tensors (rebuilt via QuantState.from_dict) equals ours."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    cfg = get_recipe("nf4", double_quant=double_quant)
    w = torch.randn(192, 320, dtype=torch.bfloat16)
    stored = quantize_layer(cfg, w)
    qs = bnbf.QuantState.from_dict({k.removeprefix("weight."): v for k, v in stored.items() if k != "weight"}, "cpu")
    assert qs.nested == double_quant and qs.blocksize == 64 and tuple(qs.shape) == (192, 320)
    theirs = bnbf.dequantize_4bit(stored["weight"], qs).float()
    ours = dequantize_layer(Recipe.NF4, stored)
    assert torch.equal(theirs, ours.to(torch.bfloat16).float()), f"max diff {(theirs - ours).abs().max()}"
    assert F.sqnr(w.float(), ours) > FLOORS[Recipe.NF4]


def test_recipe_validation():
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("fp7")
    with pytest.raises(ValueError, match="comfy"):
        get_recipe("nf4", comfy=True)
    with pytest.raises(ValueError, match="double quantization"):
        get_recipe("fp8-row", double_quant=True)
    with pytest.raises(AttributeError):
        get_recipe("nf4").comfy = True  # frozen
