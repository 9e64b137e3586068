"""Fidelity metrics: converters, PSNR/SSIM against hand-computed values and scikit-image, SQNR, labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_bench import fidelity
from flux2_bench.fidelity import (
    LPIPS_NOT_AVAILABLE,
    METRICS,
    NO_LATENTS,
    SKIPPED_SYNTHETIC,
    as_batch,
    compare,
    fidelity_row,
    is_score,
    latent_sqnr,
    psnr,
    ssim,
    ssim_per_image,
)

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is the SSIM oracle (test extra)")


def _image(seed: int, h: int = 48, w: int = 40) -> np.ndarray:
    """A smooth-plus-texture uint8 HWC image: SSIM on pure noise would be an unusual corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 80 * np.sin(xx / 6.0 + seed)[..., None] * np.cos(yy / 9.0)[..., None] * np.ones(3)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Converters


def test_as_batch_one_convention_for_pil_numpy_tensor():
    arr = _image(0)
    from_np = as_batch(arr)
    from_pil = as_batch(Image.fromarray(arr))
    from_tensor_u8 = as_batch(torch.from_numpy(arr).permute(2, 0, 1))
    from_tensor_f = as_batch(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert from_np.shape == (1, 3, 48, 40) and from_np.dtype == torch.float64
    assert torch.equal(from_np, from_pil) and torch.equal(from_np, from_tensor_u8)
    # float32 /255 vs float64 /255: differences are float32 rounding only.
    torch.testing.assert_close(from_tensor_f, from_np, atol=1e-7, rtol=0)
    assert float(from_np.min()) >= 0.0 and float(from_np.max()) <= 1.0
    assert as_batch([arr, arr]).shape == (2, 3, 48, 40)
    assert as_batch(np.stack([arr, arr])).shape == (2, 3, 48, 40)


def test_as_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="share a shape"):
        as_batch([_image(0), _image(1, h=32)])
    with pytest.raises(TypeError, match="uint8 or floating"):
        as_batch(torch.zeros(3, 16, 16, dtype=torch.int32))
    with pytest.raises(TypeError):
        as_batch("image.png")
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(_image(0), _image(0, h=32))


# ---------------------------------------------------------------------------------------------------
# PSNR / SSIM


def test_identical_images_give_inf_psnr_and_unit_ssim():
    arr = _image(3)
    assert psnr(arr, arr) == math.inf
    assert ssim(arr, arr) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_offset_is_20_db():
    ref = torch.full((3, 32, 32), 0.5, dtype=torch.float64)
    img = ref + 0.1  # MSE = 0.01 → PSNR = 10·log10(1 / 0.01) = 20 dB exactly
    assert psnr(img, ref) == pytest.approx(20.0, abs=1e-9)
    # uint8: an offset of 10 levels → MSE = (10/255)² → 20·log10(25.5)
    a = np.full((16, 16, 3), 100, np.uint8)
    assert psnr(a + 10, a) == pytest.approx(20 * math.log10(25.5), abs=1e-9)
    # The batch figure is the mean of per-image PSNRs (20 dB and 40 dB → 30 dB).
    batch = torch.stack([ref + 0.1, ref + 0.01])
    assert psnr(batch, torch.stack([ref, ref])) == pytest.approx(30.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [2.0, 10.0, 40.0])
def test_ssim_matches_scikit_image(sigma):
    ref = _image(1)
    rng = np.random.default_rng(7)
    img = np.clip(ref + rng.normal(0, sigma, ref.shape), 0, 255).astype(np.uint8)
    want = skimage_metrics.structural_similarity(
        img.astype(np.float64) / 255,
        ref.astype(np.float64) / 255,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    got = ssim(img, ref)
    # Both in float64; only summation order differs (separable conv vs scipy's filter).
    assert got == pytest.approx(want, abs=1e-9), f"ssim {got} vs scikit-image {want} (noise sigma {sigma})"
    assert got < 1.0


def test_ssim_decreases_with_noise_and_is_per_image():
    ref = _image(2)
    rng = np.random.default_rng(0)
    noisy = [np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).astype(np.uint8) for s in (3, 15, 60)]
    per = ssim_per_image(noisy, [ref] * 3)
    assert per[0] > per[1] > per[2], per
    assert ssim(noisy, [ref] * 3) == pytest.approx(float(np.mean(per)), abs=1e-12)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))


