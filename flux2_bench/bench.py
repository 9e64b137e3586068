"""`flux2-bench run`: a matrix of (recipe x resolution x references) measured on the device at hand,
with each chosen RTX tier emulated (VRAM cap) and projected (roofline), written as data rows and a report.

Per cell: transformer ms/step (median, p10, p90), the end-to-end split (encode, denoise, decode),
images per minute, weights GiB, allocator peak and NVML device peak; fidelity against bf16 (same
seed and noise) and typography (OCR) with real weights, labeled as skipped with synthetic ones.

Robustness: each cell is written to results.json as soon as it is measured; an out-of-memory cell is
recorded and the run goes on; non-finite output is flagged; Ctrl-C keeps what was measured and
writes the report; `--resume DIR` skips the cells DIR already holds.
"""

from __future__ import annotations

import datetime
import gc
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flux2_bench.model import get_preset
from flux2_bench.results import Environment, Row, read_results, write_results

DEFAULT_RECIPES = ("bf16", "fp8-row", "fp8-block", "nf4", "int4-g128")
GIB = 2**30


@dataclass(frozen=True)
class RunConfig:
    """What `flux2-bench run` measures. None fields take the device's defaults (`resolve`)."""

    checkpoint: str | None = None  # a pipeline folder (official files or diffusers layout); None = synthetic
    preset: str | None = None  # synthetic runs: default tiny on CPU, flux.2-dev on a GPU
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    resolutions: tuple[int, ...] | None = None  # square sides in px: default 256 on CPU, 1024 on a GPU
    refs: tuple[int, ...] = (0,)
    steps: int | None = None  # default: 4 with synthetic weights (timing only), the preset's with real ones
    tiers: tuple[str, ...] | None = None  # default: rtx3060, rtx4090, rtx5090
    prompts: str | None = None  # a text file, one prompt per line, rendered as one batch per cell
    typography_prompts: int = 30  # how many suite prompts each recipe renders (real weights)
    out: str | None = None  # run directory; default runs/<UTC time>
    resume: str | None = None
    anchors: bool = False  # diffusers / torchao / bitsandbytes anchors (GPU only)
    seed: int = 0
    device: str | None = None

    def resolve(self) -> RunConfig:
        cuda = torch.cuda.is_available() if self.device is None else self.device.startswith("cuda")
        device = self.device or ("cuda" if cuda else "cpu")
        synthetic = self.checkpoint is None
        preset = self.preset or ("flux.2-dev" if cuda else "tiny")
        get_preset(preset)  # exact look-up, fails listing the names
        from flux2_bench.quantize.recipes import Recipe

        valid = ("bf16", *(r.value for r in Recipe))
        bad = [r for r in self.recipes if r not in valid]
        if bad:
            raise ValueError(f"unknown recipe(s) {bad}; valid: {', '.join(valid)}")
        recipes = tuple(dict.fromkeys(("bf16", *self.recipes)))  # bf16 first: the fidelity baseline
        from flux2_bench.tiers import get_tier

        tiers = self.tiers if self.tiers is not None else ("rtx3060", "rtx4090", "rtx5090")
        for t in tiers:
            get_tier(t)
        resolutions = self.resolutions or ((1024,) if cuda else (256,))
        for r in resolutions:
            if r % 16 or r < 64 or r * r > 4 * 1024 * 1024 + 1:
                raise ValueError(f"resolution {r}: needs a multiple of 16 between 64 and 2048 (4 MP)")
        for n in self.refs:
            if not 0 <= n <= 10:
                raise ValueError(f"references per cell must be 0..10, got {n}")
        load_prompts(self.prompts)  # a missing or empty prompts file fails before any work
        steps = self.steps or (4 if synthetic else get_preset(preset).default_steps)
        out = self.out or self.resume or f"runs/{datetime.datetime.now(datetime.UTC):%Y%m%d-%H%M%S}"
        return replace(
            self, device=device, preset=preset, recipes=recipes, tiers=tuple(tiers), resolutions=tuple(resolutions),
            steps=steps, out=out,
        )  # fmt: skip


@dataclass
class Cell:
    recipe: str
    size: int
    refs: int


