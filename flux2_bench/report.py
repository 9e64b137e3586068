"""`flux2-bench report DIR`: report.md, report.html and PNG plots from a run's results.json.

    paths = write_report("reports/run-h100")   # {"report.md": Path, "report.html": Path, "fits_matrix.png": ...}

Everything comes from the run directory; no number is typed by hand:
- `results.json` (`flux2_bench.results`): the environment and one `Row` per cell. results.csv is
  regenerated from it, so the two always agree.
- `kernels.json` (optional): kernel benchmark rows, a list or {"rows": [...]} / {"kernels": [...]}
  of {"name", "tflops", "ceiling_tflops", "pct_of_ceiling", "anchor", "anchor_tflops"}.
- `images/<recipe>/<prompt_id>.png` (optional, real-weight runs): same prompt and seed per recipe.

The report is built once as a list of blocks (headings, paragraphs, tables, plots) and rendered
twice, to markdown and to self-contained HTML (inline CSS, plots as base64 data URIs), so both say
the same thing. A plot without data is not drawn; the report says why in one line.

Quality fields hold numbers or label strings (`fidelity.SKIPPED_SYNTHETIC`, "not available ..."):
labels are printed as they are, never turned into numbers. Typography per row is read in either of
these shapes (names from `typography.score_suite` / `delta_vs`):
- per engine: {engine: {"n", "cer", "word_accuracy", "exact_match"}, ...}, deltas optionally under
  "delta_vs_bf16" / "delta" as {engine: {"cer", ...}};
- flat: {"engine"?, "n"?, "cer", "word_accuracy", "exact_match", "delta_cer"?, ...};
- a label: any score (or "status") that is a string.
Deltas the row does not carry are computed against the bf16 row of the same cell with
`typography.delta_vs`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from flux2_bench.fidelity import METRICS as FIDELITY_METRICS
from flux2_bench.fidelity import is_score
from flux2_bench.results import Environment, Row, read_results, write_results
from flux2_bench.typography import SCORE_KEYS, delta_vs

BASELINE = "bf16"
ANCHOR_PREFIXES = ("diffusers",)
AT_HAND = "at-hand"

# Fits-matrix categories, in heatmap order. Placement spellings differ between `Row` ("stream-blocks")
# and `tiers.CANDIDATES` ("stream_blocks"); both are read.
FIT_CATEGORIES = ("resident", "offload", "stream", "does not fit")
FIT_COLORS = ("#2e7d32", "#9ccc65", "#ffb300", "#c62828")

PLOT_NAMES = (
    "latency_vs_vram.png",
    "fits_matrix.png",
    "fidelity_vs_bits.png",
    "typography_vs_bits.png",
    "kernels.png",
    "image_grid.png",
    "typography_crops.png",
)


# ---------------------------------------------------------------------------------------------------
# Formatting: one function per kind of figure, shared by tables and tests


def fmt(value, digits: int = 2) -> str:
    """A number with `digits` decimals; None as "—"; label strings (and bools) as they are."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_score(value):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.{digits}f}"
    return str(value)


def fmt_ms(value) -> str:
    return fmt(value, 2)


def fmt_gib(value) -> str:
    # tiny CPU models weigh a few MiB: keep three significant digits below 0.1 GiB
    if isinstance(value, int | float) and 0 < abs(value) < 0.1:
        return f"{value:.3g}"
    return fmt(value, 2)


def fmt_s(value) -> str:
    return fmt(value, 3)


def bits_per_weight(recipe: str) -> float | None:
    """Stored bits per transformer weight of a recipe's format (None when unknown).

    4-bit formats carry scales: nf4 = 4 + 32/64 (fp32 absmax per 64), nvfp4 = 4 + 8/16 (e4m3 scale
    per 16), int4-g128 = 4 + 16/128 (bf16 scale per 128); plotted at ~4.5 as one group.
    """
    r = _strip_anchor(recipe).lower()
    if r.startswith(("bf16", "fp16")):
        return 16.0
    if r.startswith("fp8"):
        return 8.0
    if r.startswith(("nf4", "int4", "nvfp4", "fp4", "mxfp4")):
        return 4.5
    return None


def _strip_anchor(recipe: str) -> str:
    """The recipe an anchor is compared with: diffusers-bf16 -> bf16, diffusers-torchao-fp8-row -> fp8-row,
    diffusers-bnb-nf4 -> nf4 (the library that quantized the anchor is not part of the format)."""
    for p in ANCHOR_PREFIXES:
        if recipe.startswith(p + "-"):
            recipe = recipe[len(p) + 1 :]
            break
    for lib in ("torchao-", "bnb-", "bitsandbytes-"):
        recipe = recipe.removeprefix(lib)
    return recipe


def is_anchor(row: Row) -> bool:
    return row.recipe.startswith(ANCHOR_PREFIXES)


