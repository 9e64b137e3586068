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
from flux2_bench.quantize.formats import sqnr  # noqa: E402
from flux2_bench.sampling import image_ids, text_ids  # noqa: E402
from flux2_bench.weights import model_bytes, synthetic_transformer  # noqa: E402

GIB = 2**30
PRESET = "flux.2-dev"
# (recipe, 4-bit dispatch threshold): the 4-bit recipes run twice, with dequantize + cuBLAS for
# large M (the default) and with the fused W4A16 kernel everywhere
RECIPES = [
    ("fp8-row", None),
    ("fp8-block", None),
    ("fp8-tensor", None),
    ("int4-g128", None),
    ("int4-g128", 1 << 62),
    ("nf4", None),
    ("nf4", 1 << 62),
]


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


def run(size: int, out: str | None = None) -> dict:
    result = {"env": env_block(), "preset": PRESET, "size": size, "weights": "synthetic (random)"}
    rows = result["rows"] = _Rows(result, out)
    free()
    model = synthetic_transformer(PRESET, device="cuda", seed=0)
    args = inputs(model.config, size)
    with torch.inference_mode():
        ref = model(*args).float().cpu()
        rows.append(row("ours bf16", lambda: model(*args), model_bytes(model) / GIB, model(*args), ref))
        dmodel = diffusers_view(model)
        del model
        free()
        call = diffusers_call(dmodel, args)
        rows.append(row("diffusers bf16", call, model_bytes(dmodel) / GIB, call(), ref))
    try:
        t0 = time.perf_counter()
        quantize_torchao_fp8_row(dmodel)
        quant_s = time.perf_counter() - t0
        free()
        with torch.inference_mode():
            call = diffusers_call(dmodel, args)
            rows.append(
                row("diffusers + torchao fp8-row", call, model_bytes(dmodel) / GIB, call(), ref, quantize_s=quant_s)
            )
    except Exception as e:
        rows.append({"name": "diffusers + torchao fp8-row", "error": f"{type(e).__name__}: {e}"[:500]})
        traceback.print_exc()
    del dmodel
    free()

    dmodel = None
    try:
        dmodel = diffusers_view(synthetic_transformer(PRESET, device="cuda", seed=0))
        t0 = time.perf_counter()
        quantize_bnb_nf4(dmodel)
        quant_s = time.perf_counter() - t0
        free()
        with torch.inference_mode():
            call = diffusers_call(dmodel, args)
            rows.append(
                row("diffusers + bitsandbytes nf4", call, model_bytes(dmodel) / GIB, call(), ref, quantize_s=quant_s)
            )
    except Exception as e:
        rows.append({"name": "diffusers + bitsandbytes nf4", "error": f"{type(e).__name__}: {e}"[:500]})
        traceback.print_exc()
    dmodel = call = None  # a failed anchor must not keep its model alive into our rows (it once did)
    free()

    from flux2_bench.quantize import linear as qlinear

    default_min_m = qlinear.DEQUANT_MIN_M
    for recipe, min_m in RECIPES:
        qlinear.DEQUANT_MIN_M = default_min_m if min_m is None else min_m
        label = f"ours {recipe}" + (" fused-w4a16" if min_m else "")
        try:
            t0 = time.perf_counter()
            model = synthetic_transformer(PRESET, device="cuda", seed=0, recipe=recipe)
            build_s = time.perf_counter() - t0
            free()
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model(*args)  # first call: Triton autotuning and compilation
                first_s = time.perf_counter() - t0
                kernel = model.single_blocks[0].linear1.kernel(torch.device("cuda"))
                rows.append(row(label, lambda m=model: m(*args), model_bytes(model) / GIB, out, ref,
                                kernel=kernel, build_s=build_s, first_call_s=first_s))  # fmt: skip
        except Exception as e:
            rows.append({"name": label, "error": f"{type(e).__name__}: {e}"[:500]})
            traceback.print_exc()
        model = None
        free()
    qlinear.DEQUANT_MIN_M = default_min_m
    return result


def markdown(result: dict) -> str:
    e = result["env"]
    lines = [
        f"# Quantized runtime: {result['preset']} at {result['size']}², {result['weights']} weights",
        "",
        f"{e['gpu']} (driver {e['driver']}), torch {e['torch']}, triton {e['triton']}, git {e['git_sha']}, "
        f"{e['time']}. One forward = one sampling step (4096 image + 512 text tokens), eager PyTorch. "
        "SQNR is the output's against the bf16 model with the same random weights: quantization error of "
        "synthetic weights, not image fidelity. Generated by `bench_quant_runtime.py` from the JSON beside it.",
        "",
        "| configuration | ms / step | p10 | p90 | weights GiB | peak GiB | output SQNR dB (synthetic) | kernel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        s = r.get("sqnr_vs_bf16_db_synthetic")
        lines.append(
            f"| {r['name']} | {r['ms_median']:.1f} | {r['ms_p10']:.1f} | {r['ms_p90']:.1f} | {r['weights_gib']:.2f} "
            f"| {r['peak_allocated_gib']:.2f} | {'' if s is None else f'{s:.1f}'} | {r.get('kernel', '')} |"
        )
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