@dataclass
class _State:
    rows: list[Row] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)  # (size, refs) -> bf16 images / latents, for fidelity
    typography: list[dict] = field(default_factory=list)  # score_suite input rows
    kernels: list[dict] = field(default_factory=list)


def _elementwise_path(device: str) -> str:
    """Which block elementwise path the transformer runs on `device` (model.use_fused)."""
    from flux2_bench.model import fused_active

    return "fused triton kernels" if fused_active(torch.empty(0, device=device)) else "plain torch ops"


def run(config: RunConfig, *, progress: bool = True) -> Path:
    """Measure every cell of `config`, write results.json/csv after each, then the report. Returns the
    run directory. Ctrl-C stops after writing what was measured."""
    cfg = config.resolve()
    out = Path(cfg.out)
    env = Environment.capture()
    state = _State()
    done: set[tuple] = set()
    if cfg.resume:
        if not (Path(cfg.resume) / "results.json").is_file():
            raise FileNotFoundError(f"--resume {cfg.resume}: no results.json there")
        _, state.rows, rest = read_results(cfg.resume)
        state.typography = rest.get("typography_images", [])
        state.kernels = rest.get("kernels", [])
        done = {r.key() for r in state.rows if r.status != "interrupted"}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        extra = {"config": _config_dict(cfg), "typography_images": state.typography, "kernels": state.kernels}
        write_results(out, env, state.rows, extra)
        if state.kernels:
            (out / "kernels.json").write_text(json.dumps(state.kernels, indent=2))

    cells = [Cell(r, s, n) for s in cfg.resolutions for n in cfg.refs for r in cfg.recipes]
    interrupted = False
    bar = tqdm(cells, desc="cells", unit="cell", disable=not progress)
    try:
        if cfg.device.startswith("cuda") and not state.kernels:
            state.kernels = _kernel_probe(cfg)
            save()
        for cell in bar:
            bar.set_postfix_str(f"{cell.recipe} {cell.size}² refs={cell.refs}")
            key = Row(cfg.preset, cell.recipe, cell.size, cell.size, cell.refs, cfg.steps, _weights(cfg)).key()
            if key in done:
                continue
            state.rows += _measure_cell(cfg, cell, state, progress)
            save()
        if cfg.anchors and cfg.device.startswith("cuda"):
            for size in cfg.resolutions:
                state.rows += _measure_anchors(cfg, size)
                save()
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping the rows measured so far", flush=True)
    finally:
        bar.close()
    _attach_typography(state)
    save()
    from flux2_bench.report import write_report

    write_report(out)
    print(f"{'partial ' if interrupted else ''}results in {out}/ (report.md, report.html, results.json)")
    if interrupted:
        raise KeyboardInterrupt
    return out


def _config_dict(cfg: RunConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}


def _weights(cfg: RunConfig) -> str:
    return cfg.checkpoint or "synthetic"


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -- building a pipeline ---------------------------------------------------------------------------------


def _pipeline(cfg: RunConfig, recipe: str, tiled_vae: bool = False):
    """The pipeline of one recipe: synthetic components, or real ones from the checkpoint folder.
    `tiled_vae` above 1 MP: an untiled 2048² decode takes +37 GiB (reports/pipeline)."""
    from flux2_bench.pipeline import Flux2Pipeline

    dtype = torch.bfloat16
    quant = None if recipe == "bf16" else recipe
    if cfg.checkpoint is None:
        from flux2_bench.autoencoder import synthetic_autoencoder
        from flux2_bench.weights import synthetic_transformer

        transformer = synthetic_transformer(cfg.preset, device=cfg.device, dtype=dtype, seed=cfg.seed, recipe=quant)
        ae = "tiny" if transformer.config.in_channels == 32 else "flux.2"
        vae = synthetic_autoencoder(ae, device=cfg.device, dtype=dtype, seed=cfg.seed)
        return Flux2Pipeline(transformer, vae, None, device=cfg.device, tiled_vae=tiled_vae)
    return Flux2Pipeline.from_pretrained(
        cfg.checkpoint, device=cfg.device, dtype=dtype, recipe=quant, load_text_encoder=False,
        embedding_cache=Path(cfg.out) / "embeddings", tiled_vae=tiled_vae,
    )  # fmt: skip


