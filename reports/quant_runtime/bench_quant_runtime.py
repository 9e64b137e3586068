"""Quantized runtime on the GPU: FLUX.2-dev, synthetic weights, one forward at 1024².

For each recipe: ms/step (CUDA events, median of repeats after warm-up, autotuning included in the
warm-up), weight GiB, peak allocated GiB, and the output's SQNR against the bf16 model with the same
synthetic weights (labeled synthetic: it measures quantization error of random weights, not image
fidelity). In the same process, the anchors: diffusers bf16, diffusers + torchao FP8 row-wise
(dynamic activations, eager) and diffusers + bitsandbytes NF4 on every block linear.

    python3 reports/quant_runtime/bench_quant_runtime.py --out $OUT/quant_runtime.json
    python3 reports/quant_runtime/bench_quant_runtime.py --markdown RUN.json README.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "transformer"))
from bench_transformer import env_block, time_forward  # noqa: E402

from flux2_bench.anchors import (  # noqa: E402
    diffusers_forward,
    diffusers_view,
    quantize_bnb_nf4,
    quantize_torchao_fp8_row,
)
from flux2_bench.attention import use_backend  # noqa: E402
from flux2_bench.model import use_fused  # noqa: E402
from flux2_bench.quantize.formats import sqnr  # noqa: E402
from flux2_bench.sampling import image_ids, text_ids  # noqa: E402
from flux2_bench.weights import model_bytes, synthetic_transformer  # noqa: E402

GIB = 2**30
PRESET = "flux.2-dev"
# (recipe, fused modes): every recipe is timed with the fused elementwise kernels (model.use_fused(True):
# kernels/fused_modulate.py, kernels/qk_rope.py, the FP8 GEMM's gated-residual epilogue) and the main
# ones also without them (the plain PyTorch block ops), on the same model in the same process.
# (The fused-W4A16-everywhere variant of the 4-bit recipes was measured in run 1: 765 / 930 ms.)
RECIPES = [
    ("fp8-row", (False, True)),
    ("fp8-block", (True,)),
    ("fp8-tensor", (True,)),
    ("int4-g128", (False, True)),
    ("nf4", (False, True)),
]
PROFILED = {
    "ours bf16", "ours bf16 fused", "ours fp8-row", "ours fp8-row fused", "ours int4-g128 fused", "ours nf4 fused"
}  # fmt: skip


def inputs(cfg, size: int, dev="cuda", dt=torch.bfloat16):
    n = size // 16
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, n * n, cfg.in_channels, generator=g).to(dev, dt)
    txt = torch.randn(1, 512, cfg.context_in_dim, generator=g).to(dev, dt)
    t = torch.full((1,), 0.7, device=dev, dtype=dt)
    gd = torch.full((1,), 4.0, device=dev, dtype=dt)
    return img, image_ids(n, n, device=dev), txt, text_ids(512, device=dev), t, gd


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def diffusers_call(dmodel, args):
    forward = diffusers_forward(dmodel)
    return lambda: forward(*args)


def row(name: str, fn, weights_gib: float, out=None, ref=None, **extra) -> dict:
    r = {"name": name, "weights_gib": weights_gib, **time_forward(fn, warmup=2, repeats=5), **extra}
    if out is not None:
        r["finite"] = bool(torch.isfinite(out).all())
        if ref is not None:
            r["sqnr_vs_bf16_db_synthetic"] = sqnr(out.float().cpu(), ref)
    msg = (
        f"{name:28s} {r['ms_median']:8.1f} ms  weights {weights_gib:6.2f} GiB  peak {r['peak_allocated_gib']:6.2f} GiB"
    )
    if ref is not None:
        msg += f"  sqnr {r.get('sqnr_vs_bf16_db_synthetic', float('nan')):.1f} dB"
    print(msg, flush=True)
    return r


class _Rows(list):
    """A list that rewrites the JSON after every append, so a run cut short keeps its rows."""

    def __init__(self, result: dict, path: str | None):
        super().__init__()
        self.result, self.path = result, path

    def append(self, item) -> None:
        super().append(item)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.result, f, indent=2)


def _category(kernel: str) -> str:
    k = kernel.lower()
    if "dequant" in k:
        return "4-bit dequantize"
    if any(t in k for t in ("fmha", "cudnn", "flash", "attention", "attn")):
        return "attention"
    if any(t in k for t in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "int4_matmul", "sm90_")):
        return "gemm"
    return "elementwise/other"


def profile_split(fn) -> dict:
    """One call under the profiler: CUDA ms per kernel category and the 12 largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if not us or e.key.startswith(("aten::", "cudaLaunch", "cuLaunch", "Memcpy", "Memset")):
            continue
        cat = _category(e.key)
        split[cat] = split.get(cat, 0.0) + us / 1e3
        kernels.append({"kernel": e.key[:100], "calls": e.count, "ms": us / 1e3, "category": cat})
    kernels.sort(key=lambda r: -r["ms"])
    return {"ms_by_category": split, "top_kernels": kernels[:12]}


