"""Weight-only FP8 on the H100: the Gluon warp-specialized kernel (kernels/fp8_weight_only_sm90.py) against bf16
cuBLAS, the Triton fused kernel and dequantize + cuBLAS, on the FLUX.2-dev GEMM shapes at 1024², in one run.

    python reports/fp8_weight_only/bench_wo_sm90.py --out reports/fp8_weight_only/wo_sm90_run1.json
    python reports/fp8_weight_only/bench_wo_sm90.py --render reports/fp8_weight_only/wo_sm90_run1.json \
        > reports/fp8_weight_only/wo_sm90.md

Per shape (synthetic weights: speed and bits are real, fidelity figures only check the kernel's maths):

- correctness: the library dispatch and each Gluon config against ``fp8_weight_only_linear_ref`` (relative L2
  error; bf16 output rounding only) and bit equality with the Triton fused kernel (same decode, K order and
  epilogue order);
- speed: interleaved A/B GPU time against bf16 cuBLAS (``F.linear`` on the bf16 weight), CUDA graphs with the
  L2 flushed before each call (``bench_fp8_matmul.bench_ab``); ratio = cuBLAS time / ours.

The issue's target: weight-only within 1.1x of bf16 cuBLAS time, i.e. ratio >= 0.91 (geometric mean).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "fp8_matmul"))

from bench_fp8_matmul import SHAPES, bench_ab, m_for, quant_weights, rel_l2  # noqa: E402

# run 3: the data-parallel persistent grid against stream-K (run 1 measured the 128-token tiles: 0.46-0.61x)
# run 6: the uint16-pair weight decode (DECODE=1, the default) against the uint8 one (_d0)
CONFIGS = {"bt256_s4": dict(block_t=256, num_stages=4, stream_k=False),
           "bt256_s4_d0": dict(block_t=256, num_stages=4, stream_k=False, decode=0),
           "bt256_s4_sk": dict(block_t=256, num_stages=4, stream_k=True),
           "bt256_s4_sk_d0": dict(block_t=256, num_stages=4, stream_k=True, decode=0),
           "bt128_s6": dict(block_t=128, num_stages=6, stream_k=False)}  # fmt: skip
TARGET = 1 / 1.1


def _git_sha() -> str:
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _variants(F, W, x, w8, ws, wbf):
    """name -> zero-argument callable; every one computes x @ (w8 * ws).T in bf16."""

    def forced(sm90: bool, dequant_min_m: int):
        def run():
            old = (F.WO_SM90, F.WO_DEQUANT_MIN_M)
            F.WO_SM90, F.WO_DEQUANT_MIN_M = sm90, dequant_min_m
            try:
                return F.fp8_weight_only_linear(x, w8, ws)
            finally:
                F.WO_SM90, F.WO_DEQUANT_MIN_M = old

        return run

    v = {
        "bf16_mm": lambda: torch.nn.functional.linear(x, wbf),
        "library": lambda: F.fp8_weight_only_linear(x, w8, ws),
        "triton_fused": forced(False, 1 << 62),
        "dequant_cublas": forced(False, 0),
    }

    def sm90(cfg):
        cfg = dict(cfg)
        decode = cfg.pop("decode", W._DECODE)

        def run():
            old = W._DECODE
            W._DECODE = decode
            try:
                return W.fp8_weight_only_sm90(x, w8, ws, **cfg)
            finally:
                W._DECODE = old

        return run

    for name, cfg in CONFIGS.items():
        v["sm90_" + name] = sm90(cfg)
    return v


def run(out_path: Path, rounds: int) -> None:
    import triton

    from flux2_bench.kernels import fp8_matmul as F
    from flux2_bench.kernels import fp8_weight_only_sm90 as W

    assert W.is_available(), "needs an sm_90 GPU"
    torch.manual_seed(0)
    data = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git": _git_sha(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "expectation": W.EXPECTATION,
        "expectation_run2": W.EXPECTATION_RUN2,
        "expectation_run3": W.EXPECTATION_RUN3,
        "expectation_run4": W.EXPECTATION_RUN4,
        "expectation_run5": W.EXPECTATION_RUN5,
        "expectation_run6": W.EXPECTATION_RUN6,
        "weights": "synthetic (randn * 0.02, per-channel e4m3 scales): speed and bit checks only",
        "dispatch": {
            "WO_SM90": F.WO_SM90,
            "WO_SM90_MAX_M": F.WO_SM90_MAX_M,
            "WO_DEQUANT_MIN_M": F.WO_DEQUANT_MIN_M,
            "SK_MIN_FILL": W.SK_MIN_FILL,
            "SK_MIN_STEPS": W.SK_MIN_STEPS,
            "DECODE": W._DECODE,
        },
        "shapes": [],
    }
    for name, K, N in SHAPES:
        M = m_for(name, 1024)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        wbf = (torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16)
        w8, ws = quant_weights(wbf)["row"]
        wbf = F.dequantize_fp8_weight_ref(w8, ws)  # the anchor multiplies the same weights
        v = _variants(F, W, x, w8, ws, wbf)
        rec = {"name": name, "M": M, "K": K, "N": N, "flop": 2 * M * K * N}
        ref = F.fp8_weight_only_linear_ref(x, w8, ws, out_dtype=torch.float32)
        triton_out = v["triton_fused"]()
        rec["rel_l2"] = {k: rel_l2(v[k](), ref) for k in v if k != "bf16_mm"}
        rec["bits_vs_triton_fused"] = {
            k: int((v[k]() != triton_out).sum()) for k in v if k.startswith("sm90_") or k == "library"
        }
        del ref, triton_out
        rec["ab_vs_bf16"] = {}
        for k in v:
            if k == "bf16_mm":
                continue
            r = bench_ab(v[k], v["bf16_mm"], n=10, rounds=rounds)
            r["tflops"] = rec["flop"] / (r["ours_ms"] * 1e-3) / 1e12
            rec["ab_vs_bf16"][k] = r
            print(f"{name:20s} M={M:5d} {k:16s} bf16/ours {r['ratio']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})"
                  f"  {r['tflops']:.0f} TFLOP/s", flush=True)  # fmt: skip
        rec["bf16_tflops"] = rec["flop"] / (rec["ab_vs_bf16"]["library"]["anchor_ms"] * 1e-3) / 1e12
        data["shapes"].append(rec)
        del x, wbf, w8, ws, v
        torch.cuda.empty_cache()
    data["geomean"] = {
        k: _geo([s["ab_vs_bf16"][k]["ratio"] for s in data["shapes"]]) for k in data["shapes"][0]["ab_vs_bf16"]
    }
    data["best_per_shape"] = _geo([max(r["ratio"] for r in s["ab_vs_bf16"].values()) for s in data["shapes"]])
    print("geomean bf16/ours:", json.dumps(data["geomean"]), "best per shape:", round(data["best_per_shape"], 3))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1))


def _geo(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _dispatch_note(data: dict) -> list[str]:
    """Run 6 led to the every-M dispatch: say so, with that dispatch's A/B geomean from reports/fp8_matmul run 17."""
    if data.get("dispatch", {}).get("WO_SM90_MAX_M") != 1024 or "expectation_run6" not in data:
        return []
    run17 = HERE.parent / "fp8_matmul" / "fp8_matmul_run17.json"
    key = "ours_weight_only_row_vs_bf16_mm_ab"
    measured = ""
    if run17.exists():
        ab = [s["times"][key]["ratio"] for s in json.loads(run17.read_text())["shapes"] if key in s.get("times", {})]
        if ab:
            measured = (
                f"; that dispatch measured {_geo(ab):.3f} by A/B over the same shapes in reports/fp8_matmul run 17"
            )
    return [
        "",
        "After run 6 (commit 56ac5b1) the library dispatch changed on the strength of this run: the sm_90 kernel "
        "(`sm90_bt256_s4`, with stream-K where `use_stream_k` picks it) at every M, no dequantize + cuBLAS. The "
        f"`library` column below is the dispatch before that change{measured}.",
    ]