DEFAULT_PROMPT = 'A storefront sign that reads "OPEN 24 HOURS", photographed at dusk'


def load_prompts(path: str | None) -> list[str]:
    """The prompts each cell renders as one batch (fidelity is scored over all of them): one per
    non-empty line of `path`, or a single built-in prompt."""
    if path is None:
        return [DEFAULT_PROMPT]
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in it (one per line)")
    return prompts


def _prompt_embeds(cfg: RunConfig, pipe, prompts: list[str]) -> torch.Tensor:
    """Embeddings for `prompts`: seeded random stand-ins with synthetic weights; with real weights the
    text encoder runs once per prompt (cached on disk in the run directory), then is freed."""
    from flux2_bench.pipeline import synthetic_prompt_embeds

    if cfg.checkpoint is None:
        return torch.cat(
            [synthetic_prompt_embeds(p, pipe.transformer.config.context_in_dim, seed=cfg.seed) for p in prompts]
        )
    from flux2_bench.pipeline import Flux2Pipeline

    cache_dir = Path(cfg.out) / "embeddings"
    enc = Flux2Pipeline.from_pretrained(
        cfg.checkpoint, device=cfg.device, load_text_encoder=True, embedding_cache=cache_dir
    )  # fmt: skip
    try:
        return enc.encode_prompt(prompts)
    finally:
        if enc.text_encoder is not None:
            enc.text_encoder.unload()
        del enc
        _free()


def _reference_images(cell: Cell, seed: int) -> list:
    """Synthetic references: seeded noise images of the cell's size (≤ 1 MP each when several)."""
    import numpy as np
    from PIL import Image

    side = cell.size if cell.refs <= 1 else min(cell.size, 1024)
    rng = np.random.default_rng(seed + 17)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(cell.refs)]


# -- one cell --------------------------------------------------------------------------------------------


def _measure_cell(cfg: RunConfig, cell: Cell, state: _State, progress: bool) -> list[Row]:
    from flux2_bench.measure import PeakMemory, cuda_timing, is_oom
    from flux2_bench.weights import model_bytes

    base = Row(cfg.preset, cell.recipe, cell.size, cell.size, cell.refs, cfg.steps, _weights(cfg))
    _free()
    pipe = None
    try:
        pipe = _pipeline(cfg, cell.recipe, tiled_vae=cell.size * cell.size > 1024 * 1024)
        prompts = load_prompts(cfg.prompts)
        embeds = _prompt_embeds(cfg, pipe, prompts)  # one batch: every prompt, same seed
        refs = _reference_images(cell, cfg.seed)
        guidance = pipe.transformer.config.default_guidance
        with torch.inference_mode():  # warm-up: Triton autotuning and compilation stay out of the split
            pipe.generate(
                prompt_embeds=embeds, width=cell.size, height=cell.size, steps=1, guidance=guidance,
                seed=cfg.seed, reference_images=refs, output_type="latent", progress=False,
            )  # fmt: skip
        _free()
        with torch.inference_mode(), PeakMemory() as mem:
            result = pipe.generate(
                prompt_embeds=embeds, width=cell.size, height=cell.size, steps=cfg.steps, guidance=guidance,
                seed=cfg.seed, reference_images=refs, output_type="pil", progress=progress,
            )  # fmt: skip
        step_args = _step_inputs(pipe, cell, embeds, refs)
        with torch.inference_mode():
            timing = cuda_timing(
                lambda: pipe.transformer(*step_args), warmup=1, repeats=5 if cfg.device != "cpu" else 3
            )
            out = pipe.transformer(*step_args)
        finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(result.latents).all())
        t = result.timings
        total = t.get("total_s")
        row = replace(
            base,
            status="ok" if finite else "non-finite",
            ms_per_step=timing.median,
            ms_per_step_p10=timing.p10,
            ms_per_step_p90=timing.p90,
            encode_s=t.get("encode_s"),
            denoise_s=t.get("denoise_s"),
            decode_s=t.get("decode_s"),
            total_s=total,
            images_per_min=60.0 * len(prompts) / total if total else None,
            weights_gib=model_bytes(pipe.transformer) / GIB,
            peak_allocated_gib=mem.allocator_peak_bytes / GIB if mem.allocator_peak_bytes else None,
            peak_device_gib=mem.device_peak_bytes / GIB if mem.device_peak_bytes else None,
            kernels={"clock": timing.clock, "elementwise": _elementwise_path(cfg.device),
                     "linear1": pipe.transformer.single_blocks[0].linear1.__class__.__name__,
                     **({"kernel": pipe.transformer.single_blocks[0].linear1.kernel(torch.device(cfg.device))}
                        if hasattr(pipe.transformer.single_blocks[0].linear1, "kernel") else {})},
            notes="" if finite else "NaN or Inf in the transformer output or final latents",
        )  # fmt: skip
        row.fidelity = _fidelity(cfg, cell, state, result)
        row.typography = _typography(cfg, cell, pipe, state, progress)
        rows = [row]
        rows += _tier_rows(cfg, cell, pipe, row, step_args, state.kernels)
        return rows
    except Exception as e:
        if is_oom(e):
            return [replace(base, status="oom", placement="does-not-fit", notes=str(e).splitlines()[0][:300])]
        return [replace(base, status=f"error: {type(e).__name__}: {str(e)[:300]}")]
    finally:
        pipe = None
        _free()


