"""4-bit recipes: ms/step and peak GiB against DEQUANT_CHUNK_BYTES (the bf16 rows of W dequantized per
cuBLAS call), FLUX.2-dev synthetic weights at 1024², fused block kernels. One process, same models.

Run 2 (h100_dequant_chunks_run2.json) also A/B'd a pair-table vector load for nf4 dequantization
(commit 0ce4979): no gain (483.0 vs 480.3 ms at 256 MB, 479.4 vs 478.6 at 512 MB), so it was removed.

Question: run 4 spent 377 ms in GEMMs for int4 against 356 ms for bf16 with the same shapes; is the
chunking (6 GEMMs of N=9216 for linear1 instead of one of N=55296) the cost, and what does a bigger
chunk cost in peak memory?

    python3 reports/quant_runtime/bench_dequant_chunks.py --out $OUT/dequant_chunks.json
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

from flux2_bench.model import use_fused  # noqa: E402
from flux2_bench.quantize import linear as qlinear  # noqa: E402
from flux2_bench.quantize.formats import sqnr  # noqa: E402
from flux2_bench.weights import model_bytes, synthetic_transformer  # noqa: E402

CHUNKS_MB = [128, 256, 512, 1 << 20]  # the last: one chunk per layer (whole bf16 weight)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunks", default=",".join(map(str, CHUNKS_MB)), help="chunk sizes in MB")
    ap.add_argument("--recipes", default="int4-g128,nf4")
    args = ap.parse_args()
    result = {"env": env_block(), "preset": PRESET, "size": 1024, "weights": "synthetic (random)", "rows": []}
    default = qlinear.DEQUANT_CHUNK_BYTES
    for recipe in args.recipes.split(","):
        model = synthetic_transformer(PRESET, device="cuda", seed=0, recipe=recipe)
        call_args = inputs(model.config, 1024)
        base = None
        with torch.inference_mode(), use_fused(True):
            for mb in map(int, args.chunks.split(",")):
                qlinear.DEQUANT_CHUNK_BYTES = mb << 20
                free()
                out = model(*call_args).float()
                base = out if base is None else base
                r = {"recipe": recipe, "chunk_mb": mb if mb < 1 << 20 else "whole weight",
                     "weights_gib": model_bytes(model) / GIB, **time_forward(lambda m=model, a=call_args: m(*a)),
                     "sqnr_vs_first_variant_db": sqnr(out, base)}  # fmt: skip
                result["rows"].append(r)
                print(f"{recipe:10s} chunk {r['chunk_mb']!s:>12} MB  {r['ms_median']:7.1f} ms  "
                      f"peak {r['peak_allocated_gib']:6.2f} GiB  "
                      f"sqnr vs first {r['sqnr_vs_first_variant_db']:.1f} dB",
                      flush=True)  # fmt: skip
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
        model = None
        free()
    qlinear.DEQUANT_CHUNK_BYTES = default


if __name__ == "__main__":
    main()