def render(data: dict) -> str:
    variants = list(data["shapes"][0]["ab_vs_bf16"])
    lines = [
        "# Weight-only FP8 on sm_90: Gluon warp-specialized kernel",
        "",
        f"Generated by `bench_wo_sm90.py --render`. {data['device']}, torch {data['torch']}, triton {data['triton']}, "
        f"CUDA {data['cuda']}, git {data['git']}, {data['date']}. Weights: {data['weights']}.",
        "",
        f"Expectation (written before the first run): {data['expectation']}.",
        *([f"Expectation for run 2: {data['expectation_run2']}."] if "expectation_run2" in data else []),
        *([f"Expectation for run 3: {data['expectation_run3']}."] if "expectation_run3" in data else []),
        *([f"Expectation for run 4: {data['expectation_run4']}."] if "expectation_run4" in data else []),
        *([f"Expectation for run 5: {data['expectation_run5']}."] if "expectation_run5" in data else []),
        *([f"Expectation for run 6: {data['expectation_run6']}."] if "expectation_run6" in data else []),
        *_dispatch_note(data),
        "",
        "Ratio = bf16 cuBLAS GPU time / ours, interleaved A/B (CUDA graphs, L2 flushed before each call, median of "
        "the rounds); target >= 0.91 (within 1.1x of cuBLAS time). Dispatch in this run: "
        + ", ".join(f"{k}={v}" for k, v in data["dispatch"].items())
        + ".",
        "",
        "| shape | M×K×N | bf16 cuBLAS TFLOP/s | " + " | ".join(variants) + " |",
        "|---|---|---|" + "---|" * len(variants),
    ]
    for s in data["shapes"]:
        cells = [f"{s['ab_vs_bf16'][k]['ratio']:.3f} ({s['ab_vs_bf16'][k]['tflops']:.0f})" for k in variants]
        head = f"| {s['name']} | {s['M']}×{s['K']}×{s['N']} | {s['bf16_tflops']:.0f} | "
        lines.append(head + " | ".join(cells) + " |")
    lines.append("| **geomean** | | | " + " | ".join(f"**{data['geomean'][k]:.3f}**" for k in variants) + " |")
    lines += [
        "",
        "Cells: ratio (our TFLOP/s).",
        "",
        "## Correctness (same run)",
        "",
        "Relative L2 error against `fp8_weight_only_linear_ref` (fp32), and bf16 elements that differ from the "
        "Triton fused kernel's output. `library` differs where it runs dequantize + cuBLAS (M >= "
        f"{data['dispatch']['WO_DEQUANT_MIN_M']}): that path rounds `w * scale` and its GEMM output to bf16. "
        "Stream-K (`_sk`, and `library` where it chooses stream-K) sums a split tile's K ranges in another order "
        "(fp32 partials), so its bits differ by output rounding.",
        "",
        "| shape | " + " | ".join(data["shapes"][0]["rel_l2"]) + " | bits ≠ Triton fused |",
        "|---|" + "---|" * (len(data["shapes"][0]["rel_l2"]) + 1),
    ]
    for s in data["shapes"]:
        bits = ", ".join(f"{k} {v}" for k, v in s["bits_vs_triton_fused"].items())
        lines.append(f"| {s['name']} | " + " | ".join(f"{e:.1e}" for e in s["rel_l2"].values()) + f" | {bits} |")
    return "\n".join(lines + history() + probes()) + "\n"


