"""Position ids, schedule (against diffusers' Flux2Pipeline), noise and the Euler loop."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flux2_bench.sampling import (
    compute_empirical_mu,
    denoise,
    get_noise,
    get_schedule,
    image_ids,
    pack,
    reference_ids,
    text_ids,
    unpack,
)

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as DiffusersFlux2Pipeline  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu as hf_mu  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2 import retrieve_timesteps  # noqa: E402


@pytest.mark.parametrize("seq_len", [16, 1024, 4096, 4300, 4301, 16384])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_schedule_matches_diffusers(seq_len, steps):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = hf_mu(image_seq_len=seq_len, num_steps=steps)
    assert compute_empirical_mu(seq_len, steps) == pytest.approx(mu, rel=1e-12)
    timesteps, n = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    ours = torch.tensor(get_schedule(steps, seq_len))
    assert n == steps and len(ours) == steps + 1
    # diffusers keeps sigmas in fp32: 1e-6 is a few fp32 ulps at 1.0
    assert torch.allclose(ours.float(), sched.sigmas, atol=1e-6, rtol=0), (ours, sched.sigmas)
    assert torch.allclose(ours[:-1].float() * 1000, timesteps, atol=1e-3, rtol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_mu_examples_from_spec():
    # spec §5.2 worked examples
    assert compute_empirical_mu(4096, 50) == pytest.approx(2.023, abs=1e-3)
    assert compute_empirical_mu(4096, 28) == pytest.approx(2.151, abs=1e-3)
    assert compute_empirical_mu(1024, 50) == pytest.approx(1.702, abs=1e-3)
    assert compute_empirical_mu(16384, 50) == pytest.approx(3.230, abs=1e-3)
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule(0, 10)


def test_ids_match_diffusers():
    lat = torch.zeros(2, 32, 3, 5)
    ours = image_ids(3, 5, batch=2)
    assert torch.equal(ours, DiffusersFlux2Pipeline._prepare_latent_ids(lat))
    refs = [torch.zeros(1, 32, 2, 3), torch.zeros(1, 32, 4, 1), torch.zeros(1, 32, 1, 2)]
    hf = DiffusersFlux2Pipeline._prepare_image_ids(refs)
    got = reference_ids([(2, 3), (4, 1), (1, 2)])
    assert torch.equal(got, hf)
    assert got[0, :, 0].unique().tolist() == [10, 20, 30]
    assert torch.equal(text_ids(7, batch=2), DiffusersFlux2Pipeline._prepare_text_ids(torch.zeros(2, 7, 3)))
    assert reference_ids([]).shape == (1, 0, 4)


def test_pack_unpack_matches_diffusers_and_roundtrips():
    x = torch.randn(2, 8, 3, 4)
    p = pack(x)
    assert torch.equal(p, DiffusersFlux2Pipeline._pack_latents(x))
    assert torch.equal(unpack(p, 3, 4), x)
    assert torch.equal(DiffusersFlux2Pipeline._unpack_latents_with_ids(p, image_ids(3, 4, batch=2)), x)
    with pytest.raises(ValueError, match="cannot fill"):
        unpack(p, 4, 4)


def test_noise_is_seeded_on_cpu_fp32():
    a = get_noise(1, 8, 4, 4, seed=3)
    b = get_noise(1, 8, 4, 4, seed=3, dtype=torch.bfloat16)
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
    assert torch.equal(a.bfloat16(), b)  # cast after drawing, not drawn in bf16
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a, torch.randn(1, 8, 4, 4, generator=g))
    assert not torch.equal(a, get_noise(1, 8, 4, 4, seed=4))


@dataclass
class _Cfg:
    use_guidance_embed: bool = True


class _ConstantVelocity(torch.nn.Module):
    """v = c for target tokens, a huge value at reference positions (must be discarded)."""

    def __init__(self):
        super().__init__()
        self.config = _Cfg()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, t, guidance):
        self.calls.append((img.shape[1], img_ids.shape[1], float(t[0]), float(guidance[0])))
        out = torch.full_like(img, 0.5)
        out[:, 6:] = 1e6
        return out


def test_denoise_euler_and_references():
    model = _ConstantVelocity()
    x0 = torch.randn(1, 6, 4)
    refs = torch.randn(1, 3, 4)
    ts = get_schedule(5, 6)
    out = denoise(
        model, x0, image_ids(2, 3), torch.zeros(1, 2, 4), text_ids(2), ts, 4.0,
        ref_tokens=refs, ref_ids=reference_ids([(1, 3)]), progress=False,
    )  # fmt: skip
    # constant v integrates exactly: x(0) = x(1) + (0 - 1) * v
    assert torch.allclose(out, x0 - 0.5, atol=1e-6)
    assert [c[:2] for c in model.calls] == [(9, 9)] * 5
    assert [c[2] for c in model.calls] == pytest.approx(ts[:-1], abs=1e-6)
    assert all(c[3] == 4.0 for c in model.calls)
    with pytest.raises(ValueError, match="ref_ids"):
        denoise(model, x0, image_ids(2, 3), torch.zeros(1, 2, 4), text_ids(2), ts, 4.0, ref_tokens=refs)
    with pytest.raises(ValueError, match="guidance"):
        denoise(model, x0, image_ids(2, 3), torch.zeros(1, 2, 4), text_ids(2), ts, None, progress=False)