def fit_category(row: Row) -> str:
    """resident / offload / stream / does not fit, from a row's placement and status."""
    p = row.placement.replace("_", "-")
    if p == "does-not-fit" or row.status == "oom":
        return "does not fit"
    if "stream" in p:
        return "stream"
    if "offload" in p:
        return "offload"
    if p == "resident":
        return "resident"
    raise ValueError(f"row {row.recipe} on {row.tier}: unknown placement {row.placement!r}")


# ---------------------------------------------------------------------------------------------------
# The run, as read from its directory


@dataclass
class Run:
    dir: Path
    env: Environment
    rows: list[Row]
    extra: dict
    kernels: list[dict] | None
    images: dict[str, dict[str, Path]]  # recipe -> prompt id -> PNG
    varying: tuple[str, ...] = field(default=())

    def config(self, row: Row) -> str:
        """The cell's name: recipe plus whichever of preset/resolution/refs/steps/compile vary in the run."""
        parts = [row.recipe]
        for dim in self.varying:
            parts.append(_DIMS[dim](row))
        return " · ".join(parts)

    @property
    def tiers(self) -> list[str]:
        return list(dict.fromkeys(r.tier for r in self.rows))


_DIMS = {
    "preset": lambda r: r.preset,
    "resolution": lambda r: f"{r.width}x{r.height}",
    "refs": lambda r: f"{r.refs} refs",
    "steps": lambda r: f"{r.steps} steps",
    "compile": lambda r: r.compile,
}


def load_run(run_dir: str | os.PathLike) -> Run:
    d = Path(run_dir)
    if not (d / "results.json").is_file():
        raise FileNotFoundError(f"{d}: no results.json here; pass the directory a `flux2-bench run` wrote")
    env, rows, extra = read_results(d)
    kernels = None
    if (d / "kernels.json").is_file():
        doc = json.loads((d / "kernels.json").read_text())
        kernels = doc if isinstance(doc, list) else doc.get("rows", doc.get("kernels"))
        if not isinstance(kernels, list):
            raise ValueError(f"{d / 'kernels.json'}: expected a list of rows or {{'rows': [...]}}")
    images: dict[str, dict[str, Path]] = {}
    if (d / "images").is_dir():
        for sub in sorted(p for p in (d / "images").iterdir() if p.is_dir()):
            pngs = {p.stem: p for p in sorted(sub.glob("*.png"))}
            if pngs:
                images[sub.name] = pngs
    varying = tuple(dim for dim, f in _DIMS.items() if len({f(r) for r in rows}) > 1)
    return Run(d, env, rows, extra, kernels, images, varying)


def _same_cell(a: Row, b: Row) -> bool:
    return (a.preset, a.width, a.height, a.refs, a.steps, a.tier, a.compile) == (
        b.preset,
        b.width,
        b.height,
        b.refs,
        b.steps,
        b.tier,
        b.compile,
    )


def _baseline_for(run: Run, row: Row, recipe: str = BASELINE) -> Row | None:
    for r in run.rows:
        if r.recipe == recipe and _same_cell(r, row) and r.label == row.label:
            return r
    return None


def _measured(run: Run) -> list[Row]:
    """Rows measured on the GPU at hand (quality is judged there; emulated/projected rows repeat it)."""
    return [r for r in run.rows if r.tier == AT_HAND and r.label == "measured"]


# ---------------------------------------------------------------------------------------------------
# Quality fields


def _first_label(d: dict) -> str | None:
    for v in d.values():
        if isinstance(v, str) and v:
            return v
    return None


def fidelity_values(row: Row) -> tuple[dict, str | None]:
    """({metric: number or label}, the label when no metric is a number)."""
    f = row.fidelity or {}
    vals = {m: f.get(m) for m in FIDELITY_METRICS if m in f}
    if not vals:
        return {}, _first_label(f)
    if not any(is_score(v) for v in vals.values()):
        return vals, _first_label(vals) or "no fidelity numbers"
    return vals, None


