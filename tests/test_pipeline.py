"""End-to-end parity with diffusers' Flux2Pipeline (tiny transformer, VAE and Mistral3, random weights)."""

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_bench.autoencoder import load_autoencoder
from flux2_bench.model import get_preset
from flux2_bench.pipeline import Flux2Pipeline, prepare_reference
from flux2_bench.sampling import get_noise
from flux2_bench.text_encoder import TextEncoder
from flux2_bench.weights import diffusers_config, load_transformer, save_transformer

diffusers = pytest.importorskip("diffusers")
from test_autoencoder import tiny_diffusers_vae  # noqa: E402
from test_text_encoder import tiny_mistral3, tiny_tokenizer  # noqa: E402

# fp32 end to end; diffusers and we run the same math in a different op order (fused vs split
# qkv, RoPE variant), ~1e-6 per step, amplified a little by the steps: 1e-4 relative is the spec.
LATENT_RTOL = 1e-4
SIZE, STEPS, PROMPT = 64, 3, "a red cat says hello"


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p.shape[-1]) ** 0.5) + (p.ndim == 1) * 1.0)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    tr = diffusers.Flux2Transformer2DModel(**diffusers_config(get_preset("tiny")))
    _randomize(tr, 1)
    hf = diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=tiny_diffusers_vae(),
        text_encoder=tiny_mistral3(),
        tokenizer=tiny_tokenizer("mistral"),
        transformer=tr.eval(),
    )
    hf.set_progress_bar_config(disable=True)
    hf.save_pretrained(root / "diffusers")
    ours = Flux2Pipeline(
        load_transformer(root / "diffusers" / "transformer", dtype=torch.float32),
        load_autoencoder(root / "diffusers" / "vae"),
        TextEncoder(hf.text_encoder, hf.tokenizer, layers=(1, 2, 3)),
        device="cpu",
    )
    return hf, ours, root


def _refs(n):
    rng = np.random.default_rng(n)
    sizes = [(64, 64), (80, 64), (64, 96)][:n]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("n_refs", [0, 1, 3])
def test_matches_diffusers(pipes, n_refs):
    hf, ours, _ = pipes
    refs = _refs(n_refs)
    noise = get_noise(1, 32, SIZE // 4, SIZE // 4, seed=7)
    kw = dict(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=4.0)
    kw |= dict(latents=noise, text_encoder_out_layers=(1, 2, 3), image=refs or None)
    seen = {}

    def grab(pipe, i, t, tensors):  # the final latents, without a second diffusers run
        seen["latents"] = tensors["latents"]
        return tensors

    ref_img = np.stack([np.asarray(i) for i in hf(**kw, output_type="pil", callback_on_step_end=grab).images])
    ref_lat = seen["latents"]
    ok = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=STEPS, guidance=4.0, latents=noise)
    ok |= dict(reference_images=refs, progress=False)
    out = ours.generate(**ok, output_type="pil")
    rel = float((out.latents - ref_lat).norm() / ref_lat.norm())
    assert rel < LATENT_RTOL, f"final latents: relative error {rel:.2e}"
    img = np.stack([np.asarray(i) for i in out.images])
    assert img.shape == ref_img.shape == (1, SIZE, SIZE, 3)
    diff = np.abs(img.astype(int) - ref_img.astype(int))
    frac = float((diff <= 2).mean())
    assert frac >= 0.999, f"{frac:.5f} of pixels within 2/255 (max diff {diff.max()})"
    assert set(out.timings) >= {"encode_s", "denoise_s", "decode_s"} and ours.last_timings is out.timings
    assert out.timings["denoise_s"] > 0


def test_from_pretrained_layouts(pipes, tmp_path):
    hf, ours, root = pipes
    kw = dict(prompt=PROMPT, width=SIZE, height=SIZE, steps=2, seed=3, output_type="latent", progress=False)
    want = ours.generate(**kw).images
    p = Flux2Pipeline.from_pretrained(root / "diffusers", device="cpu", dtype=torch.float32)
    assert p.text_encoder is not None and p.text_encoder.layers == (1, 2, 3)
    assert torch.allclose(p.generate(**kw).images, want, rtol=1e-5, atol=1e-6)
    # official file set: flux2-*.safetensors + ae.safetensors + a text-encoder folder
    save_transformer(ours.transformer, tmp_path / "flux2-tiny.safetensors")
    from flux2_bench.autoencoder import autoencoder_state
    from flux2_bench.safetensors_io import save_streaming

    save_streaming(tmp_path / "ae.safetensors", autoencoder_state(ours.vae))
    hf.text_encoder.save_pretrained(tmp_path / "text_encoder")
    hf.tokenizer.save_pretrained(tmp_path / "text_encoder")
    p = Flux2Pipeline.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert torch.allclose(p.generate(**kw).images, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="expected a diffusers layout"):
        Flux2Pipeline.from_pretrained(tmp_path / "text_encoder", device="cpu")