def _step_inputs(pipe, cell: Cell, embeds: torch.Tensor, refs: list) -> tuple:
    """One transformer step's inputs with the cell's exact token counts."""
    from flux2_bench.pipeline import MULTI_REF_PIXELS, SINGLE_REF_PIXELS, prepare_reference
    from flux2_bench.sampling import image_ids, reference_ids, text_ids

    cfg = pipe.transformer.config
    dev, dt = pipe.device, next(pipe.transformer.parameters()).dtype
    h = w = cell.size // 16
    sizes = []
    cap = SINGLE_REF_PIXELS if len(refs) == 1 else MULTI_REF_PIXELS
    for ref in refs:
        t = prepare_reference(ref, cap)
        sizes.append((t.shape[-2] // 16, t.shape[-1] // 16))
    ids = [image_ids(h, w, device=dev)]
    if sizes:
        ids.append(reference_ids(sizes).to(dev))
    img_ids = torch.cat(ids, dim=1)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, img_ids.shape[1], cfg.in_channels, generator=g).to(dev, dt)
    txt = embeds[:1].to(dev, dt)
    t = torch.full((1,), 0.5, device=dev, dtype=dt)
    guidance = torch.full((1,), cfg.default_guidance or 4.0, device=dev, dtype=dt) if cfg.use_guidance_embed else None
    return img, img_ids, txt, text_ids(txt.shape[1], device=dev), t, guidance


# -- quality ---------------------------------------------------------------------------------------------


def _fidelity(cfg: RunConfig, cell: Cell, state: _State, result) -> dict:
    from flux2_bench.fidelity import fidelity_row

    if cfg.checkpoint is None:
        return fidelity_row(result.images, synthetic_weights=True)
    key = (cell.size, cell.refs)
    if cell.recipe == "bf16":
        state.baseline[key] = (result.images, result.latents.cpu())
        return {"status": "baseline"}
    if key not in state.baseline:
        return {"status": "skipped: no bf16 baseline in this run for this cell"}
    images, latents = state.baseline[key]
    return fidelity_row(result.images, images, result.latents.cpu(), latents, synthetic_weights=False)


def _typography(cfg: RunConfig, cell: Cell, pipe, state: _State, progress: bool) -> dict:
    """Render the suite's prompts with this recipe and OCR them (real weights, first cell size, no refs)."""
    if cfg.checkpoint is None:
        return {"status": "skipped: synthetic weights render no text"}
    if cell.refs or cell.size != cfg.resolutions[0]:
        return {"status": "skipped: typography runs at the first resolution without references"}
    from flux2_bench.typography import load_suite, score_image, score_suite

    suite = load_suite()[: cfg.typography_prompts]
    embeds = _prompt_embeds(cfg, pipe, [p.prompt for p in suite])
    img_dir = Path(cfg.out) / "images" / cell.recipe
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(tqdm(suite, desc=f"typography {cell.recipe}", disable=not progress)):
        with torch.inference_mode():
            res = pipe.generate(
                prompt_embeds=embeds[i : i + 1], width=cell.size, height=cell.size, steps=cfg.steps,
                guidance=pipe.transformer.config.default_guidance, seed=cfg.seed, progress=False,
            )  # fmt: skip
        res.images[0].save(img_dir / f"{p.id}.png")
        state.typography.append({"recipe": cell.recipe, "id": p.id, "scores": score_image(res.images[0], p.target)})
    return score_suite([r for r in state.typography if r["recipe"] == cell.recipe]).get(cell.recipe, {})


def _attach_typography(state: _State) -> None:
    """Deltas against bf16 once both are measured (the report reads `delta_vs_bf16`)."""
    from flux2_bench.typography import delta_vs, score_suite

    if not state.typography:
        return
    summary = score_suite(state.typography)
    if "bf16" not in summary:
        return
    deltas = delta_vs(summary)
    for row in state.rows:
        if row.label == "measured" and row.recipe in deltas and isinstance(row.typography, dict):
            row.typography = {**summary[row.recipe], "delta_vs_bf16": deltas[row.recipe]}


# -- tiers -----------------------------------------------------------------------------------------------


def _tier_at_hand():
    from flux2_bench.tiers import load_tiers

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0).lower().replace(" ", "")
    for slug, tier in load_tiers().items():
        if slug in name:
            return tier
    return None


