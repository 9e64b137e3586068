"""QuantLinear, swap_linears and loading quantized FLUX.2 checkpoints (issue: quantized runtime)."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from flux2_bench.model import PRESETS
from flux2_bench.quantize.convert import convert
from flux2_bench.quantize.formats import sqnr
from flux2_bench.quantize.linear import QuantLinear, swap_linears
from flux2_bench.quantize.recipes import Recipe, get_recipe
from flux2_bench.safetensors_io import CheckpointError, SafetensorsReader, save_streaming
from flux2_bench.sampling import image_ids, text_ids
from flux2_bench.weights import load_transformer, save_transformer, synthetic_transformer

RECIPES = [r.value for r in Recipe]


@pytest.mark.parametrize("recipe", RECIPES)
def test_quant_linear_matches_its_dequantized_weight_and_the_float_layer(recipe):
    torch.manual_seed(0)
    lin = nn.Linear(256, 384, bias=False)
    x = torch.randn(7, 256)
    q = QuantLinear.from_float(lin, recipe)
    assert f"recipe={recipe}" in repr(q)
    # CPU path is dequantize + F.linear: equal to that by construction, within fp32 rounding
    torch.testing.assert_close(q(x), x @ q.dequantize(torch.float32).T, rtol=1e-5, atol=1e-5)
    # and within the recipe's SQNR floor of the float layer (floors: quantize/recipes.py)
    floor = get_recipe(recipe).sqnr_floor_db
    got = sqnr(q(x), lin(x).detach())
    assert got >= floor, f"{recipe}: output SQNR {got:.1f} dB below its floor {floor} dB"


def _sensitive_tiny():
    """A tiny model whose block outputs matter: synthetic gates are ~0.1 by design (finite over 56
    blocks), which would let the residual stream hide a broken linear. Scaled up here."""
    cfg = replace(PRESETS["tiny"], hidden_size=256, num_heads=4, axes_dim=(16, 16, 16, 16))
    model = synthetic_transformer(cfg, dtype=torch.float32, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.mul_(10)
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(1, 64, 32, generator=g),
        image_ids(8, 8),
        torch.randn(1, 16, 96, generator=g),
        text_ids(16),
        torch.tensor([0.5]),
        torch.tensor([4.0]),
    )
    return model, args


# Model-level floors (dB), 3 dB under what the tiny sensitive model measures (fp8 33.2-33.7, nf4 23.2,
# int4-g128 20.6, nvfp4 22.5): errors of 20 quantized linears compound through 4 blocks. The model
# with its blocks removed scores 7.3 dB (test_floor_is_sensitive), so a broken layer cannot pass.
MODEL_FLOORS = {"fp8-tensor": 30, "fp8-row": 30, "fp8-block": 30, "nf4": 20, "int4-g128": 17, "nvfp4": 19}


@pytest.mark.parametrize("recipe", RECIPES)
def test_swapped_model_stays_above_floor(recipe):
    model, args = _sensitive_tiny()
    with torch.no_grad():
        ref = model(*args)
        q = copy.deepcopy(model)
        names = swap_linears(q, recipe)
        got = sqnr(q(*args), ref)
    assert len(names) == 2 * 8 + 2 * 2  # 8 linears per double block, 2 per single block
    assert got >= MODEL_FLOORS[recipe], f"{recipe}: model SQNR {got:.1f} dB < {MODEL_FLOORS[recipe]}"


def test_floor_is_sensitive():
    model, args = _sensitive_tiny()
    with torch.no_grad():
        ref = model(*args)
        model.single_blocks = nn.ModuleList()
        model.double_blocks = nn.ModuleList()
        got = sqnr(model(*args), ref)
    assert got < 10, f"without its blocks the model still scores {got:.1f} dB: the floors cannot fail"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    cfg = replace(PRESETS["tiny"], hidden_size=256, num_heads=4, axes_dim=(16, 16, 16, 16))
    model = synthetic_transformer(cfg, dtype=torch.bfloat16, seed=2)
    save_transformer(model, d / "bfl.safetensors")
    save_transformer(model, d / "diffusers", layout="diffusers")
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randn(1, 64, 32, generator=g).bfloat16(),
        image_ids(8, 8),
        torch.randn(1, 16, 96, generator=g).bfloat16(),
        text_ids(16),
        torch.tensor([0.5]).bfloat16(),
        torch.tensor([4.0]).bfloat16(),
    )
    return d, model, args


def _out(model, args):
    with torch.no_grad():
        return model(*args).float()


@pytest.mark.parametrize("recipe", RECIPES)
def test_converted_bfl_file_loads_into_quant_linears(saved, recipe):
    d, model, args = saved
    out = d / f"{recipe}.safetensors"
    convert(d / "bfl.safetensors", out, recipe=recipe, progress=False, force=True)
    loaded = load_transformer(out, progress=False)
    assert isinstance(loaded.single_blocks[0].linear1, QuantLinear)
    assert loaded.single_blocks[0].linear1.recipe == recipe
    assert isinstance(loaded.final_layer.linear, nn.Linear)  # kept bf16 by the layer policy
    swapped = copy.deepcopy(model)
    swap_linears(swapped, recipe)
    assert torch.equal(_out(loaded, args), _out(swapped, args))  # same stored bytes, same kernels
    on_load = load_transformer(d / "bfl.safetensors", recipe=recipe, progress=False)
    assert torch.equal(_out(on_load, args), _out(swapped, args))


@pytest.mark.parametrize("recipe", ["fp8-tensor", "fp8-row", "nf4", "int4-g128"])
def test_converted_diffusers_folder_fuses_qkv(saved, recipe):
    """diffusers stores q, k and v apart: they are fused back row-wise (three per-tensor fp8 scales
    become one per-row scale), so the output equals the BFL conversion's up to those scales."""
    d, model, args = saved
    out = d / f"diffusers-{recipe}"
    convert(d / "diffusers", out, recipe=recipe, progress=False, force=True, double_quant=recipe == "nf4")
    loaded = load_transformer(out, progress=False)
    qkv = loaded.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, QuantLinear)
    assert qkv.recipe == ("fp8-row" if recipe == "fp8-tensor" else recipe)
    swapped = copy.deepcopy(model)
    swap_linears(swapped, recipe)
    got = sqnr(_out(loaded, args), _out(swapped, args))
    assert got > 40, f"diffusers-layout {recipe} differs from the BFL-layout model: {got:.1f} dB"