def typography_entries(run: Run, row: Row) -> tuple[list[dict], str | None]:
    """Per-engine records {engine, n, cer, word_accuracy, exact_match, delta_<score>...} and a label.

    The label is set (and the list empty) when the row's typography is a label, not scores.
    """
    t = row.typography or {}
    if not t:
        return [], None
    per_engine = {k: v for k, v in t.items() if isinstance(v, dict) and any(s in v for s in SCORE_KEYS)}
    deltas_given: dict = {}
    for key in ("delta_vs_bf16", "delta", "deltas"):
        if isinstance(t.get(key), dict):
            deltas_given = t[key]
    if not per_engine:
        if any(k in t for k in SCORE_KEYS):
            engine = str(t.get("engine", "ocr"))
            per_engine = {engine: {k: t.get(k) for k in (*SCORE_KEYS, "n") if k in t}}
            flat_deltas = {k: t[f"delta_{k}"] for k in SCORE_KEYS if f"delta_{k}" in t}
            if flat_deltas:
                deltas_given = {engine: flat_deltas}
        else:
            return [], _first_label(t) or "no typography scores"
    scores = {e: {k: v for k, v in s.items() if k in (*SCORE_KEYS, "n")} for e, s in per_engine.items()}
    if not any(is_score(v) for s in scores.values() for k, v in s.items() if k in SCORE_KEYS):
        return [], _first_label({k: v for s in scores.values() for k, v in s.items()}) or "no typography scores"
    deltas = {e: dict(d) for e, d in deltas_given.items() if isinstance(d, dict)}
    if row.recipe != BASELINE and not deltas:
        base = _baseline_for(run, row)
        if base is not None:
            base_entries, _ = typography_entries(run, base)
            base_summary = {b["engine"]: {k: b[k] for k in (*SCORE_KEYS, "n")} for b in base_entries if _all_scores(b)}
            mine = {e: {**s, "n": s.get("n")} for e, s in scores.items() if e in base_summary and _all_scores(s)}
            if base_summary and mine:
                deltas = delta_vs({BASELINE: base_summary, row.recipe: mine}, baseline=BASELINE)[row.recipe]
    out = []
    for engine, s in scores.items():
        rec = {"engine": engine, **s}
        for k in SCORE_KEYS:
            rec[f"delta_{k}"] = deltas.get(engine, {}).get(k)
        out.append(rec)
    return out, None


def _all_scores(d: dict) -> bool:
    return all(is_score(d.get(k)) or isinstance(d.get(k), bool) for k in SCORE_KEYS)


# ---------------------------------------------------------------------------------------------------
# Document model: rendered to markdown and to HTML


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Plot:
    name: str
    caption: str


Block = tuple[str, object]  # ("h1"|"h2"|"p"|"kv", text or list) | ("table", Table) | ("plot", Plot)


def _sign(value) -> str:
    s = fmt(value, 3)
    return f"+{s}" if is_score(value) and value > 0 else s


