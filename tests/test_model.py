"""The reference transformer against diffusers' Flux2Transformer2DModel (the independent oracle)."""

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from flux2_bench.model import PRESETS, Flux2, get_preset, num_parameters
from flux2_bench.sampling import image_ids, text_ids
from flux2_bench.weights import load_transformer, synthetic_transformer

# fp32 parity: both implementations do the same math in a different op order (diffusers splits q/k/v,
# computes RoPE from float64 cos/sin tables); the issue bounds the max relative error by 1e-5.
PARITY = (torch.float32, 1e-5)


def _diffusers_tiny(guidance: bool, seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=256,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=guidance,
    )
    with torch.no_grad():  # default init leaves norms at 1: randomize everything so no path is trivial
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def _inputs(n_refs: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = [image_ids(4, 6)] + [image_ids(3, 5, t=10 + 10 * k) for k in range(n_refs)]
    img_ids = torch.cat(ids, dim=1)
    img = torch.randn(1, img_ids.shape[1], 16, generator=g)
    txt = torch.randn(1, 12, 32, generator=g)
    return img, img_ids, txt, text_ids(12), torch.tensor([0.63]), torch.tensor([3.5])


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("guidance", [True, False], ids=["guidance", "no-guidance"])
@pytest.mark.parametrize("n_refs", [0, 2], ids=["t2i", "2-refs"])
def test_parity_with_diffusers(tmp_path, guidance, n_refs):
    ref = _diffusers_tiny(guidance)
    ref.save_pretrained(tmp_path / "transformer")
    ours = load_transformer(tmp_path / "transformer", dtype=torch.float32, progress=False)
    assert ours.config.use_guidance_embed == guidance
    img, img_ids, txt, txt_ids, t, g = _inputs(n_refs)
    with torch.no_grad():
        want = ref(
            hidden_states=img,
            encoder_hidden_states=txt,
            timestep=t,
            img_ids=img_ids[0],
            txt_ids=txt_ids[0],
            guidance=g if guidance else None,
            return_dict=False,
        )[0]
        got = ours(img, img_ids, txt, txt_ids, t, g if guidance else None)
    assert got.shape == want.shape
    err = _max_rel(got, want)
    assert err <= PARITY[1], f"max relative error {err:.2e} > {PARITY[1]:.0e} (refs={n_refs}, guidance={guidance})"


def test_reference_tokens_change_the_target_output():
    """Reference tokens take part in attention: the target tokens' velocity must depend on them."""
    model = synthetic_transformer("tiny", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    tgt = torch.randn(1, 16, 32, generator=g)
    txt, tids = torch.randn(1, 8, 96, generator=g), text_ids(8)
    t, gd = torch.tensor([0.5]), torch.tensor([4.0])
    with torch.no_grad():
        alone = model(tgt, image_ids(4, 4), txt, tids, t, gd)
        ref = torch.randn(1, 16, 32, generator=g)
        both = model(torch.cat([tgt, ref], 1), torch.cat([image_ids(4, 4), image_ids(4, 4, t=10)], 1), txt, tids, t, gd)
    assert both.shape[1] == 32
    assert _max_rel(both[:, :16], alone) > 1e-3


def test_preset_parameter_counts_match_the_spec():
    # reference/flux2-architecture.md §3.1 and §8
    assert num_parameters(PRESETS["flux.2-dev"]) == 32_223_281_152
    assert round(num_parameters(PRESETS["flux.2-klein-9b"]) / 1e9, 2) == 9.08
    assert round(num_parameters(PRESETS["flux.2-klein-4b"]) / 1e9, 2) == 3.88


def test_official_parameter_names():
    with torch.device("meta"):
        names = dict(Flux2(PRESETS["flux.2-dev"]).named_parameters())
    assert len(names) == 299  # the official file holds 299 tensors
    assert names["double_blocks.7.img_attn.qkv.weight"].shape == (18432, 6144)
    assert names["single_blocks.47.linear1.weight"].shape == (55296, 6144)
    assert names["single_blocks.0.linear2.weight"].shape == (6144, 24576)
    assert names["final_layer.adaLN_modulation.1.weight"].shape == (12288, 6144)
    assert names["double_blocks.0.txt_attn.norm.key_norm.scale"].shape == (128,)
    with torch.device("meta"):
        klein = dict(Flux2(PRESETS["flux.2-klein-4b"]).named_parameters())
    assert not any(k.startswith("guidance_in") for k in klein)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="flux.2-dev.*tiny"):
        get_preset("flux2-dev")


def test_forward_rejects_bad_shapes_and_missing_guidance():
    model = synthetic_transformer("tiny", dtype=torch.float32)
    img, txt = torch.randn(1, 16, 32), torch.randn(1, 8, 96)
    ids, tids, t = image_ids(4, 4), text_ids(8), torch.tensor([0.5])
    with pytest.raises(ValueError, match="embeds guidance"):
        model(img, ids, txt, tids, t)
    with pytest.raises(ValueError, match=r"img must be \(B, N, 32\)"):
        model(torch.randn(1, 16, 31), ids, txt, tids, t, t)
    with pytest.raises(ValueError, match="ids must match"):
        model(img, image_ids(4, 5), txt, tids, t, t)


def test_synthetic_weights_are_deterministic_and_in_target_dtype():
    a = synthetic_transformer("tiny", dtype=torch.bfloat16, seed=3)
    b = synthetic_transformer("tiny", dtype=torch.bfloat16, seed=3)
    c = synthetic_transformer("tiny", dtype=torch.bfloat16, seed=4)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(p.dtype == torch.bfloat16 for p in pa.values())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["img_in.weight"], pc["img_in.weight"])


