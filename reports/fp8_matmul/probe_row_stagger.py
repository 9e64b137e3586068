"""Row-wise FP8 GEMM on sm_90: does running the second consumer warpgroup a few K steps behind the first hide the
epilogue that is left?

probe_row_epilogue run 2 measured the epilogue of the library's row-wise kernel (``fp8_row_gemm_sm90``,
cooperative 128 x 256, 4 stages, subtiled epilogue, prefetched scales) at ~2.5 % of its time on M >= 4096: both
consumer warpgroups work on the same tile, finish their K loops together and run their epilogues together, with
the tensor cores idle (~1.2 K steps per tile). With ``stagger=s`` consumer 1 starts s K steps after consumer 0;
nothing re-aligns them later, so at each tile's end one consumer's epilogue runs while the other still issues its
last s steps alone (one warpgroup's m64n256k32 wgmmas can keep the tensor cores busy), and the next tile's first
s steps run under the other's epilogue. The price: the lagging consumer holds s more ring slots, so the leader
prefetches s slots less.

For each FLUX.2-dev GEMM shape at 1024² this checks that every variant gives the library's row-wise bits and times
it by interleaved A/B (``bench_fp8_matmul.bench_ab``) against the library's dispatch and ``_scaled_mm`` row-wise
with fast accumulation.

Expectation (written before run 1): stagger 1 hides ~35 % of the epilogue, 1.005-1.01x the library on M >= 4096
(more on the K = 6144 shapes, where the epilogue is 3 % of a tile); stagger 2 hides ~70 % if two slots of
prefetch are enough, else loses: 0.98-1.02x. The M = 512 shapes keep the library's other schedules, so only the
M >= 4096 rows decide.

    python3 reports/fp8_matmul/probe_row_stagger.py --out $OUT/probe_row_stagger_run1.json

Run 1 (H100, 9b9b8b2, written after it): bits equal to the library's for both variants on every shape (and the
GPU tests of both schedules passed, pytest_row_stagger_9b9b8b2.txt); on M >= 4096 stagger 1 ran 1.000x the
library and stagger 2 1.003x (0.970x and 0.980x ``_scaled_mm`` row fast; the library itself about 0.97x in this
run). Below the expectation: whatever the epilogue overlap gained, the lost prefetch took back (not profiled).
The option was removed from ``fp8_row_gemm_sm90`` after this run (it lives at 9b9b8b2, which this script needs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_fp8_matmul import bench_ab, quant_weights, scaled_mm  # noqa: E402
from probe_block_rescale import SHAPES  # noqa: E402

BASE = dict(block_n=256, num_stages=4, epilogue_subtile=True, prefetch_scales=True)  # the library's, M >= 1024
VARIANTS = {"stagger1": dict(BASE, stagger=1), "stagger2": dict(BASE, stagger=2)}
EXPECTATION = " ".join(__doc__.split("Expectation (written before run 1): ")[1].split("\n\n")[0].split())


def probe_shape(F, R, name, M, K, N, rounds):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w8, ws = quant_weights((torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16))["row"]
    x8, xs = F.quantize_fp8(x, "row")
    variants = {v: (lambda kw=kw: R.fp8_row_gemm_sm90(x8, w8, xs, ws, **kw)) for v, kw in VARIANTS.items()}
    anchors = {"library_row": lambda: F.fp8_gemm(x8, w8, xs, ws),
               "scaled_mm_row_fast": lambda: scaled_mm(x8, w8, xs, ws.reshape(1, N), True)}  # fmt: skip
    want = anchors["library_row"]()
    bits = {v: bool(torch.equal(fn(), want)) for v, fn in variants.items()}
    rec = {"name": name, "M": M, "K": K, "N": N, "bits_equal_library_row": bits, "ab": {}}
    del want
    for v, ours in variants.items():
        rec["ab"][v] = {}
        for k, fn in anchors.items():
            r = bench_ab(ours, fn, n=10, rounds=rounds)
            r["tflops"] = 2 * M * K * N / (r["ours_ms"] * 1e-3) / 1e12
            rec["ab"][v][k] = r
        print(f"{name:20s} {v:10s} {rec['ab'][v]['library_row']['tflops']:.0f} TFLOP/s | "
              + " ".join(f"/{k} {r['ratio']:.3f}" for k, r in rec["ab"][v].items()), flush=True)  # fmt: skip
    print(f"{name:20s} bits equal to the library's: {rec['bits_equal_library_row']}", flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import triton

    from flux2_bench.kernels import fp8_matmul as F
    from flux2_bench.kernels import fp8_row_gemm_sm90 as R

    torch.manual_seed(0)
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git": os.environ.get("GIT_SHA", "unknown"),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "expectation": EXPECTATION, "variants": {k: {a: str(b) for a, b in v.items()} for k, v in VARIANTS.items()},
            "weights": "synthetic (random): speed and bits only", "shapes": []}  # fmt: skip
    for name, M, K, N in SHAPES:
        data["shapes"].append(probe_shape(F, R, name, M, K, N, args.rounds))
        torch.cuda.empty_cache()
    geo = {}
    for v in VARIANTS:
        for k in ("library_row", "scaled_mm_row_fast"):
            for label, keep in (("all", lambda s: True), ("M>=4096", lambda s: s["M"] >= 4096)):
                rs = [s["ab"][v][k]["ratio"] for s in data["shapes"] if keep(s)]
                geo[f"{v} / {k} ({label})"] = math.exp(sum(map(math.log, rs)) / len(rs))
    data["geomean"] = geo
    print("geomean (anchor time / variant time):\n" + "\n".join(f"  {k}: {g:.3f}" for k, g in geo.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
