"""Block-scaled FP8 GEMM on sm_90: does the rescaled accumulator (128 x 256 tiles) reach 0.9x our row-wise GEMM?

For each FLUX.2-dev GEMM shape at 1024² (image M = 4096, single-stream M = 4608, text M = 512) this quantizes one
bf16 activation and weight per granularity, then:

- accuracy: rel L2 against the fp32 reference (``fp8_gemm_ref``) of ``fp8_block_gemm_rescaled_sm90`` (fast
  accumulation), of the library's block dispatch (``fp8_gemm``, promoted accumulation) on the same operands, and
  of the library's row-wise GEMM (fast accumulation) against its own reference;
- speed, by interleaved A/B (``bench_fp8_matmul.bench_ab``: CUDA graphs, L2 flushed, median of per-round ratios)
  of the rescaled kernel against: the library's row-wise ``fp8_gemm`` (the issue's target: >= 0.9x), the library's
  block dispatch, ``_scaled_mm`` with 1x128 x 128x128 block scales (cuBLAS) and ``_scaled_mm`` row-wise with fast
  accumulation.

Expectation: ``fp8_block_rescale_sm90.EXPECTATION`` (written before the first run); for ``wide`` (one m64n256
wgmma per consumer and K step instead of two m64n128): ``EXPECTATION_WIDE``.

Expectation for ``block_n=128`` (written before run 3): 1.05-1.12x the 128 x 256 tiles on the M = 512 shapes with
N >= 16384 (as the row-wise kernel measured: 1.13x, 1.05x), 0.85-0.95x on M >= 4096.

Run 1 (H100, 182c28b, two m64n128 wgmmas only; written after it): 0.790x our row-wise GEMM (geomean, 0.73-0.84),
1.09x the promotion kernel, 0.90x cuBLAS's block-scaled ``_scaled_mm``: below the expected 0.85-0.95x. Rel L2 vs
fp32 2.8e-3 (K = 6144) to 6.9e-3 (K = 24576), against 2.4e-3 to 4.3e-3 for the row-wise fast accumulation and
1.7e-3 for the promoted block kernel.

Run 2 (H100, 8ca6c82, written after it): ``wide`` 1.133x the two-wgmma kernel (expected 1.03-1.10x): 0.894x our
row-wise GEMM (0.888-0.931 on M >= 4096, 0.805-0.914 on M = 512: txt.qkv and txt.mlp_in the weakest), 1.235x the
promotion kernel and 1.014x cuBLAS's block-scaled ``_scaled_mm``. Nsight Compute on double.img.proj
(ncu_block_rescale.sh): tensor pipe 80 % active (two wgmmas: 70 %), issue slots 43 % busy.

Run 3 (H100, 95063f9, written after it): ``block_n=128`` 1.07x the 128 x 256 tiles on double.txt.qkv only (288
tiles of 128 x 256 on 132 SMs: 2.18 waves), 0.99x on txt.mlp_in and 0.80-0.92x elsewhere (expected 1.05-1.12x on
both text shapes with N >= 16384); 4 stages no better than 6. (The JSON's "git" reads 9ac848e: the device's
checkout had a stale .git, and GIT_SHA came from it; the code was 95063f9.)

Expectation for run 4 (written before it): the step scales' reciprocal in one MUFU.RCP (``rcp.approx``) instead of
``gl.fdiv``'s six instructions cut the wide kernel's K loop from 266 to 238 SASS instructions; they run under the
wgmma, not after its wait, so 1.00-1.03x (less issue pressure: "dispatch" was the top stall reason in run 2's
profile).

Run 4 (H100, 8a0c30f, written after it): the wide kernel at 0.904x our row-wise GEMM (run 3: 0.892; as expected),
1.256x the promotion kernel, 1.022x cuBLAS's block-scaled ``_scaled_mm``; M >= 4096 0.907-0.934, M = 512
0.822-0.930. ``block_n=128`` fell to 0.81x row-wise on txt.qkv (run 3: 0.87x) and 0.64-0.79x elsewhere: no longer
ahead of the 128 x 256 tiles anywhere. The reciprocal change is the only code difference between the runs and
should not slow it; not understood. ``fp8_matmul.BLOCK_RESCALE_OPTIONS`` is 128 x 256 at every shape.

Expectation for run 5 (written before it): ``late_release`` (a kernel option at 9141755) moves the warpgroup
barrier and the mbarrier arrive that release a ring slot from between the wgmma wait and the rescale to under the
next step's wgmma (the CPU compile showed only the 128 rescale FMULs left after the wait): 1.00-1.04x the wide
kernel.

Run 5 (H100, 0e07999, written after it): ``late_release`` 0.946x the wide kernel (bits equal), which measured
0.909x our row-wise GEMM in this run. The miss: with 3 stages (the most that fit), releasing every slot a step
later leaves the producer one step less to refill it, and that costs more than the barrier did. The option was
removed (its variant ``rescaled_wide_late`` is in ``probe_block_rescale_run5.json``).

Expectation for run 6 (written before it): ``share_out_buffer`` (one 64 x 128 output buffer per consumer, the
halves stored in turn) with a fourth ring stage, as the row-wise kernel's subtiled epilogue gained (0.6-1.7 % on
M >= 4096 and up to 12 % on the few-tile M = 512 shapes, probe_row_epilogue): 1.01-1.03x the 3-stage wide kernel.
From this run on ``library_row`` is the Gluon row-wise kernel (``fp8_matmul._row_gluon_options``), 1.01x the
Triton persistent kernel it replaced at M >= 1024.

Run 6 (H100, 30db74a, written after it): ``share_out_buffer`` with 4 stages 1.024x the 3-stage wide kernel
(1.011-1.076x per shape, the most on the few-tile M = 512 shapes; bits and rel L2 unchanged), as expected.
Against the new row-wise dispatch: 0.921x (3 stages: 0.901x); 1.056x cuBLAS's block-scaled ``_scaled_mm``.
``fp8_matmul.BLOCK_RESCALE_OPTIONS`` takes it.

    python3 reports/fp8_matmul/probe_block_rescale.py --out $OUT/probe_block_rescale_run1.json
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

from bench_fp8_matmul import bench_ab, quant_weights, rel_l2, scaled_mm  # noqa: E402

SHAPES = [("single.linear1", 4608, 6144, 55296), ("single.linear2", 4608, 24576, 6144),
          ("double.img.qkv", 4096, 6144, 18432), ("double.img.mlp_in", 4096, 6144, 36864),
          ("double.img.mlp_out", 4096, 18432, 6144), ("double.img.proj", 4096, 6144, 6144),
          ("double.txt.qkv", 512, 6144, 18432), ("double.txt.mlp_in", 512, 6144, 36864),
          ("double.txt.mlp_out", 512, 18432, 6144), ("double.txt.proj", 512, 6144, 6144)]  # fmt: skip
# name -> fp8_block_gemm_rescaled_sm90 options (run 1: "rescaled" only; run 2: "rescaled" and "rescaled_wide")
# run 3 also "rescaled_wide_bn128_s4" (4 stages: no better than 6); run 5 "rescaled_wide_late" instead of the
# block_n=128 one (the late_release option of 9141755, 0.946x, removed)
# run 6: "rescaled_wide_s4_shared" instead of the block_n=128 one
VARIANTS = {
    "rescaled_wide": dict(wide=True),
    "rescaled_wide_s4_shared": dict(wide=True, num_stages=4, share_out_buffer=True),
}


def probe_shape(F, R, name, M, K, N, rounds):
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    wq = quant_weights((torch.randn(N, K, device="cuda") * 0.02).to(torch.bfloat16))
    (w8b, wsb), (w8r, wsr) = wq["block"], wq["row"]
    del wq
    x8b, xsb = F.quantize_fp8(x, "block")
    x8r, xsr = F.quantize_fp8(x, "row")
    variants = {v: (lambda kw=kw: R.fp8_block_gemm_rescaled_sm90(x8b, w8b, xsb, wsb, **kw))
                for v, kw in VARIANTS.items()}  # fmt: skip
    lib_block = lambda: F.fp8_gemm(x8b, w8b, xsb, wsb, fast_accum=False)  # noqa: E731 (promoted accumulation)
    lib_row = lambda: F.fp8_gemm(x8r, w8r, xsr, wsr)  # noqa: E731
    rec = {"name": name, "M": M, "K": K, "N": N}
    ref = F.fp8_gemm_ref(x8b, w8b, xsb, wsb, out_dtype=torch.float32)
    for v, fn in variants.items():
        rec[f"rel_l2_{v}"] = rel_l2(fn(), ref)
    rec["rel_l2_library_block"] = rel_l2(lib_block(), ref)
    del ref
    ref = F.fp8_gemm_ref(x8r, w8r, xsr, wsr, out_dtype=torch.float32)
    rec["rel_l2_library_row"] = rel_l2(lib_row(), ref)
    del ref
    torch.cuda.empty_cache()
    anchors = {"library_row": lib_row, "library_block": lib_block,
               "scaled_mm_row_fast": lambda: scaled_mm(x8r, w8r, xsr, wsr.reshape(1, N), True)}  # fmt: skip
    try:  # cuBLAS 1x128 x 128x128 blocks, if this torch exposes them (as in bench_fp8_matmul.timing)
        xsb_outer = xsb.t().contiguous().t()
        scaled_mm(x8b, w8b, xsb_outer, wsb.t(), False)
        anchors["scaled_mm_block"] = lambda: scaled_mm(x8b, w8b, xsb_outer, wsb.t(), False)
    except Exception as e:  # noqa: BLE001 (record why the anchor is missing)
        rec["scaled_mm_block_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    anchors["rescaled_wide"] = variants["rescaled_wide"]
    rec["ab"] = {}
    for v, ours in variants.items():
        rec["ab"][v] = {}
        for k, fn in anchors.items():
            if k == v:
                continue
            r = bench_ab(ours, fn, n=10, rounds=rounds)
            r["tflops"] = 2 * M * K * N / (r["ours_ms"] * 1e-3) / 1e12
            rec["ab"][v][k] = r
        print(f"{name:20s} {v:22s} rel L2 {rec[f'rel_l2_{v}']:.1e} (promoted {rec['rel_l2_library_block']:.1e}, "
              f"row {rec['rel_l2_library_row']:.1e}) | {rec['ab'][v]['library_row']['tflops']:.0f} TFLOP/s | "
              + " ".join(f"/{k} {r['ratio']:.3f}" for k, r in rec["ab"][v].items()), flush=True)  # fmt: skip
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    import triton

    from flux2_bench.kernels import fp8_block_rescale_sm90 as R
    from flux2_bench.kernels import fp8_matmul as F

    torch.manual_seed(0)
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git": os.environ.get("GIT_SHA", "unknown"),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "expectation": R.EXPECTATION, "weights": "synthetic (random): speed and rel L2 vs fp32 only",
            "shapes": []}  # fmt: skip
    for name, M, K, N in SHAPES:
        data["shapes"].append(probe_shape(F, R, name, M, K, N, args.rounds))
        torch.cuda.empty_cache()
    geo = {}
    for v, by_anchor in data["shapes"][0]["ab"].items():
        for k in by_anchor:
            rs = [s["ab"][v][k]["ratio"] for s in data["shapes"] if k in s["ab"][v]]
            geo[f"{v} / {k}"] = math.exp(sum(map(math.log, rs)) / len(rs))
    data["geomean"] = geo
    print("geomean (anchor time / rescaled time):", json.dumps(geo))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