def build_blocks(run: Run, plots: dict[str, Path], skipped: dict[str, str]) -> list[Block]:
    """The report's content, in order; `skipped` maps a plot name to why it was not drawn."""
    env = run.env
    b: list[Block] = [("h1", f"flux2-bench report: {env.gpu}")]
    b.append(
        (
            "kv",
            [
                ("GPU", env.gpu),
                ("driver", env.driver),
                ("CUDA", env.cuda or "none"),
                ("torch", env.torch),
                ("triton", env.triton or "none"),
                ("python", env.python),
                ("git sha", env.git_sha),
                ("date", env.time),
                ("host", env.host or "—"),
                ("command", env.command),
                ("rows", f"{len(run.rows)} ({', '.join(f'{n} {lab}' for lab, n in _label_counts(run).items())})"),
            ],
        )
    )
    b.append(
        (
            "p",
            "Labels: measured = timed or read on this GPU; emulated = measured here under a tier's VRAM cap "
            "(the memory is the tier's, the speed is not); projected = computed from kernel efficiency measured "
            "here and the tier's roofline.",
        )
    )

    def plot_or_reason(name: str, caption: str) -> None:
        if name in plots:
            b.append(("plot", Plot(name, caption)))
        else:
            b.append(("p", f"`{name}` not drawn: {skipped.get(name, 'no data')}."))

    # latency
    b.append(("h2", "Latency"))
    lat = [r for r in run.rows if r.label != "projected" and r.ms_per_step is not None]
    if lat:
        b.append(
            (
                "table",
                Table(
                    [
                        "cell",
                        "tier",
                        "placement",
                        "label",
                        "ms/step (median)",
                        "p10–p90 ms",
                        "encode s",
                        "denoise s",
                        "decode s",
                        "total s",
                        "images/min",
                        "compile s",
                    ],
                    [
                        [
                            run.config(r),
                            r.tier,
                            r.placement,
                            r.label,
                            fmt_ms(r.ms_per_step),
                            f"{fmt_ms(r.ms_per_step_p10)}–{fmt_ms(r.ms_per_step_p90)}",
                            fmt_s(r.encode_s),
                            fmt_s(r.denoise_s),
                            fmt_s(r.decode_s),
                            fmt_s(r.total_s),
                            fmt(r.images_per_min, 2),
                            fmt_s(r.compile_s),
                        ]
                        for r in lat
                    ],
                ),
            )
        )
    else:
        b.append(("p", "No measured or emulated latency in this run."))

    # memory
    b.append(("h2", "Memory (GiB)"))
    mem = [
        r
        for r in run.rows
        if r.label != "projected"
        and any(x is not None for x in (r.weights_gib, r.peak_allocated_gib, r.peak_device_gib))
    ]
    if mem:
        b.append(
            (
                "table",
                Table(
                    ["cell", "tier", "label", "weights", "allocator peak", "NVML device peak"],
                    [
                        [
                            run.config(r),
                            r.tier,
                            r.label,
                            fmt_gib(r.weights_gib),
                            fmt_gib(r.peak_allocated_gib),
                            fmt_gib(r.peak_device_gib),
                        ]
                        for r in mem
                    ],
                ),
            )
        )
    else:
        b.append(("p", "No memory figures in this run."))
    plot_or_reason("latency_vs_vram.png", "ms/step against NVML device peak, per recipe; vertical lines: tier VRAM")

    # fits matrix
    b.append(("h2", "Fits matrix"))
    configs, tiers, cells = fits_cells(run)
    if cells:
        b.append(
            (
                "table",
                Table(
                    ["cell", *(_tier_header(t) for t in tiers)],
                    [
                        [c, *(f"{cells[c, t][0]} ({cells[c, t][1].label})" if (c, t) in cells else "—" for t in tiers)]
                        for c in configs
                    ],
                ),
            )
        )
        b.append(
            ("p", "Fit is decided on the NVML device figure; the label in brackets says how the cell was obtained.")
        )
    else:
        b.append(("p", "No rows with a placement."))
    plot_or_reason("fits_matrix.png", "recipe × tier: resident / offload / stream / does not fit")

    # projected latency
    b.append(("h2", "Projected latency per tier (projected)"))
    proj = [r for r in run.rows if r.label == "projected"]
    if proj:
        b.append(
            (
                "table",
                Table(
                    ["cell", "tier", "placement", "label", "status", "ms/step", "images/min", "notes"],
                    [
                        [
                            run.config(r),
                            r.tier,
                            r.placement,
                            r.label,
                            r.status,
                            fmt_ms(r.ms_per_step),
                            fmt(r.images_per_min, 2),
                            r.notes or "",
                        ]
                        for r in proj
                    ],
                ),
            )
        )
    else:
        b.append(("p", "No projected rows in this run."))

    # fidelity
    b.append(("h2", f"Fidelity vs {BASELINE} (measured)"))
    fid_rows = []
    for r in _measured(run):
        if r.recipe == BASELINE or is_anchor(r) or r.status != "ok":
            continue
        vals, label = fidelity_values(r)
        if not vals and label is None:
            continue
        n = (r.fidelity or {}).get("n_images")
        if label is not None:
            fid_rows.append([run.config(r), r.label, *([label] * len(FIDELITY_METRICS)), fmt(n, 0)])
        else:
            fid_rows.append(
                [
                    run.config(r),
                    r.label,
                    fmt(vals.get("latent_sqnr_db"), 2),
                    fmt(vals.get("psnr_db"), 2),
                    fmt(vals.get("ssim"), 4),
                    fmt(vals.get("lpips"), 4),
                    fmt(n, 0),
                ]
            )
    if fid_rows:
        b.append(("table", Table(["cell", "label", "latent SQNR dB", "PSNR dB", "SSIM", "LPIPS", "images"], fid_rows)))
    else:
        b.append(("p", "No fidelity figures in this run."))
    plot_or_reason("fidelity_vs_bits.png", "fidelity metrics against stored bits per weight")

    # typography
    b.append(("h2", f"Typography (OCR), deltas vs {BASELINE} (measured)"))
    typ_rows = []
    for r in _measured(run):
        if r.status != "ok":
            continue
        entries, label = typography_entries(run, r)
        if label is not None:
            typ_rows.append([run.config(r), r.label, "—", *([label] * 3), "—", "—", "—", "—"])
        for e in entries:
            typ_rows.append(
                [
                    run.config(r),
                    r.label,
                    e["engine"],
                    fmt(e.get("cer"), 3),
                    fmt(e.get("word_accuracy"), 3),
                    fmt(e.get("exact_match"), 3),
                    _sign(e.get("delta_cer")),
                    _sign(e.get("delta_word_accuracy")),
                    _sign(e.get("delta_exact_match")),
                    fmt(e.get("n"), 0),
                ]
            )
    if typ_rows:
        b.append(
            (
                "table",
                Table(
                    [
                        "cell",
                        "label",
                        "engine",
                        "CER",
                        "word acc.",
                        "exact",
                        "Δ CER",
                        "Δ word acc.",
                        "Δ exact",
                        "images",
                    ],
                    typ_rows,
                ),
            )
        )
        b.append(("p", f"CER: lower is better (a positive Δ is worse than {BASELINE}); word accuracy, exact: higher."))
    else:
        b.append(("p", "No typography figures in this run."))
    plot_or_reason("typography_vs_bits.png", "OCR scores against stored bits per weight")
    if run.images:
        plot_or_reason("image_grid.png", f"{BASELINE} beside each recipe, same prompt and seed")
        plot_or_reason("typography_crops.png", "typography prompts, each recipe")

    # anchors
    b.append(("h2", "Anchors"))
    anc = anchor_pairs(run)
    if anc:
        b.append(
            (
                "table",
                Table(
                    ["cell", "anchor", "label", "anchor ms/step", "ours", "ours ms/step", "anchor / ours", "versions"],
                    [
                        [
                            run.config(ours) if ours else run.config(a),
                            a.recipe,
                            a.label,
                            fmt_ms(a.ms_per_step),
                            ours.recipe if ours else "no matching row",
                            fmt_ms(ours.ms_per_step) if ours else "—",
                            f"{fmt(ratio, 2)}x" if ratio is not None else "—",
                            _anchor_versions(a),
                        ]
                        for a, ours, ratio in anc
                    ],
                ),
            )
        )
        b.append(("p", "anchor / ours > 1: ours is faster than the anchor, same GPU, same run."))
    else:
        b.append(("p", f"No anchor rows (recipes starting with {', '.join(ANCHOR_PREFIXES)}) in this run."))

    # kernels
    b.append(("h2", "Kernels (measured)"))
    if run.kernels:
        b.append(
            (
                "table",
                Table(
                    [
                        "kernel",
                        "TFLOP/s",
                        "ceiling TFLOP/s",
                        "% of ceiling",
                        "anchor",
                        "anchor TFLOP/s",
                        "ours / anchor",
                    ],
                    [
                        [
                            str(k.get("name")),
                            fmt(k.get("tflops"), 1),
                            fmt(k.get("ceiling_tflops"), 1),
                            fmt(_pct(k), 1),
                            str(k.get("anchor") or k.get("anchor_name") or "—"),
                            fmt(k.get("anchor_tflops"), 1),
                            f"{fmt(k['tflops'] / k['anchor_tflops'], 2)}x"
                            if is_score(k.get("tflops")) and is_score(k.get("anchor_tflops")) and k["anchor_tflops"]
                            else "—",
                        ]
                        for k in run.kernels
                    ],
                ),
            )
        )
    plot_or_reason("kernels.png", "achieved TFLOP/s against the measured ceiling, per kernel")

    # failures
    b.append(("h2", "Failed cells"))
    failed = [r for r in run.rows if r.status != "ok"]
    if failed:
        b.append(
            (
                "table",
                Table(
                    ["cell", "tier", "label", "status", "notes"],
                    [[run.config(r), r.tier, r.label, r.status, r.notes or ""] for r in failed],
                ),
            )
        )
    else:
        b.append(("p", "None: every cell finished with status ok."))
    return b