def history() -> list[str]:
    """Every run's geomean per variant (wo_sm90_run*.json beside this script)."""
    runs = sorted(HERE.glob("wo_sm90_run*.json"), key=lambda p: int(p.stem.rsplit("run", 1)[1]))
    data = [(p.name, json.loads(p.read_text())) for p in runs]
    variants = list(dict.fromkeys(k for _, d in data for k in d["geomean"]))
    lines = ["", "## All runs: geomean of bf16 cuBLAS / ours over the 10 shapes (A/B)", "",
             "| run | git | M = 512 stream-K rule | " + " | ".join(variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]  # fmt: skip
    for name, d in data:
        rule = ", ".join(f"{k}={d['dispatch'][k]}" for k in ("SK_MIN_FILL", "SK_MIN_STEPS") if k in d["dispatch"])
        cells = [f"{d['geomean'][k]:.3f}" if k in d["geomean"] else "" for k in variants]
        lines.append(f"| {name} | {d['git']} | {rule or 'none'} | " + " | ".join(cells) + " |")
    return lines


def probes() -> list[str]:
    """probe_wo_sk_run*.json: GPU time per variant (us) at the M = 512 shapes."""
    runs = sorted(HERE.glob("probe_wo_sk_run*.json"))
    if not runs:
        return []
    lines = ["", "## Where stream-K's time goes (probe_wo_sk.py; 'store' and 'none' give wrong outputs, timing only)",
             "", "dp: data-parallel (96 programs on txt.proj / txt.mlp_out); sk132 / sk96: stream-K on 132 / 96 "
             "programs; _store: partials stored, no counter and no fixup; _none: no partials. GPU time (us) "
             "by A/B against bf16 cuBLAS.", ""]  # fmt: skip
    for p in runs:
        d = json.loads(p.read_text())
        lines += [f"{p.name} (git {d['git']}). Expectation: {d.get('expectation_run2') or d['expectation']}", ""]
        shapes = d["shapes"]
        variants = list(next(iter(shapes.values()))["ab"])
        lines += ["| shape | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for name, rec in shapes.items():
            cells = [f"{rec['ab'][k]['ours_ms'] * 1e3:.1f}" for k in variants]
            lines.append(f"| {name} ({rec['M']}×{rec['K']}×{rec['N']}) | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "wo_sm90_run1.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--render", type=Path, default=None, help="print the markdown report of this JSON and exit")
    args = ap.parse_args()
    if args.render:
        sys.stdout.write(render(json.loads(args.render.read_text())))
        return
    run(args.out, args.rounds)


if __name__ == "__main__":
    main()
