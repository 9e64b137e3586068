"""4-bit dispatch: from how many rows of x does "dequantize + cuBLAS" beat the fused W4A16 kernel?

`quantize.linear.DEQUANT_MIN_M` (2048) sends FLUX.2's 512 text rows to `int4_matmul`. That threshold
predates the bandwidth-bound Triton dequantization kernel: run 5 profiles 12.0 ms (int4) / 17.0 ms
(nf4) of `int4_matmul` per step for the 32 text-stream GEMMs. Expected with the current dequantization
(29 ms for 27.5 G weights per step, ~0.95 G weights/ms): the text linears' 3.9 G weights cost ~4.1 ms
to dequantize plus ~5.6 ms of bf16 cuBLAS at M = 512, so ~9.7 ms: about 2 ms saved for int4 and 7 ms
for nf4, with no change in peak memory (the chunks stay at most 512 MB).

Part 1 times one QuantLinear per FLUX.2-dev text shape and M, both paths, against bf16 cuBLAS, and
checks both paths agree with the dequantized-weight reference. Part 2 times the whole FLUX.2-dev step
(synthetic weights, 1024², fused block kernels) with each threshold, alternating A/B/A/B in one
process so clock drift hits both.

    python3 reports/quant_runtime/bench_dequant_min_m.py --out $OUT/dequant_min_m.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "transformer"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_quant_runtime import GIB, PRESET, free, inputs  # noqa: E402
from bench_transformer import env_block, time_forward  # noqa: E402

from flux2_bench.model import use_fused  # noqa: E402
from flux2_bench.quantize import linear as qlinear  # noqa: E402
from flux2_bench.quantize.formats import sqnr  # noqa: E402
from flux2_bench.weights import model_bytes, synthetic_transformer  # noqa: E402

TEXT_SHAPES = {  # name: (K, N) of FLUX.2-dev's double-block text-stream linears
    "txt.qkv": (6144, 18432),
    "txt.proj": (6144, 6144),
    "txt.mlp_in": (6144, 36864),
    "txt.mlp_out": (18432, 6144),
}
MS = [256, 512, 1024, 2048]
HUGE = 1 << 40


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=100)


def micro(recipes) -> list[dict]:
    rows = []
    for recipe in recipes:
        for name, (k, n) in TEXT_SHAPES.items():
            torch.manual_seed(0)
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.normal_(0, 0.02)
            q = qlinear.QuantLinear.from_float(lin, recipe)
            wd = q.dequantize(torch.bfloat16)
            for m in MS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = (x.float() @ wd.float().T).cpu()
                r = {"recipe": recipe, "shape": name, "M": m, "K": k, "N": n}
                with torch.inference_mode():
                    for tag, min_m in (("fused_int4_matmul", HUGE), ("dequant_cublas", 1)):
                        qlinear.DEQUANT_MIN_M = min_m
                        y = q(x)
                        r[f"{tag}_sqnr_db"] = sqnr(y.float().cpu(), ref)
                        r[f"{tag}_ms"] = _ms(lambda q=q, x=x: q(x))
                    r["bf16_cublas_ms"] = _ms(lambda x=x, w=wd: torch.mm(x, w.t()))
                rows.append(r)
                print(
                    f"{recipe:10s} {name:12s} M={m:5d} fused {r['fused_int4_matmul_ms'] * 1e3:7.1f} us "
                    f"dequant+cuBLAS {r['dequant_cublas_ms'] * 1e3:7.1f} us  bf16 {r['bf16_cublas_ms'] * 1e3:7.1f} us  "
                    f"sqnr {r['fused_int4_matmul_sqnr_db']:.1f} / {r['dequant_cublas_sqnr_db']:.1f} dB",
                    flush=True,
                )
            del q, wd, lin
            free()
    return rows


def model_ab(recipes, thresholds, rounds: int) -> list[dict]:
    rows = []
    for recipe in recipes:
        model = synthetic_transformer(PRESET, device="cuda", seed=0, recipe=recipe)
        call_args = inputs(model.config, 1024)
        base = None
        with torch.inference_mode(), use_fused(True):
            for rnd in range(rounds):
                for min_m in thresholds:
                    qlinear.DEQUANT_MIN_M = min_m
                    free()
                    out = model(*call_args).float()
                    base = out if base is None else base
                    r = {"recipe": recipe, "round": rnd, "dequant_min_m": min_m,
                         "weights_gib": model_bytes(model) / GIB,
                         **time_forward(lambda m=model, a=call_args: m(*a)),
                         "sqnr_vs_first_variant_db": sqnr(out, base)}  # fmt: skip
                    rows.append(r)
                    print(f"{recipe:10s} round {rnd} DEQUANT_MIN_M={min_m:5d}  {r['ms_median']:7.1f} ms "
                          f"(p10 {r['ms_p10']:.1f}, p90 {r['ms_p90']:.1f})  peak {r['peak_allocated_gib']:6.2f} GiB  "
                          f"sqnr vs first {r['sqnr_vs_first_variant_db']:.1f} dB", flush=True)  # fmt: skip
        model = None
        free()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default="int4-g128,nf4")
    ap.add_argument("--thresholds", default="2048,512", help="DEQUANT_MIN_M values A/B'd on the model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    default = qlinear.DEQUANT_MIN_M
    result = {"env": env_block(), "preset": PRESET, "size": 1024, "weights": "synthetic (random)",
              "default_dequant_min_m": default}  # fmt: skip
    try:
        if not args.skip_micro:
            result["micro"] = micro(recipes)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        result["model"] = model_ab(recipes, [int(t) for t in args.thresholds.split(",")], args.rounds)
    finally:
        qlinear.DEQUANT_MIN_M = default
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
