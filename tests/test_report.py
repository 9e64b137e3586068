"""flux2-bench report: files written, numbers traced back to results.json, labels, self-contained HTML.

The run directories are built here from the `Row` / `Environment` dataclasses (not stored as JSON
files), so the fixtures cannot drift from the schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux2_bench import report
from flux2_bench.cli import bench_main
from flux2_bench.fidelity import LPIPS_NOT_AVAILABLE, SKIPPED_SYNTHETIC, fidelity_row
from flux2_bench.results import Environment, Row, read_results, write_results
from flux2_bench.typography import SCORE_KEYS

TYPO_SKIPPED = "skipped: synthetic weights make OCR meaningless"

ENV = Environment(
    gpu="NVIDIA H100 80GB HBM3",
    driver="580.65.06",
    cuda="13.0",
    torch="2.11.0+cu130",
    triton="3.6.0",
    python="3.12.3",
    git_sha="abc1234",
    time="2026-11-22T10:00:00+00:00",
    command="flux2-bench run --preset flux.2-dev --recipes bf16,fp8-row,nf4",
    host="gpu-box",
)


def _row(recipe: str, weights: str, **kw) -> Row:
    base = dict(preset="flux.2-dev", recipe=recipe, width=1024, height=1024, refs=0, steps=28, weights=weights)
    return Row(**{**base, **kw})


def _latency(ms: float, peak: float) -> dict:
    return dict(
        ms_per_step=ms,
        ms_per_step_p10=ms * 0.97,
        ms_per_step_p90=ms * 1.05,
        encode_s=0.0815,
        denoise_s=ms * 28 / 1000,
        decode_s=0.4123,
        total_s=ms * 28 / 1000 + 0.4938,
        images_per_min=60 / (ms * 28 / 1000 + 0.4938),
        weights_gib=peak - 6.5,
        peak_allocated_gib=peak - 1.25,
        peak_device_gib=peak,
    )


def make_real_run(d: Path) -> list[Row]:
    """Real weights: numbers everywhere, anchors, tiers, failures, kernels.json and images/."""
    w = "/ckpt/flux2-dev.safetensors"
    engine = {"rapidocr": {"n": 6, "cer": 0.125, "word_accuracy": 0.875, "exact_match": 0.5}}
    rows = [
        _row("bf16", w, **_latency(412.3456, 71.234), typography=engine, fidelity={}),
        _row(
            "fp8-row",
            w,
            **_latency(251.789, 41.5),
            fidelity={"latent_sqnr_db": 31.234, "psnr_db": 28.456, "ssim": 0.9312, "lpips": 0.0421, "n_images": 4},
            typography={"rapidocr": {"n": 6, "cer": 0.1875, "word_accuracy": 0.8125, "exact_match": 0.3333}},
        ),
        _row(
            "nf4",
            w,
            **_latency(301.0625, 24.75),
            fidelity={"latent_sqnr_db": 19.87, "psnr_db": 22.11, "ssim": 0.8423, "lpips": LPIPS_NOT_AVAILABLE},
            typography={
                "engine": "rapidocr",
                "n": 6,
                "cer": 0.3125,
                "word_accuracy": 0.625,
                "exact_match": 0.1667,
                "delta_cer": 0.1875,
                "delta_word_accuracy": -0.25,
                "delta_exact_match": -0.3333,
            },
        ),
        _row("diffusers-bf16", w, **_latency(455.5, 73.0), notes="transformer step only (anchor: diffusers 0.42.1)"),
        _row("int4-g128", w, status="non-finite", notes="NaN in step 3 latents"),
        _row("fp8-block", w, status="error: RuntimeError: CUDA launch failure"),
        _row("fp8-row", w, tier="rtx4090", label="emulated", placement="resident", **_latency(252.5, 22.1)),
        _row("nf4", w, tier="rtx3060", label="emulated", placement="stream-blocks", **_latency(310.0, 11.2)),
        _row("bf16", w, tier="rtx3060", label="emulated", placement="does-not-fit", status="oom"),
        _row("fp8-row", w, tier="rtx4090", label="projected", placement="resident", ms_per_step=390.25),
        _row("nf4", w, tier="rtx3060", label="projected", placement="stream_blocks", ms_per_step=2875.5),
        _row("bf16", w, tier="rtx4090", label="projected", placement="offload_text_encoder", ms_per_step=640.75),
    ]
    write_results(d, ENV, rows)
    kernels = [
        {"name": "fp8_matmul", "tflops": 612.4, "ceiling_tflops": 1021.0, "pct_of_ceiling": 59.98,
         "anchor": "torch._scaled_mm", "anchor_tflops": 655.1},
        {"name": "fp8_attention", "tflops": 480.2, "ceiling_tflops": 1021.0, "pct_of_ceiling": 47.03,
         "anchor": "cudnn sdpa bf16", "anchor_tflops": 410.7},
    ]  # fmt: skip
    (d / "kernels.json").write_text(json.dumps({"rows": kernels}))
    rng = np.random.default_rng(0)
    for recipe in ("bf16", "fp8-row", "nf4"):
        (d / "images" / recipe).mkdir(parents=True)
        for pid in ("portrait-01", "sign-01"):
            a = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
            Image.fromarray(a).save(d / "images" / recipe / f"{pid}.png")
    return rows


def make_synthetic_run(d: Path) -> list[Row]:
    """Synthetic weights: quality fields are labels; no kernels.json, no images/."""
    fid = fidelity_row(synthetic_weights=True)
    typ = dict.fromkeys(SCORE_KEYS, TYPO_SKIPPED)
    rows = [
        _row("bf16", "synthetic", **_latency(405.0, 70.5), fidelity=fid, typography=typ),
        _row("fp8-row", "synthetic", **_latency(250.0, 41.0), fidelity=fid, typography=typ),
        _row("nf4", "synthetic", **_latency(300.0, 24.0), fidelity=fid, typography={"status": TYPO_SKIPPED}),
    ]
    write_results(d, ENV, rows)
    return rows


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[Path, list[Row], dict[str, Path]]:
    d = tmp_path_factory.mktemp("real")
    rows = make_real_run(d)
    return d, rows, report.write_report(d)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> tuple[Path, list[Row], dict[str, Path]]:
    d = tmp_path_factory.mktemp("synthetic")
    rows = make_synthetic_run(d)
    return d, rows, report.write_report(d)


def _table_row(md: str, *cells: str) -> str:
    """The one markdown table line whose cells start with `cells` (fails naming what it looked for)."""
    hits = [line for line in md.splitlines() if line.startswith("| " + " | ".join(cells) + " |")]
    assert len(hits) == 1, f"expected one table row starting {cells}, found {len(hits)}: {hits}"
    return hits[0]


def _section(md: str, heading: str) -> str:
    """The markdown between `## heading...` and the next `## `."""
    parts = md.split("\n## " + heading, 1)
    assert len(parts) == 2, f"no section {heading!r} in report.md"
    return parts[1].split("\n## ", 1)[0]


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def test_every_file_written(real_run):
    d, _, written = real_run
    expected = {"results.json", "results.csv", "report.md", "report.html", *report.PLOT_NAMES}
    assert set(written) == expected, f"missing {expected - set(written)}, extra {set(written) - expected}"
    for name in report.PLOT_NAMES:
        with Image.open(d / name) as im:
            assert im.format == "PNG" and min(im.size) > 50, (name, im.format, im.size)


def test_csv_regenerated_from_json(real_run, tmp_path):
    d, rows, _ = real_run
    # a stale CSV is replaced by one that agrees with results.json
    (tmp_path / "results.json").write_bytes((d / "results.json").read_bytes())
    (tmp_path / "results.csv").write_text("stale\n")
    report.write_report(tmp_path)
    import csv

    with open(tmp_path / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert [(g["recipe"], g["tier"], g["status"]) for g in got] == [(r.recipe, r.tier, r.status) for r in rows]
    assert float(got[0]["ms_per_step"]) == rows[0].ms_per_step
    _, back, _ = read_results(tmp_path)
    assert back == rows


def test_latency_and_memory_numbers_match_results(real_run):
    d, _, _ = real_run
    md = (d / "report.md").read_text()
    html = (d / "report.html").read_text()
    _, rows, _ = read_results(d)
    run = report.load_run(d)
    for r in rows:
        if r.label == "projected" or r.ms_per_step is None:
            continue
        cells = _md_cells(_table_row(md, run.config(r), r.tier, r.placement, r.label))
        assert cells[4] == report.fmt_ms(r.ms_per_step), (r.recipe, r.tier, cells)
        assert cells[5] == f"{report.fmt_ms(r.ms_per_step_p10)}–{report.fmt_ms(r.ms_per_step_p90)}"
        assert cells[8] == report.fmt_s(r.decode_s)
        assert cells[10] == report.fmt(r.images_per_min, 2)
        assert f"<td>{report.fmt_ms(r.ms_per_step)}</td>" in html, r.recipe
        mem = _md_cells(_table_row(md, run.config(r), r.tier, r.label, report.fmt_gib(r.weights_gib)))
        assert mem[4:] == [report.fmt_gib(r.peak_allocated_gib), report.fmt_gib(r.peak_device_gib)]
    # the figures are the rounded stored values, not something else that happens to format alike
    assert "| bf16 | at-hand | resident | measured | 412.35 |" in md


def test_environment_and_labels(real_run):
    d, _, _ = real_run
    md = (d / "report.md").read_text()
    for v in (ENV.gpu, ENV.driver, ENV.cuda, ENV.torch, ENV.triton, ENV.git_sha, ENV.time, ENV.command):
        assert v in md, v
        assert v in (d / "report.html").read_text(), v
    for label in ("measured", "emulated", "projected"):
        assert f"| {label} |" in md, label
    assert "## Projected latency per tier (projected)" in md


def test_fits_matrix_projection_and_anchor(real_run):
    d, rows, _ = real_run
    md = (d / "report.md").read_text()
    fits_md = _section(md, "Fits matrix")
    header = _md_cells(next(line for line in fits_md.splitlines() if line.startswith("| cell |")))
    assert header == ["cell", "at-hand", "rtx4090 (24 GiB)", "rtx3060 (12 GiB)"], header
    col = dict(zip(header, _md_cells(_table_row(fits_md, "fp8-row")), strict=True))
    assert col["at-hand"] == "resident (measured)"
    assert col["rtx4090 (24 GiB)"] == "resident (emulated)", "emulated rows decide the fit over projected ones"
    bf16 = dict(zip(header, _md_cells(_table_row(fits_md, "bf16")), strict=True))
    assert bf16["rtx3060 (12 GiB)"] == "does not fit (emulated)"
    assert bf16["rtx4090 (24 GiB)"] == "offload (projected)"
    nf4 = dict(zip(header, _md_cells(_table_row(fits_md, "nf4")), strict=True))
    assert nf4["rtx3060 (12 GiB)"] == "stream (emulated)"
    for r in rows:
        if r.label == "projected":
            proj = _md_cells(_table_row(md, r.recipe, r.tier, r.placement, "projected"))
            assert proj[5] == report.fmt_ms(r.ms_per_step), proj
    assert report.fmt_ms(2875.5) == "2,875.50"
    a = next(r for r in rows if r.recipe == "diffusers-bf16")
    b = next(r for r in rows if r.recipe == "bf16" and r.tier == "at-hand")
    anchor = _md_cells(_table_row(_section(md, "Anchors"), "bf16", "diffusers-bf16"))
    assert anchor[3] == report.fmt_ms(a.ms_per_step) and anchor[5] == report.fmt_ms(b.ms_per_step)
    assert anchor[6] == f"{a.ms_per_step / b.ms_per_step:.2f}x"
    assert anchor[7] == "diffusers 0.42.1", "the anchor's library version, from its row's notes"
    assert report._anchor_versions(replace(a, notes="transformer step only (anchor)")) == "not recorded"


def test_quality_tables(real_run):
    d, rows, _ = real_run
    md = (d / "report.md").read_text()
    fp8 = next(r for r in rows if r.recipe == "fp8-row" and r.tier == "at-hand")
    cells = _md_cells(_table_row(md, "fp8-row", "measured", "31.23"))
    assert cells[2:6] == ["31.23", "28.46", "0.9312", "0.0421"]
    assert fp8.fidelity["ssim"] == 0.9312
    nf4 = _md_cells(_table_row(md, "nf4", "measured", "19.87"))
    assert nf4[5] == LPIPS_NOT_AVAILABLE, "a label is printed as it is"
    # typography: fp8-row's deltas are computed from the bf16 row; nf4's are the ones the row carries
    t = _md_cells(_table_row(md, "fp8-row", "measured", "rapidocr"))
    assert t[3:9] == ["0.188", "0.812", "0.333", "+0.062", "-0.062", "-0.167"], t
    t = _md_cells(_table_row(md, "nf4", "measured", "rapidocr"))
    assert t[6:9] == ["+0.188", "-0.250", "-0.333"], t
    t = _md_cells(_table_row(md, "bf16", "measured", "rapidocr"))
    assert t[6:9] == ["—", "—", "—"], "the baseline has no delta against itself"


def test_failed_cells_and_kernels(real_run):
    d, rows, _ = real_run
    md = (d / "report.md").read_text()
    failed = md.split("## Failed cells", 1)[1]
    for r in rows:
        if r.status != "ok":
            assert r.status in failed, r.status
    assert "non-finite" in failed and "error: RuntimeError: CUDA launch failure" in failed and "oom" in failed
    k = _md_cells(_table_row(_section(md, "Kernels"), "fp8_matmul"))
    assert k[1:4] == ["612.4", "1,021.0", "60.0"] and k[6] == f"{612.4 / 655.1:.2f}x"
    assert "`kernels.png` not drawn" not in md


def test_html_self_contained_and_embeds_plots(real_run):
    d, _, written = real_run
    html = (d / "report.html").read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, re.I)
    external = [r[:60] for r in refs if not r.startswith(("data:", "#"))]
    assert refs and not external, f"external references in report.html: {external[:5]}"
    assert "<link" not in html and "<script" not in html and "url(" not in html
    embedded = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)
    assert sorted(embedded) == sorted(n for n in written if n.endswith(".png")), embedded
    import base64
    import io

    b64 = re.search(r'src="data:image/png;base64,([^"]+)"', html).group(1)
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"


def test_synthetic_weights_show_labels_not_numbers(synthetic_run):
    d, rows, written = synthetic_run
    md = (d / "report.md").read_text()
    fid = md.split("## Fidelity", 1)[1].split("## ", 1)[0]
    assert SKIPPED_SYNTHETIC in fid
    assert not re.search(r"\|\s*-?\d+\.\d+\s*\|", fid), f"a number in the synthetic fidelity table:\n{fid}"
    typ = md.split("## Typography", 1)[1].split("## ", 1)[0]
    assert TYPO_SKIPPED in typ
    assert not re.search(r"\|\s*[+-]?\d+\.\d+\s*\|", typ), f"a number in the synthetic typography table:\n{typ}"
    for name in ("fidelity_vs_bits.png", "typography_vs_bits.png"):
        assert name not in written and not (d / name).exists()
    assert f"`fidelity_vs_bits.png` not drawn: fidelity values are labels ({SKIPPED_SYNTHETIC})." in md
    assert "`typography_vs_bits.png` not drawn: typography values are labels" in md
    # latency is still measured and reported
    assert report.fmt_ms(rows[0].ms_per_step) in _table_row(md, "bf16", "at-hand", "resident", "measured")


def test_no_kernels_json_omits_kernel_plot(synthetic_run):
    d, _, written = synthetic_run
    md = (d / "report.md").read_text()
    assert "kernels.png" not in written and not (d / "kernels.png").exists()
    assert "`kernels.png` not drawn: no kernels.json in the run directory." in md
    assert "image_grid.png" not in written and "typography_crops.png" not in written
    assert "None: every cell finished with status ok." in md
    assert "latency_vs_vram.png" in written and "fits_matrix.png" in written


def test_helpers():
    assert report.fmt(None) == "—" and report.fmt("skipped: x") == "skipped: x" and report.fmt(1234.5, 1) == "1,234.5"
    assert [report.bits_per_weight(r) for r in ("bf16", "fp8-row", "nf4", "diffusers-bf16", "odd")] == [
        16.0,
        8.0,
        4.5,
        16.0,
        None,
    ]
    with pytest.raises(ValueError, match="unknown placement 'sideways'"):
        report.fit_category(_row("bf16", "synthetic", placement="sideways"))


def test_cli_report(tmp_path, capsys):
    make_synthetic_run(tmp_path)
    assert bench_main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
    assert "report.md" in capsys.readouterr().out


def test_cli_report_without_results(tmp_path, capsys):
    assert bench_main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no results.json" in err and str(tmp_path) in err
    assert not (tmp_path / "report.md").exists()


def test_html_tables_equal_markdown_tables(real_run):
    import html as html_lib

    d, _, _ = real_run
    md_rows = [
        _md_cells(line)
        for line in (d / "report.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("|---")
    ]
    page = (d / "report.html").read_text()
    html_rows = [
        [html_lib.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", tr)]
        for tr in re.findall(r"<tr>(.*?)</tr>", page.replace("\n", ""))
    ]
    assert len(md_rows) > 20 and md_rows == html_rows


def test_cells_named_by_what_varies(tmp_path):
    rows = [_row("bf16", "synthetic", ms_per_step=5.0), _row("bf16", "synthetic", width=512, ms_per_step=2.5)]
    write_results(tmp_path, ENV, rows)
    report.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert _table_row(md, "bf16 · 1024x1024", "at-hand")
    assert _table_row(md, "bf16 · 512x1024", "at-hand")


def test_quantized_anchors_pair_with_the_same_format():
    assert report._strip_anchor("diffusers-bf16") == "bf16"
    assert report._strip_anchor("diffusers-torchao-fp8-row") == "fp8-row"
    assert report._strip_anchor("diffusers-bnb-nf4") == "nf4"


def test_readme_block_is_regenerated_from_the_run(real_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{report.README_BEGIN}\nstale\n{report.README_END}\nafter\n")
    run_dir, _, _ = real_run
    report.update_readme(readme, run_dir)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    _, rows, _ = read_results(run_dir)
    ours = next(r for r in rows if r.recipe == "bf16" and r.label == "measured" and r.status == "ok")
    assert f"| bf16 | {ours.width}x{ours.height} | {ours.refs} | {report.fmt_ms(ours.ms_per_step)} |" in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no results block"):
        report.update_readme(readme, run_dir)
