"""FLUX.2 autoencoder against diffusers' AutoencoderKLFlux2 (tiny config, random weights), loaders, tiling."""

import pytest
import torch

from flux2_bench.autoencoder import (
    AE_PRESETS,
    AutoEncoder,
    _tiled,
    autoencoder_state,
    load_autoencoder,
    patchify,
    synthetic_autoencoder,
    unpatchify,
)
from flux2_bench.safetensors_io import CheckpointError, save_streaming

diffusers = pytest.importorskip("diffusers")

# fp32, same op order as diffusers up to conv/SDPA kernel choice: 1e-5 absolute on O(1) activations.
FP32_ATOL, FP32_RTOL = 1e-5, 1e-5


def _explain(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> str:
    bad = ~torch.isclose(a, b, atol=atol, rtol=rtol)
    idx = bad.nonzero()[:3].tolist()
    worst = float((a - b).abs().max())
    return f"{int(bad.sum())}/{a.numel()} differ (max {worst:.3g}); first {idx}; nan {bool(a.isnan().any())}"


def tiny_diffusers_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=32,
        patch_size=(2, 2),
    )
    with torch.no_grad():  # non-trivial norms and BN statistics, so a mapping slip shows
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae.eval()


@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    vae = tiny_diffusers_vae()
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder)
    return vae, load_autoencoder(folder), folder


def test_full_preset_matches_spec_parameter_count():
    with torch.device("meta"):
        ae = AutoEncoder(AE_PRESETS["flux.2"])
    n = sum(t.numel() for k, t in ae.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert n == 84_046_371, n  # spec §4.1, parameters + BN running stats
    assert len(ae.state_dict()) - 1 == 250  # spec §4.3: 250 tensors incl. BN stats


def test_patchify_roundtrip_and_channel_order():
    z = torch.randn(2, 3, 4, 6)
    p = patchify(z)
    assert p.shape == (2, 12, 2, 3)
    # channel c*4 + pi*2 + pj holds z[c, 2i+pi, 2j+pj] (spec §4.2)
    assert p[1, 2 * 4 + 1 * 2 + 0, 1, 2] == z[1, 2, 3, 4]
    assert torch.equal(unpatchify(p), z)


def test_encode_decode_match_diffusers(vae_pair):
    vae, ae, _ = vae_pair
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
        ref = patchify(mean)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        ref = (ref - vae.bn.running_mean.view(1, -1, 1, 1)) / std
        got = ae.encode(x)
        assert torch.allclose(got, ref, atol=FP32_ATOL, rtol=FP32_RTOL), _explain(got, ref, FP32_ATOL, FP32_RTOL)
        z = torch.randn_like(ref)
        raw = unpatchify(z * std + vae.bn.running_mean.view(1, -1, 1, 1))
        img_ref = vae.decode(raw).sample
        img = ae.decode(z)
        assert torch.allclose(img, img_ref, atol=FP32_ATOL, rtol=FP32_RTOL), _explain(
            img, img_ref, FP32_ATOL, FP32_RTOL
        )


def test_bfl_and_diffusers_layouts_roundtrip(vae_pair, tmp_path):
    vae, ae, _ = vae_pair
    # BFL single file: our names, loaded back without renaming
    save_streaming(tmp_path / "ae.safetensors", autoencoder_state(ae, "bfl"))
    ae2 = load_autoencoder(tmp_path / "ae.safetensors")
    assert ae2.config == ae.config
    for (k, a), (_, b) in zip(ae.state_dict().items(), ae2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # diffusers names: our export loads strictly into diffusers' own module
    state = autoencoder_state(ae, "diffusers")
    missing, unexpected = vae.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)


def test_loader_rejects_wrong_files(tmp_path, vae_pair):
    _, ae, _ = vae_pair
    state = autoencoder_state(ae, "bfl")
    state.pop("decoder.up.0.block.1.conv2.weight")
    state["stray.weight"] = torch.zeros(1)
    save_streaming(tmp_path / "bad.safetensors", state)
    with pytest.raises(CheckpointError, match=r"1 missing .*decoder\.up\.0\.block\.1\.conv2.*1 unexpected"):
        load_autoencoder(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="no autoencoder found"):
        load_autoencoder(tmp_path)
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError):
        load_autoencoder(tmp_path / "trunc.safetensors")


def test_bad_image_shape_is_a_clear_error(vae_pair):
    _, ae, _ = vae_pair
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"latent must be \(B, 32"):
        ae.decode(torch.zeros(1, 16, 8, 8))


def test_tile_blend_is_a_partition_of_unity():
    # A purely local map (nearest x4 upsample of a pointwise function) has no tile dependence, so
    # tiled == untiled up to fp32 rounding of the weighted average (1e-6): this checks offsets and
    # that the ramp weights sum to one everywhere, including odd tile counts and a flush last tile.
    fn = lambda t: torch.nn.functional.interpolate(torch.tanh(t[:, :2]) * 3, scale_factor=4.0)
    x = torch.randn(1, 3, 36, 52)
    got = _tiled(fn, x, tile=16, overlap=6, align=2, scale=4, out_channels=2)
    assert torch.allclose(got, fn(x), atol=1e-6, rtol=1e-6), _explain(got, fn(x), 1e-6, 1e-6)


def test_tiled_vae_close_to_untiled():
    ae = synthetic_autoencoder("tiny", dtype=torch.float32, seed=1)
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        y = ae.decode(z)
        # one tile that covers everything is the untiled computation
        assert torch.equal(ae.decode(z, tiled=True, tile_size=128), y)
        zt = ae.encode(x, tiled=True, tile_size=64, tile_overlap=32)
        yt = ae.decode(z, tiled=True, tile_size=64, tile_overlap=32)
    # Tiling is not exact by construction: GroupNorm statistics and the mid-block attention see one
    # tile, not the image. On a stationary (i.i.d.) input the per-tile statistics differ from the
    # global ones only by sampling noise (~1/sqrt(positions per tile)), measured 5 % (encode) and 8.5 %
    # (decode) of the output std in mean absolute error; 0.12 leaves margin and still fails for a
    # misplaced tile or broken blend (those give errors of order 1 std).
    for name, a, b in (("encode", zt, z), ("decode", yt, y)):
        rel = float((a - b).abs().mean() / b.std())
        assert rel < 0.12, f"{name}: tiled mean |err| = {rel:.3f} of std"
        assert torch.isfinite(a).all()
