"""Does the warp-specialized Gluon kernel (kernels/fp8_attention_sm90.py) beat the Triton kernel, and reach
1.4x cuDNN? Checked and timed in one process on one H100.

    GIT_SHA=<sha> python reports/fp8_attention/bench_attn_sm90.py --out $OUT/attn_sm90.json   # GPU
    python reports/fp8_attention/bench_attn_sm90.py --render reports/fp8_attention/attn_sm90_run1.json \
        > reports/fp8_attention/attn_sm90.md

1. ceiling: torch._scaled_mm fp8 e4m3 per-tensor 8192^3.
2. for L in (4608, 8704, 16896, 45568), B=1, H=48, D=128, bf16 FLUX.2-like inputs (bench_fp8_attention's
   recipe, gain 1): SDPA cuDNN bf16 (the anchor), the Triton kernel (the library's, on the same pre-quantized
   input) and every variant of the sm_90 kernel (key tile, ring depth, ping-pong, K scale block, int8 Q·K).
   Each variant's output is first compared with the Triton kernel's (relative L2; same quantization), and at
   L = 4608 with the emulating reference (same key tiling) and with exact fp32 attention (4 heads).
   Kernel-only times are do_bench medians with variants alternated over two rounds; `total` adds the pre-pass
   as fp8_attention runs it. FLOPs = 4 B H L^2 D.
The JSON is rewritten after every length, so a run cut short still leaves data.

Expectations (written before each run, sessions 10-11): kernels/fp8_attention_sm90.EXPECTATION (run 1),
EXPECTATION_RUN2 to EXPECTATION_RUN5; each JSON carries the one it was run against.
"""

# ruff: noqa: B023  -- every timed lambda runs inside the loop iteration that defines it

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fp8_attention import errors, flux_like, sdpa_fn  # noqa: E402

LENGTHS = (4608, 8704, 16896, 45568)
H, D = 48, 128
# name -> (qk, scale_block, fp8_attention_sm90 keywords); "triton" is the library's Triton kernel
VARIANTS = {  # runs 1-4 also timed 64-token scales, 3 stages, int8 Q·K, the exp2 split, ping-pong, row trees and
    # the late rescale (attn_sm90.md)
    "triton": ("fp8", 128, None),
    "ws_bn128_s2_sb128": ("fp8", 128, dict(block_n=128, num_stages=2)),
    "ws_bn64_s4": ("fp8", 128, dict(block_n=64, num_stages=4)),
    "ws_c3_bn64_s2": ("fp8", 128, dict(block_n=64, num_stages=2, consumers=3)),
    "ws_c3_bn64_s4": ("fp8", 128, dict(block_n=64, num_stages=4, consumers=3)),
    "ws_c3_bn128_s2": ("fp8", 128, dict(block_n=128, num_stages=2, consumers=3)),
}


def bench(fn, rep=150):
    import triton

    return triton.testing.do_bench(fn, warmup=20, rep=rep, quantiles=[0.5])


def run(out_path: Path, budget_s: float):
    import triton

    from flux2_bench.kernels import fp8_attention as fa
    from flux2_bench.kernels import fp8_attention_sm90 as A
    from flux2_bench.kernels.fp8_attention import (
        attention_fp32_ref,
        fp8_attention_quantized,
        fp8_attention_ref,
        quantize_qkv,
    )

    t0 = time.time()
    res = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": os.environ.get("GIT_SHA", "unknown"),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "expectation": getattr(A, "EXPECTATION_RUN5", A.EXPECTATION),
        "variants": {k: {"qk": v[0], "scale_block": v[1], "kwargs": v[2]} for k, v in VARIANTS.items()},
        "rows": [],
        "errors": [],
    }

    def save():
        out_path.write_text(json.dumps(res, indent=1))

    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    ms = bench(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16))
    res["ceiling_tflops"] = 2 * n**3 / ms / 1e9
    a = b = None  # free before the attention inputs
    save()

    cudnn = sdpa_fn("cudnn")
    for L in LENGTHS:
        if time.time() - t0 > budget_s:
            res["errors"].append(f"time budget reached before L={L}")
            break
        q, k, v = flux_like(1, H, L, D)
        flops = 4 * H * L * L * D
        row = {"L": L, "check": {}, "ms": {}}
        quants = {}
        for qk, sb, kw in VARIANTS.values():  # the Triton kernel reads Vᵀ in token order, ours permuted
            quants[(qk, sb, kw is not None)] = quantize_qkv(q, k, v, qk=qk, scale_block=sb, v_perm16=kw is not None)

        def call(name):
            qk, sb, kw = VARIANTS[name]
            quant = quants[(qk, sb, kw is not None)]
            if kw is None:
                return lambda: fp8_attention_quantized(quant, v, scale_block=sb)
            return lambda: A.fp8_attention_sm90(quant, v, scale_block=sb, **kw)

        ok = {}
        tri = {(qk, sb): fp8_attention_quantized(quantize_qkv(q, k, v, qk=qk, scale_block=sb), v, scale_block=sb)
               for qk, sb, _ in VARIANTS.values()}  # fmt: skip
        for name, (qk, sb, kw) in VARIANTS.items():
            try:
                out = call(name)()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 (record and go on with the other variants)
                res["errors"].append(f"L={L} {name}: {type(e).__name__}: {str(e)[:500]}")
                continue
            chk = {"vs_triton": errors(out, tri[(qk, sb)])}
            if LENGTHS[0] == L:
                bn = kw.get("block_n", A.BLOCK_N_DEFAULT) if kw else None
                chk["vs_ref"] = errors(out[:, :4], fp8_attention_ref(q[:, :4], k[:, :4], v[:, :4], qk=qk,
                                                                     scale_block=sb, block_n=bn))  # fmt: skip
                chk["vs_fp32"] = errors(out[:, :4], attention_fp32_ref(q[:, :4], k[:, :4], v[:, :4]))
            row["check"][name] = chk
            ok[name] = chk["vs_triton"]["rel_l2"] < 1e-2 and chk["vs_triton"]["nan"] == 0
            if not ok[name]:
                res["errors"].append(f"L={L} {name}: rel L2 vs Triton {chk['vs_triton']['rel_l2']:.3e}")
        tri = None

        row["ms"]["cudnn"] = [bench(lambda: cudnn(q, k, v))]
        for _round in range(2):
            for name in VARIANTS:
                if ok.get(name):
                    row["ms"].setdefault(name, []).append(bench(call(name)))
        row["ms"]["cudnn"].append(bench(lambda: cudnn(q, k, v)))
        # totals as the model calls it: fp8_attention (pre-pass + main loop), with the sm_90 dispatch and without
        for name, sm90 in (("fp8_attention", True), ("fp8_attention_triton", False)):
            fa.SM90 = sm90
            row.setdefault("total_ms", {})[name] = bench(lambda: fa.fp8_attention(q, k, v))
        fa.SM90 = True
        row["total_ms"]["cudnn"] = min(row["ms"]["cudnn"])
        row["tflops"] = {name: flops / min(t) / 1e9 for name, t in row["ms"].items()}
        res["rows"].append(row)
        save()
        print(L, {k_: round(v_, 0) for k_, v_ in row["tflops"].items()}, flush=True)
        quants = q = k = v = None
        torch.cuda.empty_cache()
    res["wall_s"] = time.time() - t0
    save()