def test_synthetic_full_depth_activations_stay_finite():
    """56 blocks of random weights (klein-4b width would be slow on CPU: same depth, tiny width)."""
    from dataclasses import replace

    deep = replace(PRESETS["tiny"], depth=8, depth_single_blocks=48)
    model = synthetic_transformer(deep, dtype=torch.bfloat16)
    img, txt = torch.randn(1, 64, 32, dtype=torch.bfloat16), torch.randn(1, 32, 96, dtype=torch.bfloat16)
    t = torch.tensor([0.9], dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(img, image_ids(8, 8), txt, text_ids(32), t, t * 4)
    assert torch.isfinite(out).all()
    assert 1e-2 < out.float().pow(2).mean().sqrt().item() < 1e3


@pytest.mark.gpu
def test_klein_forward_on_gpu_is_finite():
    model = synthetic_transformer("flux.2-klein-4b", device="cuda", dtype=torch.bfloat16)
    img = torch.randn(1, 1024, 128, device="cuda", dtype=torch.bfloat16)
    txt = torch.randn(1, 512, 7680, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.5], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(img, image_ids(32, 32, device="cuda"), txt, text_ids(512, device="cuda"), t)
    assert torch.isfinite(out).all()


def _tiny_call(dtype, device="cpu", n_refs=1, batch=1, seed=3):
    model = synthetic_transformer("tiny", dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([image_ids(4, 6)] + [image_ids(3, 5, t=10 * (k + 1)) for k in range(n_refs)], dim=1)
    img = torch.randn(batch, ids.shape[1], 32, generator=g).to(device, dtype)
    txt = torch.randn(batch, 7, 96, generator=g).to(device, dtype)
    t = torch.linspace(0.3, 0.8, batch).to(device, dtype)
    args = (img, ids.expand(batch, -1, -1).to(device), txt, text_ids(7).expand(batch, -1, -1).to(device), t, t * 4)
    return model, args


@pytest.mark.parametrize(
    ("dtype", "batch"),
    [(torch.float32, 1), (torch.float32, 2), (torch.bfloat16, 1)],  # bf16 is slow in the interpreter
)
def test_fused_block_path_matches_the_plain_ops(dtype, batch):
    """The fused kernels (interpreter on CPU) against the same model with BFL's plain PyTorch ops."""
    from flux2_bench.model import fused_active, use_fused

    model, args = _tiny_call(dtype, batch=batch)
    assert not fused_active(args[0])  # CPU default: plain ops
    with torch.no_grad():
        plain = model(*args).float()
        with use_fused(True):
            fused = model(*args).float()
    # fp32: op order only (fused LayerNorm / RMSNorm reductions): ~1e-6 relative. bf16: the kernels
    # round where the plain ops do, but reduction order and the interpreter's casts move some elements
    # by an ulp, and 4 blocks amplify that: a few bf16 ulps of the output's scale.
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert _max_rel(fused, plain) < tol, _max_rel(fused, plain)
    with pytest.raises(ValueError, match="fused mode"):
        use_fused("yes").__enter__()


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", [None, "fp8-row", "fp8-block", "fp8-tensor", "int4-g128", "nf4"])
def test_gpu_fused_path_matches_plain_ops_at_flux2_dev_width(recipe):
    from dataclasses import replace

    from flux2_bench.model import use_fused
    from flux2_bench.quantize.formats import sqnr

    cfg = replace(PRESETS["flux.2-dev"], depth=2, depth_single_blocks=2)
    model = synthetic_transformer(cfg, device="cuda", recipe=recipe)
    n = 32
    img = torch.randn(1, n * n, 128, device="cuda", dtype=torch.bfloat16)
    txt = torch.randn(1, 256, 15360, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([0.5], device="cuda", dtype=torch.bfloat16)
    args = (img, image_ids(n, n, device="cuda"), txt, text_ids(256, device="cuda"), t, t * 4)
    with torch.no_grad():
        with use_fused(False):
            plain = model(*args).float()
        with use_fused(True):
            fused = model(*args).float()
    # bf16 rounding-order differences only (fp8: the same e4m3 activations up to those): far above the
    # recipes' own quantization error (fp8 ~37 dB, 4-bit ~31 dB against bf16)
    assert sqnr(fused, plain) >= 40, sqnr(fused, plain)
    if recipe is not None:  # and both paths against the bf16 model (autotuned kernels, not pinned configs)
        bf16 = synthetic_transformer(cfg, device="cuda")
        with torch.no_grad(), use_fused(False):
            want = bf16(*args).float()
        floor = 30 if recipe.startswith("fp8") else 25  # full model: fp8 37 dB, nf4 32.5, int4 30.9
        for name, got in (("plain", plain), ("fused", fused)):
            assert sqnr(got, want) >= floor, f"{recipe} {name}: {sqnr(got, want):.1f} dB vs bf16"
