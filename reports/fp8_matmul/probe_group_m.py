"""Row-wise FP8 GEMM on sm_90: does the grouped tile order's GROUP_M move the persistent kernel against cuBLAS?

The library's row-wise GEMM on the M >= 4096 FLUX.2-dev shapes is the Triton persistent TMA kernel with
128 x 256 x 128 tiles, 4 stages, GROUP_M = 8 (the autotuner's pick in every run). GROUP_M has never been swept.
For each shape and GROUP_M in {4, 8, 16, 32} this pins that single config, checks the bits against the library's
own output (the tile order does not change a tile's maths: the outputs must be identical) and times it by
interleaved A/B against ``torch._scaled_mm`` row-wise with fast accumulation (``bench_fp8_matmul.bench_ab``).

Expectation (written before the first run, session 14): with GROUP_M = 8, 132 concurrent 128 x 256 tiles
cover 8 row tiles x ~16 column tiles; on double.img.qkv the weight (113 MB) is then read from HBM 4 times,
~0.66 TB/s over the kernel, far from HBM-bound, and the A panels stay in L2. So GROUP_M moves the ratio by
at most +-2 %; if anything GROUP_M = 16-32 helps the large-N shapes (img.qkv, img.mlp_in, single.linear1,
the three furthest below 1.0 in run 17) by 0-3 %.

    python3 reports/fp8_matmul/probe_group_m.py --out $OUT/probe_group_m_run1.json

Run 1 (H100, cf45274, probe_group_m_run1.json), written after it: as expected, no GROUP_M moves the ratio
beyond the A/B rounds' spread. Geomean of _scaled_mm / ours over the six shapes: 0.963 (4), 0.965 (8), 0.968
(16), 0.962 (32); double.img.qkv 0.920-0.926 and double.img.mlp_in 0.935-0.946 at every GROUP_M; bits equal to
the library's everywhere. The library keeps GROUP_M = 8: the tile order's L2 reuse is not what separates these
shapes from cuBLAS (its 1 x 2 cluster's TMA multicast, ncu_block_ws.md, is the remaining candidate).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_fp8_matmul import bench_ab, patched, quant_weights, scaled_mm  # noqa: E402

SHAPES = [("single.linear1", 4608, 6144, 55296), ("single.linear2", 4608, 24576, 6144),
          ("double.img.qkv", 4096, 6144, 18432), ("double.img.mlp_in", 4096, 6144, 36864),
          ("double.img.mlp_out", 4096, 18432, 6144), ("double.img.proj", 4096, 6144, 6144)]  # fmt: skip
GROUPS = (4, 8, 16, 32)
EXPECTATION = __doc__.split("Expectation")[1].split("\n\n")[0].strip(" (")


@contextlib.contextmanager
def pinned(F, group):
    """The persistent kernel pinned to 128 x 256 x 128, 4 stages, subtiled epilogue and ``group``, with autotuner
    and launcher caches of its own (bench_fp8_matmul.patched restores the library's on the way out)."""
    cfg = F._pcfg(128, 256, 4, 8, True, group=group)
    with patched(F._fp8_gemm_persistent, configs=[cfg], cache={}), patched(F, _FAST_LAUNCHERS={}):
        yield


def probe_shape(F, name, M, K, N, rounds):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w8, ws = quant_weights((torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16))["row"]
    x8, xs = F.quantize_fp8(x, "row")
    lib = F.fp8_gemm(x8, w8, xs, ws)
    rec = {"name": name, "M": M, "K": K, "N": N, "groups": {}}
    for g in GROUPS:
        with pinned(F, g):
            same = bool(torch.equal(F.fp8_gemm(x8, w8, xs, ws), lib))  # compiles, caches the launcher
            r = bench_ab(lambda: F.fp8_gemm(x8, w8, xs, ws), lambda: scaled_mm(x8, w8, xs, ws.reshape(1, N), True),
                         n=10, rounds=rounds)  # fmt: skip
        r["bits_equal_library"] = same
        r["tflops"] = 2 * M * K * N / (r["ours_ms"] * 1e-3) / 1e12
        rec["groups"][str(g)] = r
        print(f"{name:20s} GROUP_M={g:2d} scaled_mm/ours {r['ratio']:.3f} ({r['ratio_min']:.3f}-"
              f"{r['ratio_max']:.3f}) {r['tflops']:.0f} TFLOP/s bits={same}", flush=True)  # fmt: skip
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    import triton

    from flux2_bench.kernels import fp8_matmul as F

    torch.manual_seed(0)
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git": os.environ.get("GIT_SHA", "unknown"),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "expectation": EXPECTATION, "shapes": []}  # fmt: skip
    for name, M, K, N in SHAPES:
        data["shapes"].append(probe_shape(F, name, M, K, N, args.rounds))
        torch.cuda.empty_cache()
    data["geomean"] = {str(g): math.exp(sum(math.log(s["groups"][str(g)]["ratio"]) for s in data["shapes"])
                                        / len(data["shapes"])) for g in GROUPS}  # fmt: skip
    print("geomean scaled_mm / ours by GROUP_M:", json.dumps(data["geomean"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
