"""The data rows a benchmark run writes: one `Row` per measured cell, plus one `Environment` per run.

Everything a report shows is generated from these (results.json / results.csv); no figure is typed
by hand. Every number carries a label saying how it was obtained:
- "measured":  timed or read on the GPU (or CPU) at hand;
- "emulated":  measured on the GPU at hand under a tier's VRAM cap (memory is the tier's, speed is not);
- "projected": computed from measured kernel efficiency and the tier's roofline (flux2_bench.tiers).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
LABELS = ("measured", "emulated", "projected")


@dataclass
class Environment:
    gpu: str
    driver: str
    cuda: str | None
    torch: str
    triton: str | None
    python: str
    git_sha: str
    time: str
    command: str
    host: str = ""

    @classmethod
    def capture(cls, command: list[str] | None = None) -> Environment:
        import torch

        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
            try:
                import pynvml

                pynvml.nvmlInit()
                driver = pynvml.nvmlSystemGetDriverVersion()
            except Exception as e:  # no NVML: the figure is unknown, say why
                driver = f"unknown ({type(e).__name__})"
        else:
            gpu, driver = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", "n/a"
        return cls(
            gpu=gpu,
            driver=str(driver),
            cuda=torch.version.cuda,
            torch=torch.__version__,
            triton=triton_version,
            python=platform.python_version(),
            git_sha=git_sha(),
            time=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            command=" ".join(command if command is not None else sys.argv),
            host=platform.node(),
        )


def git_sha() -> str:
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass
class Row:
    """One measured cell: recipe x resolution x references (x tier, for emulated/projected rows)."""

    # what was run
    preset: str
    recipe: str  # "bf16", "fp8-row", "nf4", ... or an anchor like "diffusers-bf16"
    width: int
    height: int
    refs: int
    steps: int
    weights: str  # "synthetic" or the checkpoint path
    tier: str = "at-hand"  # tier slug from gpu-tiers.csv, or "at-hand" for the GPU (or CPU) in use
    placement: str = "resident"  # "resident" | "text-encoder-offload" | "stream-blocks" | "does-not-fit"
    label: str = "measured"  # one of LABELS
    status: str = "ok"  # "ok" | "oom" | "non-finite" | "interrupted" | "error: ..."
    # latency, seconds / milliseconds
    ms_per_step: float | None = None  # transformer, median
    ms_per_step_p10: float | None = None
    ms_per_step_p90: float | None = None
    encode_s: float | None = None
    denoise_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    images_per_min: float | None = None
    compile: str = "eager"  # "eager" | "compiled"
    compile_s: float | None = None
    # memory, GiB
    weights_gib: float | None = None
    peak_allocated_gib: float | None = None
    peak_device_gib: float | None = None  # NVML: context and workspaces included; decides "fits"
    # quality: numbers, or a label string such as "skipped: synthetic weights make fidelity meaningless"
    fidelity: dict = field(default_factory=dict)
    typography: dict = field(default_factory=dict)
    # kernel-level figures used for projection (achieved TFLOP/s, % of ceiling), free-form
    kernels: dict = field(default_factory=dict)
    notes: str = ""

    def key(self) -> tuple:
        """Identity of the cell, used by --resume to skip what a run already measured."""
        return (self.preset, self.recipe, self.width, self.height, self.refs, self.steps, self.tier, self.compile)

    def __post_init__(self):
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {self.label!r}")


FIELDS = [f.name for f in dataclasses.fields(Row)]


def write_results(out_dir: str | os.PathLike, env: Environment, rows: list[Row], extra: dict | None = None) -> Path:
    """results.json (environment + rows) and results.csv, written atomically (temp name, then rename)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA_VERSION, "environment": asdict(env), "rows": [asdict(r) for r in rows], **(extra or {})}
    tmp = out / ".results.json.partial"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    tmp = out / ".results.csv.partial"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            for k in ("fidelity", "typography", "kernels"):
                d[k] = json.dumps(d[k], default=str)
            w.writerow(d)
    os.replace(tmp, out / "results.csv")
    return out / "results.json"


def read_results(path: str | os.PathLike) -> tuple[Environment, list[Row], dict]:
    """(environment, rows, the rest of the document) from a run directory or its results.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    doc = json.loads(p.read_text())
    if doc.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{p}: results schema {doc.get('schema')!r}, this version reads {SCHEMA_VERSION}")
    env = Environment(**doc["environment"])
    rows = [Row(**r) for r in doc["rows"]]
    rest = {k: v for k, v in doc.items() if k not in ("schema", "environment", "rows")}
    return env, rows, rest