def render(path: Path) -> str:
    d = json.loads(path.read_text())
    ceil = d["ceiling_tflops"]
    out = [f"# sm_90 warp-specialized FP8 attention (generated by `bench_attn_sm90.py --render {path.name}`)", "",
           f"{d['gpu']}, torch {d['torch']}, triton {d['triton']}, git {d['git_sha']}, {d['time']}. B=1, H=48, D=128, "
           "bf16 FLUX.2-like inputs; kernel alone on pre-quantized inputs (do_bench median, best of two alternated "
           f"rounds); FP8 ceiling (`_scaled_mm` 8192³, same run): {ceil:.0f} TFLOP/s.", "",
           f"Expectation, written before the run: {d['expectation']}.", "",
           "| L | kernel | TFLOP/s | % FP8 ceiling | × cuDNN | × Triton kernel | rel L2 vs Triton kernel |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in d["rows"]:
        cud = min(r["ms"]["cudnn"])
        tri = min(r["ms"]["triton"]) if "triton" in r["ms"] else None
        for name, ts in r["ms"].items():
            t = min(ts)
            err = r["check"].get(name, {}).get("vs_triton", {}).get("rel_l2")
            x_tri = f"{tri / t:.3f}" if tri else ""
            out.append(f"| {r['L']} | {name} | {r['tflops'][name]:.0f} | {100 * r['tflops'][name] / ceil:.0f} % | "
                       f"{cud / t:.2f} | {x_tri} | {'' if err is None else f'{err:.1e}'} |")  # fmt: skip
    out += ["", "Total = pre-pass (`quantize_qkv`) + kernel: `fp8_attention` as the model calls it (run 3 on: with the "
            "sm_90 dispatch, and `_triton` without it; runs 1-2: each kernel after its own pre-pass):", "",
            "| L | kernel | total ms | total × cuDNN |", "|---|---|---|---|"]  # fmt: skip
    for r in d["rows"]:
        cud = min(r["ms"]["cudnn"])
        for name, t in r.get("total_ms", {}).items():
            if name == "cudnn":
                continue
            out.append(f"| {r['L']} | {name} | {t:.3f} | {cud / t:.2f} |")
    first = d["rows"][0] if d["rows"] else None
    if first:
        out += ["", f"Accuracy at L = {first['L']} (first 4 heads): vs the emulating reference with the same key "
                "tiling, and vs exact fp32 attention:", "",
                "| kernel | vs ref rel L2 | vs fp32 rel L2 | vs fp32 cos |", "|---|---|---|---|"]  # fmt: skip
        for name, c in first["check"].items():
            if "vs_ref" in c:
                out.append(f"| {name} | {c['vs_ref']['rel_l2']:.1e} | {c['vs_fp32']['rel_l2']:.4f} | "
                           f"{c['vs_fp32']['cos']:.5f} |")  # fmt: skip
    if d["errors"]:
        out += ["", "Errors recorded by the run:", ""] + [f"- {e}" for e in d["errors"]]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON to write (GPU run)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new lengths after this")
    ap.add_argument("--render", type=Path, help="print the markdown report of a JSON")
    args = ap.parse_args(argv)
    if args.render:
        print(render(args.render), end="")
        return
    if not args.out:
        ap.error("--out or --render is required")
    run(args.out, args.budget_s)


if __name__ == "__main__":
    main()
