"""FP8 dispatch inside the model: classic vs persistent kernel, Triton's launch path vs the cached one.

FLUX.2-dev with synthetic weights, fp8-row recipe, fused block kernels, one forward at 1024², variants
alternated A/B/C/A/B/C in one process (clock drift between device calls is about 10 ms per step):
- "classic, triton launch": the library default up to 45200b9 (FLUX2_FP8_PERSISTENT unset, no cache);
- "classic, cached launch": kernels/fp8_matmul.FAST_LAUNCH (first launch of a specialization through
  Triton, later ones through the compiled kernel's launcher);
- "persistent, cached launch": the persistent TMA kernel with the eager autotune timer (the pair that
  returned wrong outputs needed the CUDA-graph timer too; reports/quant_runtime/diag_persistent_bisect).
Each row reports ms/step and the output's SQNR against the first variant's output: the cached launcher
must give the same bits (inf dB); the persistent kernel sums K in another order (finite, high dB).
Synthetic weights: speed and agreement only, not image fidelity.

    python3 reports/quant_runtime/bench_fp8_launch_ab.py --out $OUT/fp8_launch_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "transformer"))
sys.path.insert(0, os.path.dirname(__file__))
from bench_quant_runtime import GIB, PRESET, free, inputs  # noqa: E402
from bench_transformer import env_block, time_forward  # noqa: E402

from flux2_bench.kernels import fp8_matmul as F  # noqa: E402
from flux2_bench.model import use_fused  # noqa: E402
from flux2_bench.quantize.formats import sqnr  # noqa: E402
from flux2_bench.weights import model_bytes, synthetic_transformer  # noqa: E402

VARIANTS = {  # name: (PERSISTENT, FAST_LAUNCH)
    "classic, triton launch": (False, False),
    "classic, cached launch": (False, True),
    "persistent, cached launch": (True, True),
}


def run(recipe: str, rounds: int) -> list[dict]:
    model = synthetic_transformer(PRESET, device="cuda", seed=0, recipe=recipe)
    call_args = inputs(model.config, 1024)
    rows, base = [], None
    with torch.inference_mode(), use_fused(True):
        for rnd in range(rounds):
            for name, (persistent, fast) in VARIANTS.items():
                F.PERSISTENT, F.FAST_LAUNCH = persistent, fast
                free()
                out = model(*call_args).float()
                base = out if base is None else base
                r = {"recipe": recipe, "round": rnd, "variant": name, "weights_gib": model_bytes(model) / GIB,
                     **time_forward(lambda m=model, a=call_args: m(*a)),
                     "sqnr_vs_first_variant_db": sqnr(out, base), "nan": int(torch.isnan(out).sum())}  # fmt: skip
                rows.append(r)
                db = r["sqnr_vs_first_variant_db"]
                print(f"{recipe} round {rnd} {name:26s} {r['ms_median']:7.1f} ms (p10 {r['ms_p10']:.1f}, "
                      f"p90 {r['ms_p90']:.1f})  sqnr vs first {db:.1f} dB", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipe", default="fp8-row")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    default = (F.PERSISTENT, F.FAST_LAUNCH)
    result = {"env": env_block(), "preset": PRESET, "size": 1024, "weights": "synthetic (random)",
              "git_sha": os.environ.get("GIT_SHA", "unknown")}  # fmt: skip
    try:
        result["rows"] = run(args.recipe, args.rounds)
    finally:
        F.PERSISTENT, F.FAST_LAUNCH = default
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