# ---------------------------------------------------------------------------------------------------
# Latent SQNR


def test_latent_sqnr_of_a_known_noise_level():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 256, 128, generator=g)
    noise = torch.randn(ref.shape, generator=g)
    for target_db in (10.0, 20.0, 35.0):
        # Scale the noise so Σnoise² = Σref² / 10^(dB/10): the SQNR is then exactly target_db.
        scale = math.sqrt(ref.double().pow(2).sum() / noise.double().pow(2).sum() / 10 ** (target_db / 10))
        x = (ref.double() + scale * noise.double()).float()
        # x is rounded to float32: relative error ~1e-7 of the signal → well under 0.01 dB at 35 dB.
        assert latent_sqnr(x, ref) == pytest.approx(target_db, abs=0.01)
    assert latent_sqnr(ref, ref) == math.inf
    assert latent_sqnr(ref.bfloat16(), ref) > 40  # bf16 rounding: 8 mantissa bits ≈ 50 dB
    with pytest.raises(ValueError, match="latent shapes differ"):
        latent_sqnr(ref[:1], ref)
    assert math.isnan(latent_sqnr(torch.full_like(ref, float("nan")), ref))


# ---------------------------------------------------------------------------------------------------
# compare / fidelity_row / LPIPS


def test_compare_returns_every_metric_and_labels_what_is_missing():
    ref = [_image(4), _image(5)]
    img = [np.clip(r.astype(int) + 6, 0, 255).astype(np.uint8) for r in ref]
    lat_ref = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1))
    row = compare(img, ref, lat_ref * 1.01, lat_ref)
    assert set(METRICS) <= set(row) and row["n_images"] == 2
    assert row["lpips"] == LPIPS_NOT_AVAILABLE
    # error = 1% of the signal → 40 dB; float32 rounding of lat_ref * 1.01 moves it by < 1e-3 dB.
    assert row["latent_sqnr_db"] == pytest.approx(40.0, abs=1e-3)
    assert row["psnr_db"] == pytest.approx(psnr(img, ref)) and 25 < row["psnr_db"] < 40
    assert row["ssim"] == pytest.approx(ssim(img, ref)) and 0.5 < row["ssim"] < 1.0
    assert compare(img, ref)["latent_sqnr_db"] == NO_LATENTS
    with pytest.raises(ValueError, match="both latents"):
        compare(img, ref, latents=lat_ref)


def test_synthetic_weights_are_labeled_never_scored():
    ref = [_image(4)]
    row = fidelity_row(ref, ref, synthetic_weights=True)
    assert all(row[m] == SKIPPED_SYNTHETIC for m in METRICS), row
    assert not any(is_score(row[m]) for m in METRICS)
    assert fidelity_row(synthetic_weights=True)["psnr_db"] == SKIPPED_SYNTHETIC
    real = fidelity_row(ref, ref, synthetic_weights=False)
    assert is_score(real["psnr_db"]) and is_score(real["ssim"]) and real["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="required"):
        fidelity_row(synthetic_weights=False)


class _ScaledMSE(torch.nn.Module):
    """A stand-in 'LPIPS': mean squared difference per image of its [-1, 1] inputs."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).pow(2).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_lpips_from_a_user_supplied_torchscript_file(tmp_path):
    path = tmp_path / "lpips.pt"
    torch.jit.script(_ScaledMSE()).save(str(path))
    ref = [_image(6), _image(7)]
    img = [np.clip(r.astype(int) + 20, 0, 255).astype(np.uint8) for r in ref]
    a, b = as_batch(img), as_batch(ref)
    want = float(((a * 2 - 1) - (b * 2 - 1)).pow(2).mean())  # inputs are mapped [0,1] → [-1,1]
    row = fidelity_row(img, ref, synthetic_weights=False, lpips_model=path)
    assert row["lpips"] == pytest.approx(want, rel=1e-5), row  # the module runs in float32
    assert fidelity.load_lpips(path) is fidelity.load_lpips(path)  # loaded once per path
    with pytest.raises(ValueError, match="no such file"):
        compare(img, ref, lpips_model=tmp_path / "missing.pt")