# which kernel-probe row measures the GEMM path of a recipe (see _kernel_probe)
_PROBE_FOR = {
    "bf16": "cuBLAS bf16 linear1",
    "fp8-row": "QuantLinear fp8-row linear1",
    "fp8-tensor": "fp8_linear row (quantize + GEMM)",  # the same kernel with one scale: nearest measured
    "fp8-block": "QuantLinear fp8-block linear1",
    "int4-g128": "QuantLinear int4-g128 linear1",
    "nf4": "QuantLinear nf4 linear1",
}
_PROBE_ATTENTION = "SDPA bf16 B=1 H=48 L=4608 D=128"


def step_figures(
    *,
    config,
    recipe: str,
    n_img: int,
    n_txt: int,
    step_ms: float,
    at_hand,
    kernels: list[dict],
    block_bytes: tuple[int, ...],
    other_bytes: int,
    vae_bytes: int = 0,
    activation_bytes: int = 0,
    h2d_efficiency: float = 0.7,
):
    """WorkloadFigures of one measured step for projecting it onto other tiers.

    Compute efficiency per kind comes from the kernel probe (achieved TFLOP/s of the recipe's GEMM path
    and of SDPA on FLUX.2 shapes, over this GPU's CSV rate); what the measured step takes beyond those
    compute terms is attributed to memory-bound kernels (norms, RoPE, casts, elementwise) and carried
    as bytes at this GPU's bandwidth. Without a probe row for a kind, one lumped efficiency (the step's
    FLOPs at the CSV rates over the measured step time) stands in for every kind and no memory term
    is split off. h2d_efficiency 0.7: pinned host-to-device copies measured 0.69-0.75 of PCIe 5.0 x16
    on the H100 (reports/offload).
    """
    from flux2_bench.tiers import WorkloadFigures, count_step_flops

    gemm = (
        "gemm_fp8"
        if recipe.startswith("fp8")
        else ("gemm_4bit" if recipe in ("nf4", "int4-g128", "nvfp4") else "gemm_bf16")
    )
    flops = count_step_flops(config, n_img, n_txt, gemm=gemm)
    probe = {k["name"]: k["tflops"] for k in kernels if "tflops" in k}
    measured = {gemm: probe.get(_PROBE_FOR.get(recipe, "")), "attention_bf16": probe.get(_PROBE_ATTENTION)}
    step_s = step_ms / 1e3
    if all(measured.values()):
        eff = {k: min(measured[k] / at_hand.rate_tflops(k)[0], 1.5) for k in flops}
        compute_s = sum(n / (at_hand.rate_tflops(k)[0] * 1e12 * eff[k]) for k, n in flops.items())
        memory_bytes = max(step_s - compute_s, 0.0) * at_hand.bandwidth_gbs * 1e9
    else:
        ideal_s = sum(n / (at_hand.rate_tflops(k)[0] * 1e12) for k, n in flops.items())
        eff = dict.fromkeys(flops, min(max(ideal_s / step_s, 1e-3), 1.5))
        memory_bytes = 0.0
    return WorkloadFigures(
        block_bytes, other_bytes, flops=flops, efficiency=eff, vae_bytes=vae_bytes,
        transformer_activation_bytes=activation_bytes, memory_bytes=memory_bytes, memory_efficiency=1.0,
        h2d_efficiency=h2d_efficiency, measured_on=at_hand.slug,
    )  # fmt: skip


