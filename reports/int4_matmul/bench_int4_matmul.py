"""Benchmark and GPU check of flux2_bench.kernels.int4_matmul on the FLUX.2-dev GEMM shapes at 1024^2.

    python reports/int4_matmul/bench_int4_matmul.py --out $OUT/int4_matmul.json   # on the GPU
    python reports/int4_matmul/bench_int4_matmul.py --render reports/int4_matmul/int4_matmul.json

Per shape and format: relative L2 / max error of the kernel against the fp32 reference, then median times
(triton.testing.do_bench, which flushes L2 before every run) of
  ours        int4_matmul (autotuned; the chosen config and every tried config's time are recorded),
  cublas      torch.nn.functional.linear on the dequantized bf16 weight (the bf16 anchor),
  deq+cublas  torch dequantization of the packed weight to bf16, then F.linear (what GGUF-style
              loaders do),
  deq_triton+cublas  dequantize_4bit (Triton) into a reused bf16 scratch, then F.linear (added after
              run 2; absent from older JSON),
and the bf16 ceiling: torch.mm 8192^3 in the same process.  FLOPs = 2*M*N*K.
Weights are random packed bytes with random positive scales (never zeros).  The JSON is written after
every shape, so a run cut short still leaves data.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

SHAPES = [  # name, M, K, N (FLUX.2-dev, 1024^2: 4608 = 4096 image + 512 text tokens)
    ("single.linear1", 4608, 6144, 55296),
    ("single.linear2", 4608, 24576, 6144),
    ("double.img.qkv", 4096, 6144, 18432),
    ("double.img.mlp_in", 4096, 6144, 36864),
    ("double.img.mlp_out", 4096, 18432, 6144),
    ("double.img.proj", 4096, 6144, 6144),
    ("double.txt.qkv", 512, 6144, 18432),
    ("double.txt.mlp_in", 512, 6144, 36864),
    ("double.txt.mlp_out", 512, 18432, 6144),
    ("double.txt.proj", 512, 6144, 6144),
]
FORMATS = ("int4-g128", "nf4")
MODE_NAMES = {  # LUT_MODE_SWAP_AB -> column title
    "0_0": "LUT0 arith/gather, W via smem",
    "0_1": "LUT0, W in registers (swap)",
    "1_0": "LUT1 pair table, W via smem",
    "1_1": "LUT1 pair table, swap",
    "2_0": "LUT2 PTX bf16x2, W via smem",
    "2_1": "LUT2 PTX bf16x2, swap",
}


def bench(fn, rep=100):
    import triton

    med, lo, hi = triton.testing.do_bench(fn, warmup=10, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": lo, "p80_ms": hi}


def random_weights(fmt, n, k, device="cuda"):
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    if fmt == "nf4":
        s = torch.rand(n * k // 64, device=device) * 0.05 + 0.01
    else:
        s = (torch.rand(n, k // 128, device=device) * 0.01 + 0.002).to(torch.bfloat16)
    return q, s


def torch_dequant_bf16(fmt, q, s, code):
    """Packed weight -> bf16 [N, K] with plain torch ops (the 'dequantize then cuBLAS' baseline)."""
    n, kh = q.shape
    nib = torch.stack((q >> 4, q & 0xF), dim=-1).view(n, 2 * kh)
    if fmt == "nf4":
        return (code[nib.long()].view(n, -1, 64) * s.view(n, -1, 1)).view(n, 2 * kh).to(torch.bfloat16)
    w = (nib.to(torch.bfloat16) - 8).view(n, -1, 128) * s.view(n, -1, 1)
    return w.view(n, 2 * kh)


def config_name(cfg) -> str:
    kw = cfg.kwargs if hasattr(cfg, "kwargs") else cfg
    s = "BM{BLOCK_M}_BN{BLOCK_N}_BK{BLOCK_K}_G{GROUP_M}_lut{LUT_MODE}_swap{SWAP_AB}".format(**kw)
    if hasattr(cfg, "num_warps"):
        s += f"_w{cfg.num_warps}_s{cfg.num_stages}"
    return s


def rel_err(out, ref):
    out, ref = out.float(), ref.float()
    return {
        "rel_l2": float((out - ref).norm() / ref.norm()),
        "max_abs": float((out - ref).abs().max()),
        "nan": int(torch.isnan(out).sum()),
    }


def probe_configs(k4, results):
    """Compile and check every candidate config (per format, as the pruner keeps them) on a small shape; drop
    the ones that fail from the autotuner so one bad config cannot sink the run."""
    at = k4._int4_matmul_autotuned
    limit = k4._max_smem(0)
    failed = set()
    for fmt in FORMATS:
        group = 128 if fmt == "int4-g128" else 64
        for i, cfg in enumerate(k4._prune(at.configs, group, limit, fmt == "nf4")):
            meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            row = {"config": config_name(cfg), "fmt": fmt}
            m, k, n = 300, 512, 272
            q, s = random_weights(fmt, n, k)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
            gate = torch.randn(n, device="cuda", dtype=torch.bfloat16)
            try:
                # The fused epilogue is a separate compile: check it on the first config only (compile time).
                for kw in ({}, {"residual": res, "gate": gate}) if i == 0 else ({},):
                    out = k4.int4_matmul(x, q, s, fmt=fmt, config=meta, **kw)
                    ref = k4.int4_matmul_ref(x, q, s, fmt=fmt, out_dtype=torch.float32, **kw)
                    e = rel_err(out, ref)
                    row["epilogue" if kw else "plain"] = e
                    if not (e["rel_l2"] < 1e-2 and e["nan"] == 0):
                        raise AssertionError(f"{fmt} {list(kw)}: {e}")
                row["ok"] = True
            except Exception as exc:  # record and drop
                row["ok"] = False
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                failed.add(id(cfg))
            results["probe"].append(row)
            print("probe", row, flush=True)
    at.configs = [c for c in at.configs if id(c) not in failed]


def run(out_path: Path, time_budget_s: float):
    import triton

    from flux2_bench.kernels import int4_matmul as k4

    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference must be fp32
    dev = torch.cuda.get_device_properties(0)
    results = {
        "gpu": torch.cuda.get_device_name(0),
        "sm": f"{dev.major}.{dev.minor}",
        "max_shared_mem": k4._max_smem(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": os.environ.get("GIT_SHA", "unknown"),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "probe": [],
        "rows": [],
    }
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: torch.mm(a, b))
    results["ceiling"] = {"what": "torch.mm bf16 8192^3", **t, "tflops": 2 * 8192**3 / t["ms"] / 1e9}
    a = b = None  # free 256 MB before the shapes
    print("ceiling", results["ceiling"], flush=True)

    probe_configs(k4, results)
    out_path.write_text(json.dumps(results, indent=1))
    at = k4._int4_matmul_autotuned
    code = torch.tensor(k4.NF4_CODE, device="cuda")
    for name, m, k, n in SHAPES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        flop = 2 * m * n * k
        w_bf16 = None
        for fmt in FORMATS:
            if time.time() - t_start > time_budget_s:
                print("time budget reached, stopping", flush=True)
                out_path.write_text(json.dumps(results, indent=1))
                return results
            q, s = random_weights(fmt, n, k)
            row = {"name": name, "M": m, "K": k, "N": n, "fmt": fmt, "flop": flop}
            out = k4.int4_matmul(x, q, s, fmt=fmt)  # autotunes
            row["config"] = config_name(at.best_config)
            timings = getattr(at, "configs_timings", None) or {}
            row["tried"] = {config_name(c): (v[0] if isinstance(v, list | tuple) else v) for c, v in timings.items()}
            ref = k4.int4_matmul_ref(x, q, s, fmt=fmt, out_dtype=torch.float32)
            row["check"] = rel_err(out, ref)
            del ref, out
            w_deq = torch_dequant_bf16(fmt, q, s, code)
            row["ours"] = bench(lambda: k4.int4_matmul(x, q, s, fmt=fmt))  # noqa: B023
            row["deq_cublas"] = bench(
                lambda: torch.nn.functional.linear(x, torch_dequant_bf16(fmt, q, s, code))  # noqa: B023
            )
            # Triton dequantization into a reused bf16 scratch, then cuBLAS (added after run 2).
            scratch = torch.empty_like(w_deq)
            row["deq_triton_exact"] = bool(torch.equal(k4.dequantize_4bit(q, s, fmt=fmt, out=scratch), w_deq))
            row["deq_triton_cublas"] = bench(
                lambda: torch.nn.functional.linear(x, k4.dequantize_4bit(q, s, fmt=fmt, out=scratch))  # noqa: B023
            )
            scratch = None
            if w_bf16 is None:  # the anchor does not depend on the format: time it once per shape
                w_bf16 = w_deq
                cublas = bench(lambda: torch.nn.functional.linear(x, w_bf16))  # noqa: B023
            row["cublas"] = cublas
            del w_deq
            for key in ("ours", "cublas", "deq_cublas", "deq_triton_cublas"):
                row[key]["tflops"] = flop / row[key]["ms"] / 1e9
                row[key]["pct_ceiling"] = 100 * row[key]["tflops"] / results["ceiling"]["tflops"]
            row["ours_vs_cublas"] = row["cublas"]["ms"] / row["ours"]["ms"]  # > 1: ours faster
            row["ours_vs_deq_cublas"] = row["deq_cublas"]["ms"] / row["ours"]["ms"]
            results["rows"].append(row)
            print(
                f"{name:20s} {fmt:9s} rel_l2={row['check']['rel_l2']:.2e} ours {row['ours']['ms']:.3f} ms "
                f"({row['ours']['tflops']:.0f} TF/s) cublas {row['cublas']['ms']:.3f} deq+cublas "
                f"{row['deq_cublas']['ms']:.3f} ratio {row['ours_vs_cublas']:.2f} [{row['config']}] "
                f"t={time.time() - t_start:.0f}s",
                flush=True,
            )
            out_path.write_text(json.dumps(results, indent=1))
        x = w_bf16 = None
        torch.cuda.empty_cache()
    return results


def render(json_path: Path) -> str:
    r = json.loads(json_path.read_text())
    c = r["ceiling"]
    lines = [
        "# int4_matmul (W4A16) on FLUX.2-dev shapes",
        "",
        "Generated by `reports/int4_matmul/bench_int4_matmul.py --render` from "
        f"`{json_path.name}`; do not edit by hand.",
        "",
        f"GPU {r['gpu']} (sm_{r['sm']}), torch {r['torch']}, triton {r['triton']}, CUDA {r['cuda']}, "
        f"git {r['git_sha']}, {r['time']}.  bf16 ceiling ({c['what']}): {c['tflops']:.0f} TFLOP/s.",
        "",
        "Times are do_bench medians (ms).  `vs cuBLAS` = cuBLAS bf16 time / our time (> 1: faster).",
        "",
        "| shape | M×K×N | fmt | rel L2 | ours ms | TFLOP/s | % ceil | cuBLAS bf16 ms | deq+cuBLAS ms "
        "| vs cuBLAS | vs deq+cuBLAS | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['name']} | {row['M']}×{row['K']}×{row['N']} | {row['fmt']} | {row['check']['rel_l2']:.1e} "
            f"| {row['ours']['ms']:.3f} | {row['ours']['tflops']:.0f} | {row['ours']['pct_ceiling']:.0f} "
            f"| {row['cublas']['ms']:.3f} | {row['deq_cublas']['ms']:.3f} | {row['ours_vs_cublas']:.2f} "
            f"| {row['ours_vs_deq_cublas']:.2f} | `{row['config']}` |"
        )
    tri = [x for x in r["rows"] if "deq_triton_cublas" in x]
    if tri:
        lines += ["", "| shape | fmt | deq_triton+cuBLAS ms | vs cuBLAS | bit-exact dequant |", "|---|---|---|---|---|"]
        for x in tri:
            ratio = x["cublas"]["ms"] / x["deq_triton_cublas"]["ms"]
            lines.append(
                f"| {x['name']} | {x['fmt']} | {x['deq_triton_cublas']['ms']:.3f} | {ratio:.2f} "
                f"| {x['deq_triton_exact']} |"
            )
    for fmt in FORMATS:
        rows = [x for x in r["rows"] if x["fmt"] == fmt]
        if rows:
            ours = sum(x["ours"]["ms"] for x in rows)
            cub = sum(x["cublas"]["ms"] for x in rows)
            lines.append("")
            lines.append(
                f"{fmt}: sum over the {len(rows)} shapes above: ours {ours:.2f} ms, cuBLAS bf16 {cub:.2f} ms "
                f"(ratio {cub / ours:.2f})."
            )
    lines += ["", "## Dequantization modes (autotuner timings of the best tile per mode, ms)", ""]
    lines += ["| shape | fmt | " + " | ".join(MODE_NAMES.values()) + " |", "|---|---|" + "---|" * len(MODE_NAMES)]
    for row in r["rows"]:
        best = {}
        for cfg, ms in row.get("tried", {}).items():
            mode = cfg.split("_lut")[1][0] + "_" + cfg.split("_swap")[1][0]
            best[mode] = min(ms, best.get(mode, float("inf")))
        cells = [f"{best[m]:.3f}" if m in best else "–" for m in MODE_NAMES]
        lines.append(f"| {row['name']} | {row['fmt']} | " + " | ".join(cells) + " |")
    before = json_path.parent / "int4_matmul_run1.json"
    if before.exists() and before != json_path:
        old = {(x["name"], x["fmt"]): x for x in json.loads(before.read_text())["rows"]}
        lines += ["", f"## Before / after the tuning iteration (`{before.name}` → `{json_path.name}`)", ""]
        lines += ["| shape | fmt | before ms (vs cuBLAS) | after ms (vs cuBLAS) | speed-up |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            o = old.get((row["name"], row["fmt"]))
            if o:
                lines.append(
                    f"| {row['name']} | {row['fmt']} | {o['ours']['ms']:.3f} ({o['ours_vs_cublas']:.2f}) "
                    f"| {row['ours']['ms']:.3f} ({row['ours_vs_cublas']:.2f}) "
                    f"| {o['ours']['ms'] / row['ours']['ms']:.2f} |"
                )
    bad = [p for p in r.get("probe", []) if not p.get("ok")]
    lines += ["", f"Config probe: {len(r.get('probe', [])) - len(bad)} configs compiled and matched the reference"]
    for p in bad:
        lines.append(f"- failed `{p['config']}`: {p.get('error', '')[:200]}")
    notes = json_path.parent / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("int4_matmul.json"))
    p.add_argument("--render", type=Path, default=None, help="write README.md next to this JSON and exit")
    p.add_argument("--time-budget", type=float, default=300.0, help="stop starting new shapes after this many s")
    args = p.parse_args(argv)
    if args.render is not None:
        text = render(args.render)
        (args.render.parent / "README.md").write_text(text)
        print(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run(args.out, args.time_budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