def test_comfy_fp8_file_loads_and_input_scale_is_ignored(saved, tmp_path):
    d, model, args = saved
    out = tmp_path / "comfy.safetensors"
    convert(d / "bfl.safetensors", out, recipe="fp8-tensor", comfy=True, progress=False)
    r = SafetensorsReader(out)
    state = {k: r.read(k) for k in r.keys()}
    state["single_blocks.0.linear1.input_scale"] = torch.tensor(0.05)  # static activation scale
    meta = {k: v for k, v in r.metadata.items() if not k.startswith("flux2_bench.")}  # a ComfyUI file
    save_streaming(tmp_path / "comfy2.safetensors", state, meta)
    loaded = load_transformer(tmp_path / "comfy2.safetensors", progress=False)
    assert loaded.single_blocks[0].linear1.recipe == "fp8-tensor"


def test_metadata_recipe_mismatch_is_refused(saved, tmp_path):
    d, _, _ = saved
    out = tmp_path / "row.safetensors"
    convert(d / "bfl.safetensors", out, recipe="fp8-row", progress=False)
    r = SafetensorsReader(out)
    meta = dict(r.metadata, **{"flux2_bench.recipe": "nf4"})
    save_streaming(tmp_path / "lying.safetensors", {k: r.read(k) for k in r.keys()}, meta)
    with pytest.raises(CheckpointError, match="metadata says recipe 'nf4', but its tensors are \\['fp8-row'\\]"):
        load_transformer(tmp_path / "lying.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="already quantized"):
        load_transformer(out, recipe="nf4", progress=False)


@pytest.mark.parametrize("recipe", RECIPES)
def test_synthetic_quantized_equals_swapped_synthetic(recipe):
    a = synthetic_transformer("tiny", recipe=recipe, seed=5)
    b = synthetic_transformer("tiny", seed=5)
    swap_linears(b, recipe)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        x, y = sa[k], sb[k]
        if x.dtype == torch.float8_e4m3fn:
            x, y = x.view(torch.uint8), y.view(torch.uint8)
        assert torch.equal(x, y), k


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", RECIPES)
def test_quant_linear_kernels_on_gpu_match_the_torch_path(recipe):
    torch.manual_seed(0)
    lin = nn.Linear(6144, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(300, 6144, device="cuda", dtype=torch.bfloat16)
    q = QuantLinear.from_float(lin, recipe)
    want = x.float() @ q.dequantize(torch.float32).T
    got = q(x).float()
    # fp8 recipes also quantize the activations (e4m3, ~31 dB); 4-bit kernels only round to bf16
    floor = 28 if recipe.startswith("fp8") else 40
    assert sqnr(got, want) >= floor, f"{recipe} on {q.kernel(x.device)}: {sqnr(got, want):.1f} dB"


@pytest.mark.parametrize("recipe", ["fp8-row", "int4-g128"])
def test_gated_residual_equals_addcmul_of_the_output(recipe):
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(256, 128, bias=False), recipe)
    x, res = torch.randn(2, 5, 256), torch.randn(2, 5, 128)
    gate = torch.randn(2, 1, 128)  # per-batch gates: the torch addcmul path on every device
    torch.testing.assert_close(q(x, residual=res, gate=gate), torch.addcmul(res, gate, q(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual without gate"):
        q(x[:1], residual=res[:1], gate=None).sum()


def test_fp8_input_is_refused_where_the_kernel_takes_bf16():
    q = QuantLinear.from_float(nn.Linear(256, 128, bias=False), "fp8-row")
    assert q.activation_quant(torch.device("cpu")) is None  # CPU: dequantize + F.linear
    xq = torch.zeros(3, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="takes no FP8 input"):
        q((xq, torch.ones(3, 1)))


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["fp8-row", "fp8-block"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fp8_input_and_epilogue_on_gpu_match_quantize_then_linear(recipe, batch):
    from flux2_bench.kernels.fp8_matmul import quantize_fp8

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    q = QuantLinear.from_float(nn.Linear(1024, 768, bias=False, device=dev, dtype=bf), recipe)
    gran = q.activation_quant(torch.device(dev))
    assert gran == recipe.removeprefix("fp8-")
    x = torch.randn(batch, 300, 1024, device=dev, dtype=bf)
    res, gate = torch.randn(batch, 300, 768, device=dev, dtype=bf), torch.randn(batch, 1, 768, device=dev, dtype=bf)
    want = torch.addcmul(res.float(), gate.float(), q(x).float())
    got_pre = q(quantize_fp8(x, gran), residual=res, gate=gate).float()  # epilogue when batch == 1
    got_bf16 = q(x, residual=res, gate=gate).float()
    # same fp8 operands and fp32 accumulation; the epilogue adds in fp32 before one bf16 rounding,
    # the reference rounds the product to bf16 first: a few bf16 ulps of |residual + gate*out|
    for got in (got_pre, got_bf16):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("recipe", ["nf4", "int4-g128"])
def test_chunked_dequantize_matmul_equals_the_whole_weight(recipe, monkeypatch):
    from flux2_bench.quantize import linear as qlinear

    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(256, 640, bias=False), recipe)
    monkeypatch.setattr(qlinear, "DEQUANT_CHUNK_BYTES", 128 * 256 * 2)  # 128 rows: 5 chunks of W
    x = torch.randn(2, 3, 256)
    code = q.code if recipe == "nf4" else None
    got = q._dequantize_chunks_matmul(x, code)
    # against the same kernel dequantizing the whole weight at once: only the chunking differs
    from flux2_bench.kernels.int4_matmul import dequantize_4bit

    whole = dequantize_4bit(q.weight, q.weight_scale, fmt=recipe, code=code).float()
    torch.testing.assert_close(got, x @ whole.T, rtol=1e-6, atol=1e-6)


def test_nf4_runtime_scales_are_fp16_and_refuse_overflow():
    q = QuantLinear.from_float(nn.Linear(128, 128, bias=False), "nf4")
    assert q.weight_scale.dtype == torch.float16
    from flux2_bench.quantize.recipes import quantize_layer

    stored = quantize_layer(get_recipe("nf4"), torch.full((128, 128), 1e5))
    with pytest.raises(ValueError, match="does not fit the fp16"):
        q.load_stored(stored)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["nf4", "int4-g128"])
def test_gpu_dequantize_chunks_write_cublas_output_columns_in_place(recipe, monkeypatch):
    from flux2_bench.quantize import linear as qlinear

    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(1024, 1000, bias=False, device="cuda", dtype=torch.bfloat16), recipe)
    monkeypatch.setattr(qlinear, "DEQUANT_CHUNK_BYTES", 256 * 1024 * 2)  # 256-row chunks, last one 232
    x = torch.randn(qlinear.DEQUANT_MIN_M, 1024, device="cuda", dtype=torch.bfloat16)
    want = x.float() @ q.dequantize(torch.float32).T
    assert sqnr(q(x).float(), want) >= 40  # only bf16 rounding of W and of the output


def test_nf4_standard_codebook_goes_to_the_kernels_as_none(monkeypatch):
    """The kernels cache the standard NF4 table; a GPU codebook read with .tolist() per call would stall
    the stream (it did: 60 ms/step). A custom codebook is passed through."""
    q = QuantLinear.from_float(nn.Linear(128, 64, bias=False), "nf4")
    assert q._kernel_code() is None
    with torch.no_grad():
        q.code.mul_(1.0001)
    q.load_runtime({name: b.clone() for name, b in q.named_buffers()})  # new buffers: checked again
    assert q._kernel_code() is q.code
    q.load_state_dict(QuantLinear.from_float(nn.Linear(128, 64, bias=False), "nf4").state_dict())
    assert q._kernel_code() is None