def _figures(cfg: RunConfig, cell: Cell, pipe, row: Row, step_args: tuple, kernels: list[dict]):
    """WorkloadFigures of this cell (`step_figures`), memory-only on CPU (no efficiencies to project with)."""
    from flux2_bench.tiers import WorkloadFigures

    model = pipe.transformer

    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))

    blocks = tuple(nbytes(b) for b in (*model.double_blocks, *model.single_blocks))
    other = nbytes(model) - sum(blocks)
    act = max(int((row.peak_allocated_gib or 0) * GIB) - nbytes(model) - nbytes(pipe.vae), 0)
    at_hand = _tier_at_hand()
    if at_hand is None or row.ms_per_step is None:
        figs = WorkloadFigures(blocks, other, flops={}, efficiency={}, vae_bytes=nbytes(pipe.vae),
                               transformer_activation_bytes=act)  # fmt: skip
        return figs, None
    figs = step_figures(
        config=model.config, recipe=cell.recipe, n_img=step_args[0].shape[1], n_txt=step_args[2].shape[1],
        step_ms=row.ms_per_step, at_hand=at_hand, kernels=kernels, block_bytes=blocks, other_bytes=other,
        vae_bytes=nbytes(pipe.vae), activation_bytes=act,
    )  # fmt: skip
    return figs, at_hand


def _tier_rows(cfg: RunConfig, cell: Cell, pipe, row: Row, step_args: tuple, kernels: list[dict]) -> list[Row]:
    """Per chosen tier: the projected placement and step time, and on a GPU the emulated one."""
    from flux2_bench.tiers import CANDIDATES, choose_placement, get_tier, make_placement, project_step_ms

    figs, at_hand = _figures(cfg, cell, pipe, row, step_args, kernels)
    rows = []
    base = replace(row, fidelity={}, typography={}, kernels={}, notes="")
    for slug in cfg.tiers:
        tier = get_tier(slug)
        if at_hand is None:  # CPU: memory only, no efficiencies to project speed from
            fitting = [make_placement(figs, c) for c in CANDIDATES]
            chosen = next((p for p in fitting if p.device_bytes <= tier.vram_bytes), None)
            rows.append(replace(
                base, tier=slug, label="projected", placement=chosen.name if chosen else "does-not-fit",
                ms_per_step=None, ms_per_step_p10=None, ms_per_step_p90=None, encode_s=None, denoise_s=None,
                decode_s=None, total_s=None, images_per_min=None,
                peak_device_gib=chosen.device_bytes / GIB if chosen else None,
                notes="memory only: speed is projected from GPU-measured efficiencies, and none were measured on CPU",
            ))  # fmt: skip
            continue
        chosen = choose_placement(figs, tier)
        if chosen is None:
            rows.append(replace(base, tier=slug, label="projected", placement="does-not-fit", status="ok",
                                ms_per_step=None, ms_per_step_p10=None, ms_per_step_p90=None,
                                notes="no placement fits the tier's VRAM"))  # fmt: skip
            continue
        proj = project_step_ms(figs, tier, chosen)
        rows.append(replace(
            base, tier=slug, label="projected", placement=chosen.name, ms_per_step=proj.step_ms,
            ms_per_step_p10=None, ms_per_step_p90=None, peak_device_gib=chosen.device_bytes / GIB,
            encode_s=None, denoise_s=None, decode_s=None, total_s=None, images_per_min=None,
            kernels={"terms_ms": proj.terms, "pcie_ms": proj.pcie_ms}, notes="; ".join(proj.notes),
        ))  # fmt: skip
        rows.append(_emulate(pipe, base, tier, chosen.name, step_args))
    return rows