def _tier_header(slug: str) -> str:
    from flux2_bench.tiers import load_tiers

    t = load_tiers().get(slug)
    return slug if t is None else f"{slug} ({t.vram_gb:g} GiB)"


def _label_counts(run: Run) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in run.rows:
        out[r.label] = out.get(r.label, 0) + 1
    return out


def _pct(k: dict):
    if is_score(k.get("pct_of_ceiling")):
        return k["pct_of_ceiling"]
    if is_score(k.get("tflops")) and is_score(k.get("ceiling_tflops")) and k["ceiling_tflops"]:
        return 100.0 * k["tflops"] / k["ceiling_tflops"]
    return None


def fits_cells(run: Run) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[str, Row]]]:
    """(configs, tiers, {(config, tier): (category, row)}); emulated beats measured beats projected."""
    rank = {"emulated": 0, "measured": 1, "projected": 2}
    cells: dict[tuple[str, str], tuple[str, Row]] = {}
    for r in run.rows:
        if is_anchor(r) or r.status not in ("ok", "oom"):
            continue
        key = (run.config(r), r.tier)
        if key not in cells or rank[r.label] < rank[cells[key][1].label]:
            cells[key] = (fit_category(r), r)
    configs = list(dict.fromkeys(c for c, _ in cells))
    tiers = list(dict.fromkeys(t for _, t in cells))
    return configs, tiers, cells


def _anchor_versions(row: Row) -> str:
    """The library versions an anchor row was timed with (its notes: "... (anchor: diffusers 0.42.1, ...)");
    runs before they were recorded say so."""
    notes = row.notes or ""
    return notes.split("(anchor: ", 1)[1].rstrip(")") if "(anchor: " in notes else "not recorded"


def anchor_pairs(run: Run) -> list[tuple[Row, Row | None, float | None]]:
    """(anchor row, our row of the same cell and format, anchor ms / our ms)."""
    out = []
    for a in run.rows:
        if not is_anchor(a) or a.ms_per_step is None:
            continue
        ours = _baseline_for(run, a, recipe=_strip_anchor(a.recipe))
        ratio = None
        if ours is not None and ours.ms_per_step:
            ratio = a.ms_per_step / ours.ms_per_step
        out.append((a, ours, ratio))
    return out