def test_prompt_embeds_offload_and_sizes(pipes):
    _, ours, _ = pipes
    emb = ours.text_encoder.encode(PROMPT)
    kw = dict(width=SIZE, height=SIZE, steps=2, seed=1, output_type="pt", progress=False)
    a = ours.generate(prompt_embeds=emb, **kw).images
    ours.offload = True
    try:
        b = ours.generate(prompt=PROMPT, **kw).images
    finally:
        ours.offload = False
    assert a.shape == (1, 3, SIZE, SIZE) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.allclose(a, b, atol=1e-6)
    with pytest.warns(UserWarning, match="floored to multiples of 16: 64x48"):
        out = ours.generate(prompt_embeds=emb, **(kw | dict(width=70, height=50)))
    assert out.images.shape == (1, 3, 48, 64)
    with pytest.raises(ValueError, match="at most 4 MP"):
        ours.generate(prompt_embeds=emb, **(kw | dict(width=4096, height=2048)))
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        ours.generate(**kw)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(B, L, 96\)"):
        ours.generate(prompt_embeds=torch.zeros(1, 8, 32), **kw)


def test_bad_references_are_clear_errors(pipes, tmp_path):
    _, ours, _ = pipes
    kw = dict(prompt_embeds=torch.zeros(1, 8, 96), width=SIZE, height=SIZE, steps=1, progress=False)
    with pytest.raises(ValueError, match="11 reference images given; at most 10"):
        ours.generate(**kw, reference_images=_refs(1) * 11)
    with pytest.raises(ValueError, match="32x64: both sides must be at least 64"):
        ours.generate(**kw, reference_images=[Image.new("RGB", (32, 64))])
    with pytest.raises(ValueError, match="aspect ratio 9.0 exceeds 8"):
        ours.generate(**kw, reference_images=[Image.new("RGB", (576, 64))])
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.png: not a readable PNG/JPEG"):
        ours.generate(**kw, reference_images=[bad])
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (64, 64)).save(gif)
    with pytest.raises(ValueError, match="format GIF is not supported; use PNG or JPEG"):
        ours.generate(**kw, reference_images=[gif])
    with pytest.raises(ValueError, match="no such file"):
        ours.generate(**kw, reference_images=[tmp_path / "missing.png"])


def test_reference_preprocessing_caps_and_crops():
    one = prepare_reference(Image.new("RGB", (3000, 2000)), 2024 * 2024)
    assert one.shape[2] % 16 == 0 and one.shape[3] % 16 == 0
    assert one.shape[2] * one.shape[3] <= 2024 * 2024 and one.shape[3] > 2400  # ~4 MP for a single ref
    several = prepare_reference(Image.new("RGB", (3000, 2000)), 1024 * 1024)
    assert several.shape[2] * several.shape[3] <= 1024 * 1024 and several.shape[3] > 1200
    small = prepare_reference(Image.new("RGB", (100, 70), (255, 0, 0)), 1024 * 1024)
    assert small.shape == (1, 3, 64, 96)  # center-cropped down to multiples of 16
    assert float(small[0, 0].min()) == 1.0 and float(small[0, 1].max()) == -1.0


def test_cli_generate_tiny_synthetic(tmp_path, capsys):
    from flux2_bench.cli import bench_main

    ref = tmp_path / "ref.png"
    Image.new("RGB", (96, 64), (10, 200, 30)).save(ref)
    out = tmp_path / "out.png"
    argv = ["generate", "--prompt", "a red cat", "--ref", str(ref), "--out", str(out), "--width", "64"]
    assert bench_main([*argv, "--height", "64", "--steps", "1", "--device", "cpu"]) == 0
    assert Image.open(out).size == (64, 64)
    assert "denoise" in capsys.readouterr().out