def _emulate(pipe, base: Row, tier, placement: str, step_args: tuple) -> Row:
    """Run one step under the tier's VRAM cap with `placement`; OOM or a slower fallback is recorded."""
    from flux2_bench.measure import PeakMemory, cuda_timing, emulate_vram, is_oom
    from flux2_bench.offload import BlockStreamer

    order = ["resident", "stream_blocks"] if placement != "stream_blocks" else ["stream_blocks"]
    for name in order:
        streamer = None
        try:
            if name == "stream_blocks":
                streamer = BlockStreamer(pipe.transformer, pipe.device)
            with emulate_vram(tier.vram_bytes / GIB), torch.inference_mode(), PeakMemory() as mem:
                timing = cuda_timing(lambda: pipe.transformer(*step_args), warmup=1, repeats=3)
            return replace(
                base, tier=tier.slug, label="emulated", placement=name, ms_per_step=timing.median,
                ms_per_step_p10=timing.p10, ms_per_step_p90=timing.p90,
                peak_allocated_gib=mem.allocator_peak_bytes / GIB,
                peak_device_gib=mem.device_peak_bytes / GIB if mem.device_peak_bytes else None,
                encode_s=None, denoise_s=None, decode_s=None, total_s=None, images_per_min=None,
                notes=f"transformer step under a {tier.vram_bytes / GIB:.0f} GiB cap (speed is this GPU's)",
            )  # fmt: skip
        except Exception as e:
            if not is_oom(e):
                return replace(base, tier=tier.slug, label="emulated", status=f"error: {type(e).__name__}: {e}"[:300])
        finally:
            if streamer is not None:
                streamer.remove()
                pipe.transformer.to(pipe.device)
            _free()
    return replace(
        base, tier=tier.slug, label="emulated", placement="does-not-fit", status="oom", ms_per_step=None,
        ms_per_step_p10=None, ms_per_step_p90=None,
        notes=f"out of memory under a {tier.vram_bytes / GIB:.0f} GiB cap with {', '.join(order)}",
    )  # fmt: skip


# -- anchors and kernels (GPU) ---------------------------------------------------------------------------


def _measure_anchors(cfg: RunConfig, size: int) -> list[Row]:
    """diffusers bf16 / + torchao FP8 row-wise / + bitsandbytes NF4, transformer step only, same inputs."""
    from flux2_bench import anchors
    from flux2_bench.measure import PeakMemory, cuda_timing
    from flux2_bench.weights import model_bytes, synthetic_transformer

    rows = []
    cell = Cell("bf16", size, 0)
    for name, quantize, libs in (
        ("diffusers-bf16", None, ("diffusers",)),
        ("diffusers-torchao-fp8-row", anchors.quantize_torchao_fp8_row, ("diffusers", "torchao")),
        ("diffusers-bnb-nf4", anchors.quantize_bnb_nf4, ("diffusers", "bitsandbytes")),
    ):
        base = Row(cfg.preset, name, size, size, 0, cfg.steps, _weights(cfg))
        dmodel = fwd = None
        _free()
        try:
            model = synthetic_transformer(cfg.preset, device=cfg.device, seed=cfg.seed)
            dmodel = anchors.diffusers_view(model)
            del model
            if quantize is not None:
                quantize(dmodel)
            _free()
            fwd = anchors.diffusers_forward(dmodel)
            from flux2_bench.pipeline import synthetic_prompt_embeds

            embeds = synthetic_prompt_embeds("anchor", get_preset(cfg.preset).context_in_dim, seed=cfg.seed)
            args = _step_inputs(_Shim(dmodel, cfg), cell, embeds, [])
            with torch.inference_mode(), PeakMemory() as mem:
                timing = cuda_timing(lambda fwd=fwd, args=args: fwd(*args), warmup=2, repeats=5)
            rows.append(replace(
                base, ms_per_step=timing.median, ms_per_step_p10=timing.p10, ms_per_step_p90=timing.p90,
                weights_gib=model_bytes(dmodel) / GIB, peak_allocated_gib=mem.allocator_peak_bytes / GIB,
                peak_device_gib=mem.device_peak_bytes / GIB if mem.device_peak_bytes else None,
                notes=f"transformer step only (anchor: {_versions(libs)})",
            ))  # fmt: skip
        except Exception as e:
            rows.append(replace(base, status=f"error: {type(e).__name__}: {str(e)[:300]}"))
        finally:
            dmodel = fwd = None  # the forward closure holds the model: drop both before the next anchor
            _free()
    return rows