def render_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for kind, body in blocks:
        if kind == "h1":
            lines += [f"# {body}", ""]
        elif kind == "h2":
            lines += [f"## {body}", ""]
        elif kind == "p":
            lines += [str(body), ""]
        elif kind == "kv":
            lines += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in body]
            lines.append("")
        elif kind == "table":
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
            lines.append("| " + " | ".join(cell(h) for h in body.headers) + " |")
            lines.append("|" + "|".join("---" for _ in body.headers) + "|")
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body.rows]
            lines.append("")
        elif kind == "plot":
            lines += [f"![{body.caption}]({body.name})", ""]
        else:
            raise AssertionError(kind)
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
code{background:#f3f3f3;padding:0 .2em} figure{margin:1em 0} img{max-width:100%}
figcaption{color:#555;font-size:.9em} dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em}
dt{font-weight:600}
"""


def _inline_code(text: str) -> str:
    """Escape, then turn `x` spans into <code>x</code> (the only markdown the paragraphs use)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block], run_dir: Path) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">']
    title = next((str(body) for kind, body in blocks if kind == "h1"), "flux2-bench report")
    out += [f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head><body>"]
    for kind, body in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(str(body))}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_code(str(body))}</p>")
        elif kind == "kv":
            out.append("<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in body))
            out.append("</dl>")
        elif kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in body.headers))
            out.append("</tr></thead><tbody>")
            for row in body.rows:
                out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "plot":
            data = base64.b64encode((run_dir / body.name).read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{html.escape(body.name)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(body.name)}: {html.escape(body.caption)}</figcaption></figure>"
            )
        else:
            raise AssertionError(kind)
    out.append("</body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend switch)


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _labels_of(rows: list[Row]) -> str:
    return ", ".join(dict.fromkeys(r.label for r in rows))


def plot_latency_vs_vram(run: Run, path: Path) -> str | None:
    pts = [
        r
        for r in run.rows
        if r.status == "ok" and r.label != "projected" and r.ms_per_step is not None and r.peak_device_gib is not None
    ]
    if not pts:
        return "no row has both ms/step and an NVML device peak"
    from flux2_bench.tiers import load_tiers

    known = load_tiers()
    fig = _figure(8, 5)
    ax = fig.add_subplot()
    for recipe in dict.fromkeys(r.recipe for r in pts):
        rs = [r for r in pts if r.recipe == recipe]
        ax.scatter([r.peak_device_gib for r in rs], [r.ms_per_step for r in rs], label=recipe, s=40)
    for slug in run.tiers:
        if slug in known:
            ax.axvline(known[slug].vram_gb, color="grey", ls="--", lw=1)
            ax.annotate(
                f"{known[slug].name} ({known[slug].vram_gb:g} GiB)",
                (known[slug].vram_gb, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color="grey",
            )
    ax.set_xlabel("peak device memory, GiB (NVML)")
    ax.set_ylabel("ms / step (median)")
    ax.set_title(f"Latency vs VRAM on {run.env.gpu} ({_labels_of(pts)})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return None


def plot_fits_matrix(run: Run, path: Path) -> str | None:
    configs, tiers, cells = fits_cells(run)
    if not cells:
        return "no row has a placement"
    import numpy as np
    from matplotlib.colors import ListedColormap

    grid = np.full((len(configs), len(tiers)), np.nan)
    for (c, t), (cat, _) in cells.items():
        grid[configs.index(c), tiers.index(t)] = FIT_CATEGORIES.index(cat)
    fig = _figure(1.2 + 1.1 * len(tiers), 1.2 + 0.45 * len(configs))
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(grid), cmap=ListedColormap(FIT_COLORS), vmin=-0.5, vmax=len(FIT_CATEGORIES) - 0.5)
    for (c, t), (cat, r) in cells.items():
        ax.text(tiers.index(t), configs.index(c), f"{cat}\n{r.label}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(tiers)), [_tier_header(t) for t in tiers], rotation=45, ha="right")
    ax.set_yticks(range(len(configs)), configs)
    ax.set_title(f"What fits where ({_labels_of([r for _, r in cells.values()])})")
    _save(fig, path)
    return None


def _by_bits(points: list[tuple[str, float, float]], ax, ylabel: str) -> None:
    for recipe, bits, y in points:
        ax.scatter([bits], [y], s=40)
        ax.annotate(recipe, (bits, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(ylabel)
    ax.set_xticks([4.5, 8, 16])
    ax.grid(alpha=0.3)


def plot_fidelity_vs_bits(run: Run, path: Path) -> str | None:
    metrics = [m for m in FIDELITY_METRICS]
    series: dict[str, list] = {m: [] for m in metrics}
    labels, used = [], []
    for r in _measured(run):
        if r.recipe == BASELINE or is_anchor(r) or r.status != "ok":
            continue
        vals, label = fidelity_values(r)
        if label is not None:
            labels.append(label)
            continue
        bits = bits_per_weight(r.recipe)
        if bits is None:
            continue
        for m in metrics:
            v = vals.get(m)
            if is_score(v) and math.isfinite(v):
                series[m].append((run.config(r), bits, v))
                used.append(r)
    series = {m: p for m, p in series.items() if p}
    if not series:
        return f"fidelity values are labels ({labels[0]})" if labels else "no fidelity numbers"
    fig = _figure(4.2 * len(series), 4)
    for i, (m, pts) in enumerate(series.items()):
        _by_bits(pts, fig.add_subplot(1, len(series), i + 1), m)
    fig.suptitle(f"Fidelity vs {BASELINE} against bits per weight ({_labels_of(used)})")
    _save(fig, path)
    return None


def plot_typography_vs_bits(run: Run, path: Path) -> str | None:
    series: dict[str, list] = {"cer": [], "word_accuracy": [], "exact_match": []}
    labels, used = [], []
    for r in _measured(run):
        if is_anchor(r) or r.status != "ok":
            continue
        entries, label = typography_entries(run, r)
        if label is not None:
            labels.append(label)
        bits = bits_per_weight(r.recipe)
        if bits is None:
            continue
        for e in entries:
            for k in series:
                v = e.get(k)
                if is_score(v) or isinstance(v, bool):
                    series[k].append((f"{run.config(r)} [{e['engine']}]", bits, float(v)))
                    used.append(r)
    series = {k: p for k, p in series.items() if p}
    if not series:
        return f"typography values are labels ({labels[0]})" if labels else "no typography numbers"
    fig = _figure(4.2 * len(series), 4)
    for i, (k, pts) in enumerate(series.items()):
        _by_bits(pts, fig.add_subplot(1, len(series), i + 1), k)
    fig.suptitle(f"Typography (OCR) against bits per weight ({_labels_of(used)})")
    _save(fig, path)
    return None


def plot_kernels(run: Run, path: Path) -> str | None:
    if run.kernels is None:
        return "no kernels.json in the run directory"
    ks = [k for k in run.kernels if is_score(k.get("tflops"))]
    if not ks:
        return "kernels.json has no row with a TFLOP/s figure"
    import numpy as np

    y = np.arange(len(ks))
    fig = _figure(8, 1 + 0.5 * len(ks))
    ax = fig.add_subplot()
    ceil = [k.get("ceiling_tflops") if is_score(k.get("ceiling_tflops")) else 0.0 for k in ks]
    ax.barh(y, ceil, color="#ddd", label="measured ceiling")
    ax.barh(y, [k["tflops"] for k in ks], height=0.5, color="#1565c0", label="achieved")
    anchors = [(i, k["anchor_tflops"]) for i, k in enumerate(ks) if is_score(k.get("anchor_tflops"))]
    if anchors:
        ax.scatter([a for _, a in anchors], [i for i, _ in anchors], marker="|", s=300, color="#c62828", label="anchor")
    for i, k in enumerate(ks):
        pct = _pct(k)
        ax.annotate(
            f"{k['tflops']:.0f}" + (f" ({pct:.0f}%)" if pct is not None else ""),
            (k["tflops"], i),
            xytext=(3, -3),
            textcoords="offset points",
            fontsize=7,
        )
    ax.set_yticks(y, [str(k.get("name")) for k in ks])
    ax.invert_yaxis()
    ax.set_xlabel("TFLOP/s")
    ax.set_title(f"Kernels on {run.env.gpu} (measured)")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)
    return None


def _image_plot(run: Run, path: Path, prompt_ids: list[str], titles: dict[str, str], title: str) -> None:
    from PIL import Image

    recipes = [BASELINE, *sorted(r for r in run.images if r != BASELINE)]
    fig = _figure(2.4 * len(recipes), 2.5 * len(prompt_ids) + 0.4)
    for i, pid in enumerate(prompt_ids):
        for j, recipe in enumerate(recipes):
            ax = fig.add_subplot(len(prompt_ids), len(recipes), i * len(recipes) + j + 1)
            ax.set_axis_off()
            p = run.images.get(recipe, {}).get(pid)
            if p is None:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            else:
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    im.thumbnail((384, 384))
                    ax.imshow(im)
            if i == 0:
                ax.set_title(recipe, fontsize=9)
            if j == 0:
                ax.text(
                    -0.05,
                    0.5,
                    titles.get(pid, pid),
                    rotation=90,
                    ha="right",
                    va="center",
                    fontsize=7,
                    transform=ax.transAxes,
                )
    fig.suptitle(title)
    _save(fig, path)


def _image_ids(run: Run) -> tuple[list[str], dict[str, str], list[str], dict[str, str]]:
    from flux2_bench.typography import load_suite

    suite = {p.id: p.target for p in load_suite()}
    ids = list(run.images.get(BASELINE, {}))
    general = [i for i in ids if i not in suite]
    typo = [i for i in ids if i in suite]
    return general, {}, typo, {i: f'"{suite[i]}"' for i in typo}


def _images_reason(run: Run) -> str | None:
    if not run.images:
        return "no images/ folder (images are written only with real weights)"
    if BASELINE not in run.images:
        return f"images/ has no {BASELINE} folder to compare against"
    if len(run.images) < 2:
        return f"images/ holds only {BASELINE}"
    if all(r.weights == "synthetic" for r in run.rows):
        return "synthetic weights: the images are noise"
    return None


def plot_image_grid(run: Run, path: Path, max_prompts: int = 4) -> str | None:
    reason = _images_reason(run)
    if reason:
        return reason
    general, _, typo, titles = _image_ids(run)
    ids = (general or typo)[:max_prompts]
    _image_plot(run, path, ids, titles, f"{BASELINE} beside each recipe, same prompt and seed (measured)")
    return None


def plot_typography_crops(run: Run, path: Path, max_prompts: int = 6) -> str | None:
    reason = _images_reason(run)
    if reason:
        return reason
    _, _, typo, titles = _image_ids(run)
    if not typo:
        return "images/ holds no typography-suite prompt"
    _image_plot(run, path, typo[:max_prompts], titles, "Typography prompts: target text at left (measured)")
    return None


PLOTTERS = {
    "latency_vs_vram.png": plot_latency_vs_vram,
    "fits_matrix.png": plot_fits_matrix,
    "fidelity_vs_bits.png": plot_fidelity_vs_bits,
    "typography_vs_bits.png": plot_typography_vs_bits,
    "kernels.png": plot_kernels,
    "image_grid.png": plot_image_grid,
    "typography_crops.png": plot_typography_crops,
}


# ---------------------------------------------------------------------------------------------------
# Entry point


def write_report(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Regenerate results.csv and write report.md, report.html and the plots into `run_dir`.

    Returns {file name: path} of everything written. A plot with no data is not drawn and a stale
    copy from an earlier report is removed, so the folder matches the report. Raises
    FileNotFoundError when the directory has no results.json, ValueError on a malformed one.
    """
    run = load_run(run_dir)
    d = run.dir
    written = {"results.json": write_results(d, run.env, run.rows, extra=run.extra)}
    written["results.csv"] = d / "results.csv"
    plots: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name, plotter in PLOTTERS.items():
        reason = plotter(run, d / name)
        if reason is None:
            plots[name] = d / name
        else:
            skipped[name] = reason
            (d / name).unlink(missing_ok=True)
    blocks = build_blocks(run, plots, skipped)
    for name, text in (("report.md", render_markdown(blocks)), ("report.html", render_html(blocks, d))):
        tmp = d / f".{name}.partial"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, d / name)
        written[name] = d / name
    return {**written, **plots}


# -- README summary ------------------------------------------------------------------------------------

README_BEGIN = "<!-- results:begin (generated by `flux2-bench report DIR --readme README.md`; do not edit) -->"
README_END = "<!-- results:end -->"


def readme_summary(run_dir: str | os.PathLike, link: str) -> str:
    """A compact table of a run's measured rows (ours beside the anchor of the same format) for README.md."""
    run = load_run(run_dir)
    env = run.env
    pairs = {ours.key(): (a, ratio) for a, ours, ratio in anchor_pairs(run) if ours is not None}
    configs, tiers, cells = fits_cells(run)
    tiers = [t for t in tiers if t != "at-hand"]
    weights = run.rows[0].weights
    about = (
        "synthetic (random) weights: speed and memory are real, fidelity is not scored"
        if weights == "synthetic"
        else f"weights {weights}"
    )
    lines = [
        f"{env.gpu}, torch {env.torch}, triton {env.triton}, git {env.git_sha}, {env.time[:10]}; {about}. "
        f"Full report: [{link}/report.md]({link}/report.md).",
        "",
        "| recipe | image | refs | ms / step | anchor (same run) | anchor / ours | weights GiB "
        "| peak GiB (allocator / NVML) " + "".join(f"| {t} " for t in tiers) + "|",
        "|---|---|---|---|---|---|---|---" + "|---" * len(tiers) + "|",
    ]
    for r in run.rows:
        if r.label != "measured" or is_anchor(r) or r.status != "ok":
            continue
        anchor, ratio = pairs.get(r.key(), (None, None))
        fits = [cells.get((run.config(r), t)) for t in tiers]
        lines.append(
            f"| {r.recipe} | {r.width}x{r.height} | {r.refs} | {fmt_ms(r.ms_per_step)} "
            f"| {f'{anchor.recipe} {fmt_ms(anchor.ms_per_step)}' if anchor else '—'} "
            f"| {f'{ratio:.2f}x' if ratio else '—'} | {fmt_gib(r.weights_gib)} "
            f"| {fmt_gib(r.peak_allocated_gib)} / {fmt_gib(r.peak_device_gib)} "
            + "".join(f"| {f[0]} ({f[1].label}) " if f else "| — " for f in fits)
            + "|"
        )
    return "\n".join(lines)


def update_readme(readme: str | os.PathLike, run_dir: str | os.PathLike) -> None:
    """Replace the block between README_BEGIN and README_END with `readme_summary(run_dir)`."""
    path = Path(readme)
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path}: no results block; add the lines\n{README_BEGIN}\n{README_END}")
    link = os.path.relpath(Path(run_dir), path.parent)
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{readme_summary(run_dir, link)}\n{README_END}{tail}")
