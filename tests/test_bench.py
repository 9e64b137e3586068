"""flux2-bench run end to end on the tiny preset (CPU), its robustness, and the CLI."""

import json

import pytest
import torch

from flux2_bench import bench
from flux2_bench.bench import RunConfig, run
from flux2_bench.cli import bench_main
from flux2_bench.results import read_results

SMALL = dict(preset="tiny", recipes=("fp8-row", "int4-g128"), resolutions=(128,), steps=2, tiers=("rtx3060",))


def test_default_run_writes_a_complete_report_that_agrees_with_results(tmp_path):
    out = run(RunConfig(**SMALL, out=str(tmp_path / "run"), device="cpu"), progress=False)
    env, rows, rest = read_results(out)
    measured = [r for r in rows if r.label == "measured"]
    assert [r.recipe for r in measured] == ["bf16", "fp8-row", "int4-g128"]  # bf16 first: the baseline
    for r in measured:
        assert r.status == "ok", r
        assert r.ms_per_step > 0 and r.ms_per_step_p10 <= r.ms_per_step <= r.ms_per_step_p90
        assert r.denoise_s > 0 and r.decode_s > 0 and r.images_per_min > 0
        assert r.weights_gib > 0
        assert r.fidelity["psnr_db"].startswith("skipped: synthetic")
        assert r.typography["status"].startswith("skipped: synthetic")
    assert measured[1].weights_gib < measured[0].weights_gib  # fp8 block linears are half of bf16
    tiers = [r for r in rows if r.tier == "rtx3060"]
    assert len(tiers) == 3 and all(r.label == "projected" and r.placement == "resident" for r in tiers)
    for name in ("report.md", "report.html", "results.csv", "fits_matrix.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    for r in measured:  # every measured figure in the report is the one in results.json
        assert f"| {r.recipe} | at-hand | resident | measured | {r.ms_per_step:,.2f} |" in md
    assert env.command and rest["config"]["preset"] == "tiny"


def test_interrupted_run_keeps_rows_and_resume_finishes_it(tmp_path, monkeypatch):
    real = bench._measure_cell
    calls = []

    def stop_on_second(cfg, cell, state, progress):
        calls.append(cell.recipe)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(cfg, cell, state, progress)

    monkeypatch.setattr(bench, "_measure_cell", stop_on_second)
    d = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(RunConfig(**SMALL, out=str(d), device="cpu"), progress=False)
    _, rows, _ = read_results(d)
    assert [r.recipe for r in rows if r.label == "measured"] == ["bf16"]
    assert (d / "report.md").is_file()  # the report of what was measured is written on Ctrl-C

    monkeypatch.setattr(bench, "_measure_cell", real)
    run(RunConfig(**SMALL, resume=str(d), device="cpu"), progress=False)
    _, rows, _ = read_results(d)
    assert [r.recipe for r in rows if r.label == "measured"] == ["bf16", "fp8-row", "int4-g128"]


def test_oom_cell_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = bench._pipeline

    def oom_for_fp8(cfg, recipe, **kw):
        if recipe == "fp8-row":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(cfg, recipe, **kw)

    monkeypatch.setattr(bench, "_pipeline", oom_for_fp8)
    out = run(RunConfig(**SMALL, out=str(tmp_path / "run"), device="cpu"), progress=False)
    _, rows, _ = read_results(out)
    status = {r.recipe: (r.status, r.placement) for r in rows if r.label == "measured"}
    assert status == {"bf16": ("ok", "resident"), "fp8-row": ("oom", "does-not-fit"), "int4-g128": ("ok", "resident")}
    assert "oom" in (out / "report.md").read_text()


def test_non_finite_output_is_flagged(tmp_path, monkeypatch):
    real = bench._pipeline

    def nan_for_int4(cfg, recipe, **kw):
        pipe = real(cfg, recipe, **kw)
        if recipe == "int4-g128":
            pipe.transformer.final_layer.register_forward_hook(lambda m, i, o: o * float("nan"))
        return pipe

    monkeypatch.setattr(bench, "_pipeline", nan_for_int4)
    out = run(RunConfig(**SMALL, out=str(tmp_path / "run"), device="cpu"), progress=False)
    _, rows, _ = read_results(out)
    flagged = {r.recipe: r.status for r in rows if r.label == "measured"}
    assert flagged["int4-g128"] == "non-finite" and flagged["bf16"] == "ok"


def test_prompts_file_is_rendered_as_one_batch(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that reads "HELLO"\n\na poster that says "42"\n')
    out = run(RunConfig(**{**SMALL, "recipes": ()}, prompts=str(prompts), out=str(tmp_path / "r"), device="cpu"),
              progress=False)  # fmt: skip
    _, rows, _ = read_results(out)
    (bf16,) = [r for r in rows if r.label == "measured"]
    assert bf16.fidelity["n_images"] == 2
    assert bf16.images_per_min == pytest.approx(2 * 60 / bf16.total_s)
    with pytest.raises(FileNotFoundError, match="no such file"):
        RunConfig(prompts=str(tmp_path / "missing.txt"), device="cpu").resolve()
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        RunConfig(prompts=str(tmp_path / "empty.txt"), device="cpu").resolve()


def test_bad_configs_fail_with_the_valid_choices():
    with pytest.raises(ValueError, match="unknown recipe"):
        RunConfig(recipes=("fp7",), device="cpu").resolve()
    with pytest.raises(ValueError, match="valid presets"):
        RunConfig(preset="flux3", device="cpu").resolve()
    with pytest.raises(ValueError, match="multiple of 16"):
        RunConfig(resolutions=(1000,), device="cpu").resolve()
    with pytest.raises(ValueError, match="rtx4090"):
        RunConfig(tiers=("rtx9090",), device="cpu").resolve()


def test_cli_run_and_report(tmp_path, capsys):
    d = tmp_path / "cli"
    code = bench_main(["run", "--preset", "tiny", "--recipes", "nf4", "--resolutions", "128", "--steps", "1",
                       "--tiers", "rtx4090", "--out", str(d), "--device", "cpu"])  # fmt: skip
    assert code == 0
    doc = json.loads((d / "results.json").read_text())
    assert {r["recipe"] for r in doc["rows"]} == {"bf16", "nf4"}
    assert bench_main(["report", str(d)]) == 0
    assert bench_main(["report", str(tmp_path / "empty")]) == 1


def test_step_figures_reproduce_the_measured_step_on_the_measuring_gpu():
    """Per-kernel efficiencies from the probe + the rest as memory-bound bytes: projecting the figures
    back onto the GPU that measured them must give the measured step; on an RTX 4090 the compute
    terms scale with its fp32-accumulate rates and the memory term with its bandwidth."""
    from flux2_bench.model import get_preset
    from flux2_bench.tiers import get_tier, make_placement, project_step_ms

    h100, rtx4090 = get_tier("h100"), get_tier("rtx4090")
    kernels = [
        {"name": "cuBLAS bf16 linear1", "tflops": 700.0},
        {"name": bench._PROBE_ATTENTION, "tflops": 600.0},
    ]
    figs = bench.step_figures(
        config=get_preset("flux.2-dev"), recipe="bf16", n_img=4096, n_txt=512, step_ms=520.0, at_hand=h100,
        kernels=kernels, block_bytes=(10**9,) * 56, other_bytes=2 * 10**9,
    )  # fmt: skip
    # 253.4 TFLOP of GEMM at 700 TFLOP/s = 362 ms, 29.2 TFLOP of attention at 600 = 48.7 ms: the other
    # ~109 ms become memory-bound bytes at the H100's 3352 GB/s
    assert figs.efficiency["gemm_bf16"] == pytest.approx(700 / h100.rate_tflops("gemm_bf16")[0])
    assert figs.memory_bytes / 3352e9 * 1e3 == pytest.approx(520 - 362.0 - 48.7, abs=1.5)
    back = project_step_ms(figs, h100, make_placement(figs, "resident"))
    assert back.step_ms == pytest.approx(520.0, rel=1e-6)
    on_4090 = project_step_ms(figs, rtx4090, make_placement(figs, "resident")).step_ms
    gemm_4090 = 253.4e12 / (rtx4090.rate_tflops("gemm_bf16")[0] * 1e12 * figs.efficiency["gemm_bf16"]) * 1e3
    assert on_4090 > gemm_4090 > 520  # a 4090 has a fraction of the H100's bf16 fp32-acc rate
    # without a probe row the step's own efficiency stands in for every kind
    lumped = bench.step_figures(
        config=get_preset("flux.2-dev"), recipe="nf4", n_img=4096, n_txt=512, step_ms=520.0, at_hand=h100,
        kernels=[], block_bytes=(10**9,) * 56, other_bytes=10**9,
    )  # fmt: skip
    assert lumped.memory_bytes == 0 and len(set(lumped.efficiency.values())) == 1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A diffusers-layout FLUX.2 folder with a tiny transformer, VAE and Mistral3 (random weights)."""
    import diffusers
    from test_autoencoder import tiny_diffusers_vae
    from test_text_encoder import tiny_mistral3, tiny_tokenizer

    from flux2_bench.model import get_preset
    from flux2_bench.weights import diffusers_config

    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    hf = diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=tiny_diffusers_vae(),
        text_encoder=tiny_mistral3(),
        tokenizer=tiny_tokenizer("mistral"),
        transformer=diffusers.Flux2Transformer2DModel(**diffusers_config(get_preset("tiny"))),
    )
    hf.save_pretrained(root / "flux2")
    return root / "flux2"


def test_run_with_a_checkpoint_scores_fidelity_and_typography(tmp_path, tiny_checkpoint):
    """The real-weights path: prompts through the text encoder (cached), fidelity against bf16 with the
    same seed, the typography suite rendered, OCR-scored and compared with bf16."""
    cfg = RunConfig(
        checkpoint=str(tiny_checkpoint), recipes=("fp8-row",), resolutions=(64,), steps=2, tiers=(),
        typography_prompts=2, out=str(tmp_path / "run"), device="cpu",
    )  # fmt: skip
    out = run(cfg, progress=False)
    _, rows, rest = read_results(out)
    bf16, fp8 = (r for r in rows if r.label == "measured")
    assert (bf16.recipe, fp8.recipe) == ("bf16", "fp8-row") and bf16.weights == str(tiny_checkpoint)
    assert bf16.fidelity == {"status": "baseline"}
    assert isinstance(fp8.fidelity["psnr_db"], float) and isinstance(fp8.fidelity["latent_sqnr_db"], float)
    assert fp8.fidelity["latent_sqnr_db"] > 15  # fp8 weights of a random model: close, not equal
    assert "rapidocr" in fp8.typography and "delta_vs_bf16" in fp8.typography
    assert fp8.typography["rapidocr"]["n"] == 2
    assert len(rest["typography_images"]) == 4  # 2 prompts x 2 recipes
    assert len(list((out / "images" / "fp8-row").glob("*.png"))) == 2
    assert any((out / "embeddings").iterdir())  # the text encoder ran once per prompt, then was cached