def _versions(dists) -> str:
    """'diffusers 0.42.1, torchao 0.18.0': the anchor libraries a row was timed with."""
    from importlib.metadata import PackageNotFoundError, version

    def one(d):
        try:
            return f"{d} {version(d)}"
        except PackageNotFoundError:
            return f"{d} (version unknown)"

    return ", ".join(map(one, dists))


class _Shim:
    """Just enough of a pipeline for `_step_inputs` around a diffusers model."""

    def __init__(self, dmodel, cfg: RunConfig):
        self.transformer = _ShimModel(dmodel, get_preset(cfg.preset))
        self.device = torch.device(cfg.device)


class _ShimModel:
    def __init__(self, dmodel, config):
        self.config = config
        self._p = next(dmodel.parameters())

    def parameters(self):
        yield self._p


def _kernel_probe(cfg: RunConfig) -> list[dict]:
    """TFLOP/s of the GEMM paths on FLUX.2-dev's largest shape against the measured ceilings."""
    import triton

    from flux2_bench.kernels.fp8_matmul import fp8_linear
    from flux2_bench.quantize.linear import QuantLinear

    dev = cfg.device
    rows = []
    try:
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        bf16_ceiling = 2 * 8192**3 / (triton.testing.do_bench(lambda: a @ b) * 1e-3) / 1e12
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        fp8_ceiling = (
            2
            * 8192**3
            / (triton.testing.do_bench(lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16)) * 1e-3)
            / 1e12
        )
        a = b = a8 = b8 = None
        m, k, n = 4608, 6144, 55296
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * k**-0.5
        flop = 2 * m * n * k
        lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
        t_bf16 = triton.testing.do_bench(lambda: x @ w.t())
        rows.append({"name": "cuBLAS bf16 linear1", "tflops": flop / t_bf16 / 1e9, "ceiling_tflops": bf16_ceiling})
        for recipe in ("fp8-row", "fp8-block", "int4-g128", "nf4"):
            q = QuantLinear.from_float(lin, recipe)
            t = triton.testing.do_bench(lambda q=q: q(x))
            ceiling = fp8_ceiling if recipe.startswith("fp8") else bf16_ceiling
            rows.append({"name": f"QuantLinear {recipe} linear1", "tflops": flop / t / 1e9, "ceiling_tflops": ceiling,
                         "anchor": "cuBLAS bf16 linear1", "anchor_tflops": flop / t_bf16 / 1e9})  # fmt: skip
            del q
        from flux2_bench.attention import sdpa

        q, k_, v = (torch.randn(1, 48, 4608, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
        t_att = triton.testing.do_bench(lambda: sdpa(q, k_, v))
        rows.append(
            {"name": _PROBE_ATTENTION, "tflops": 4 * 48 * 4608**2 * 128 / t_att / 1e9, "ceiling_tflops": bf16_ceiling}
        )
        q = k_ = v = None
        ws = (w.abs().amax(dim=1, keepdim=True).float() / 448).clamp(min=1e-12)
        w8 = (w.float() / ws).to(torch.float8_e4m3fn)
        t = triton.testing.do_bench(lambda: fp8_linear(x, w8, ws, granularity="row"))
        rows.append(
            {"name": "fp8_linear row (quantize + GEMM)", "tflops": flop / t / 1e9, "ceiling_tflops": fp8_ceiling}
        )
    except Exception as e:
        rows.append({"name": "kernel probe failed", "error": f"{type(e).__name__}: {e}"[:300]})
    _free()
    for r in rows:
        if "tflops" in r:
            r["pct_of_ceiling"] = 100 * r["tflops"] / r["ceiling_tflops"]
    return rows


def run_main(**kwargs) -> int:
    """CLI entry: build the config, run, map Ctrl-C to exit code 130."""
    try:
        run(RunConfig(**kwargs))
    except KeyboardInterrupt:
        return 130
    return 0