def host_ms(fn, repeats: int = 3) -> float:
    """Median CPU time to enqueue one forward (the call returns before the GPU finishes unless something
    synchronizes): near the GPU time means the step is host-bound or stalls on a sync."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def timed(rows, name, fn, weights_gib, ref, **extra) -> None:
    """Append a row (time + peak + SQNR) and, for PROFILED names, its kernel-category split."""
    out = fn()  # first call: Triton autotuning and compilation
    r = row(name, fn, weights_gib, out, ref, **extra)
    r["host_ms"] = host_ms(fn)
    print(f"    host (launch) time {r['host_ms']:.1f} ms per forward", flush=True)
    if name in PROFILED:
        r["profile"] = profile_split(fn)
        print("   ", {k: round(v, 1) for k, v in r["profile"]["ms_by_category"].items()}, flush=True)
    rows.append(r)


def anchor_row(rows, name: str, build, quantize, args, ref) -> None:
    """Time diffusers + a quantization library: build() gives the diffusers model, quantize() converts
    it in place. The model lives only inside this call, so a failed anchor cannot stay resident into
    the rows after it (run 1's bitsandbytes anchor did, and run 2's kept torchao's through a closure)."""
    try:
        dmodel = build()
        t0 = time.perf_counter()
        quantize(dmodel)
        quant_s = time.perf_counter() - t0
        free()
        with torch.inference_mode():
            call = diffusers_call(dmodel, args)
            rows.append(row(name, call, model_bytes(dmodel) / GIB, call(), ref, quantize_s=quant_s))
    except Exception as e:
        rows.append({"name": name, "error": f"{type(e).__name__}: {e}"[:500]})
        traceback.print_exc()
    dmodel = call = None
    free()


def run(size: int, out: str | None = None) -> dict:
    result = {"env": env_block(), "preset": PRESET, "size": size, "weights": "synthetic (random)"}
    rows = result["rows"] = _Rows(result, out)
    free()
    model = synthetic_transformer(PRESET, device="cuda", seed=0)
    args = inputs(model.config, size)
    with torch.inference_mode():
        with use_fused(False):
            ref = model(*args).float().cpu()
        for fused in (False, True):
            with use_fused(fused):
                name = "ours bf16" + (" fused" if fused else "")
                timed(rows, name, lambda: model(*args), model_bytes(model) / GIB, ref, fused=fused)
        dmodel = diffusers_view(model)
        del model
        free()
        call = diffusers_call(dmodel, args)
        rows.append(row("diffusers bf16", call, model_bytes(dmodel) / GIB, call(), ref))
    box = [dmodel]  # handed over: the anchor's model must live only inside anchor_row
    dmodel = call = None
    anchor_row(rows, "diffusers + torchao fp8-row", box.pop, quantize_torchao_fp8_row, args, ref)
    build_bf16 = lambda: diffusers_view(synthetic_transformer(PRESET, device="cuda", seed=0))  # noqa: E731
    anchor_row(rows, "diffusers + bitsandbytes nf4", build_bf16, quantize_bnb_nf4, args, ref)

    for recipe, modes in RECIPES:
        try:
            t0 = time.perf_counter()
            model = synthetic_transformer(PRESET, device="cuda", seed=0, recipe=recipe)
            build_s = time.perf_counter() - t0
            free()
            kernel = model.single_blocks[0].linear1.kernel(torch.device("cuda"))
            with torch.inference_mode():
                for fused in modes:
                    name = f"ours {recipe}" + (" fused" if fused else "")
                    with use_fused(fused):
                        timed(rows, name, lambda m=model: m(*args), model_bytes(model) / GIB, ref,
                              kernel=kernel, build_s=build_s, fused=fused)  # fmt: skip
                    free()
                if recipe == "fp8-row":  # does the FP8 attention kernel (issue 5) pay inside the model?
                    with use_fused(True), use_backend("fp8"):
                        timed(rows, "ours fp8-row fused + fp8 attention", lambda m=model: m(*args),
                              model_bytes(model) / GIB, ref, kernel=kernel, build_s=build_s, fused=True)  # fmt: skip
                    free()
        except Exception as e:
            rows.append({"name": f"ours {recipe}", "error": f"{type(e).__name__}: {e}"[:500]})
            traceback.print_exc()
        model = None
        free()
    return result


TARGETS = {  # issue 7: ms/step and peak GiB ceilings, eager PyTorch, FLUX.2-dev 1024², H100
    "fp8-row": (330.0, 34.0),
    "int4-g128": (480.0, 18.5),
    "nf4": (480.0, 18.5),
}


def markdown(result: dict) -> str:
    e = result["env"]
    lines = [
        f"# Quantized runtime: {result['preset']} at {result['size']}², {result['weights']} weights",
        "",
        f"{e['gpu']} (driver {e['driver']}), torch {e['torch']}, triton {e['triton']}, git {e['git_sha']}, "
        f"{e['time']}. One forward = one sampling step (4096 image + 512 text tokens), eager PyTorch. "
        "`fused` rows run the blocks' elementwise work in the fused Triton kernels (LayerNorm + modulate "
        "+ FP8 quantization, QK-norm + RoPE into the joint Q/K/V buffers, SwiGLU + concat + FP8 "
        "quantization, gated residual in the FP8 GEMM epilogue); the others run the plain PyTorch ops on "
        "the same model. SQNR is the output's against the unfused bf16 model with the same random weights: "
        "quantization error of synthetic weights, not image fidelity. Generated by `bench_quant_runtime.py` "
        "from the JSON beside it.",
        "",
        "| configuration | ms / step | p10 | p90 | host ms | weights GiB | peak GiB | output SQNR dB (synthetic) "
        "| kernel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        s = r.get("sqnr_vs_bf16_db_synthetic")
        host = f"{r['host_ms']:.0f}" if "host_ms" in r else ""
        lines.append(
            f"| {r['name']} | {r['ms_median']:.1f} | {r['ms_p10']:.1f} | {r['ms_p90']:.1f} | {host} "
            f"| {r['weights_gib']:.2f} "
            f"| {r['peak_allocated_gib']:.2f} | {'' if s is None else f'{s:.1f}'} | {r.get('kernel', '')} |"
        )
    by_name = {r["name"]: r for r in result["rows"] if "error" not in r}
    lines += ["", "## Issue 7 targets (fused rows)", "", "| recipe | ms / step | target | peak GiB | target | met |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for recipe, (ms_max, gib_max) in TARGETS.items():
        r = by_name.get(f"ours {recipe} fused")
        if r is None:
            lines.append(f"| {recipe} | not measured | ≤ {ms_max:.0f} | | ≤ {gib_max} | no |")
            continue
        ok = r["ms_median"] <= ms_max and r["peak_allocated_gib"] <= gib_max
        lines.append(
            f"| {recipe} | {r['ms_median']:.1f} | ≤ {ms_max:.0f} | {r['peak_allocated_gib']:.2f} | ≤ {gib_max} "
            f"| {'yes' if ok else '**no**'} |"
        )
    profiled = [r for r in result["rows"] if "profile" in r]
    if profiled:
        cats = sorted({c for r in profiled for c in r["profile"]["ms_by_category"]})
        lines += ["", "## Where a step's GPU time goes (one profiled forward, CUDA ms by kernel category)", "",
                  "| configuration | " + " | ".join(cats) + " | sum |", "|---" * (len(cats) + 2) + "|"]  # fmt: skip
        for r in profiled:
            split = r["profile"]["ms_by_category"]
            cells = " | ".join(f"{split.get(c, 0.0):.1f}" for c in cats)
            lines.append(f"| {r['name']} | {cells} | {sum(split.values()):.1f} |")
        for r in profiled:
            lines += ["", f"Largest kernels, {r['name']}:", "", "| kernel | calls | ms | category |"]
            lines.append("|---|---|---|---|")
            for k in r["profile"]["top_kernels"]:
                lines.append(f"| `{k['kernel'][:80]}` | {k['calls']} | {k['ms']:.1f} | {k['category']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--markdown", nargs=2, metavar=("JSON", "MD"))
    args = ap.parse_args()
    if args.markdown:
        with open(args.markdown[0]) as f, open(args.markdown[1], "w") as g:
            g.write(markdown(json.load(f)))
        return
    result = run(args.size, args.out)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(markdown(result))


if __name__ == "__main__":
    main()
